"""Published protocols: ROCO-2k (seeded draw, IDs written), CheXpert/MIMIC-CXR 5x200 CSVs, RSNA Pneumonia's
stage_2_train_labels.csv + DICOM; bad rows named in skipped.csv."""
import csv

import numpy as np
import pytest
import torch

import fuselip_med.eval.tasks.protocols as protocols
from fuselip_med.eval.findings import default_prompts
from fuselip_med.eval.runner import run_evaluation
from tests.planted import PlantedModel, solid_image, unit
from tests.radiology_fixtures import CHEXPERT_FINDINGS, ScaledPlanted, rgb_of
from tests.test_images import write_ct
from tests.test_radcrepe import CAPTIONS, write_rocov2_test

FIVE = protocols.FIVE_CLASSES


def test_roco2k_draws_seeded_rows_and_writes_them(tmp_path, monkeypatch):
    monkeypatch.setattr(protocols, "ROCO2K_SIZE", 6)
    root = write_rocov2_test(tmp_path / "ROCOv2", 10)
    captions = {i + 1: CAPTIONS[i] for i in range(10)}
    model = PlantedModel(image_fn=lambda k: unit(f"text:{captions[k // 65536]}"))
    out = run_evaluation(model, ["roco2k"], {"test": str(root)}, tmp_path / "out", seed=7, progress=False)
    res = out["tasks"]["roco2k"]
    drawn = np.sort(np.random.default_rng(7).choice(10, size=6, replace=False))
    ids = [f"ROCOv2_2023_test_{i + 1:06d}" for i in drawn]
    assert res["rows"]["ids"] == ids and res["rows"]["count"] == 6 and res["seed"] == 7
    assert (tmp_path / "out" / "roco2k_rows.txt").read_text().split() == ids
    assert "default_rng(7)" in res["protocol"] and res["pool_size"] == 6 and "requested_rows" not in res
    assert res["metrics"]["image_to_text_R@1"] == 1.0 and res["metrics"]["text_to_image_R@1"] == 1.0
    assert res["intervals"]["image_to_text_R@1"][1] == 1.0


def five_csv(tmp_path, kind):
    """chexpert_5x200.csv (CheXpert columns + Report Impression) or MIMIC-CXR 5x200's columns."""
    rows, header = [], []
    classes = [0, 1, 2, 3, 4, 0, 1, 2]  # row class; the planted model misreads row 7 (Consolidation) as Edema
    for i, k in enumerate(classes):
        rel = (f"CheXpert-v1.0-small/train/patient{i:05d}/study1/view1_frontal.jpg" if kind == "chexpert"
               else f"files/p10/p1000{i:04d}/s5{i:07d}/{i:08x}.jpg")
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        solid_image(tmp_path / rel, rgb_of(i), fmt="PNG")
        labels = {c: ("1.0" if j == k else "0.0" if j % 2 else "") for j, c in enumerate(FIVE)}
        if i == 5:
            labels["Edema"] = "1.0"  # two of the five positive: a named skip
        if kind == "chexpert":
            header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_FINDINGS, "Report Impression"]
            rows.append([rel, "Male", "68", "Frontal", "AP", *(labels.get(f, "") for f in CHEXPERT_FINDINGS),
                         "1. Findings as above."])
        else:
            header = ["Path", "dicom_id", "subject_id", "study_id", "Report", *FIVE]
            rows.append([rel, f"{i:08x}", f"1000{i:04d}", f"5{i:07d}", "FINDINGS: as above.",
                         *(labels[c] for c in FIVE)])
    rows.append([("CheXpert-v1.0-small/train/patient99999/study1/view1_frontal.jpg" if kind == "chexpert"
                  else "files/p19/p19999999/s59999999/gone.jpg"), *rows[0][1:]])  # a missing image
    base = tmp_path / ("CheXpert-v1.0-small" if kind == "chexpert" else "")
    base.mkdir(exist_ok=True)
    path = base / ("chexpert_5x200.csv" if kind == "chexpert" else "mimic_5x200.csv")
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return str(path), classes


def five_model(classes):
    _, own = default_prompts()
    prompt_class = {p: FIVE.index(c) for c in FIVE for p in own[c].positive}
    seen = {i: classes[i] for i in range(len(classes))}
    seen[7] = 3

    def onehot(k):
        v = torch.zeros(32)
        v[k] = 1.0
        return v

    return PlantedModel(image_fn=lambda i: onehot(seen[i - 1000]), text_fn=lambda t: onehot(prompt_class.get(t, 31)))


@pytest.mark.parametrize("kind", ["chexpert", "mimic"])
def test_five_by_200(tmp_path, kind):
    path, classes = five_csv(tmp_path, kind)
    task, role = ("chexpert5x200", "chexpert5x200") if kind == "chexpert" else ("mimic5x200", "mimic5x200")
    out = run_evaluation(five_model(classes), [task], {role: path}, tmp_path / "out", progress=False)
    res = out["tasks"][task]
    assert res["n"] == 7 and res["n_listed"] == 9
    assert res["metrics"]["accuracy"] == pytest.approx(6 / 7)
    assert res["skipped"] == {"not exactly one of the five classes positive": 1, "missing image": 1}
    assert res["rows"]["count"] == 7 and (tmp_path / "out" / f"{task}_rows.txt").is_file()
    skipped = (tmp_path / "out" / "skipped.csv").read_text()
    assert "not exactly one of the five classes positive" in skipped and "missing image" in skipped


def test_rsna_pneumonia_labels_and_dicom(tmp_path):
    images = tmp_path / "stage_2_train_images"
    images.mkdir()
    patients = {"0004cfab-14fd-4e49-80ba-63a80b6bddd6": 0, "00313ee0-9eaa-42f4-b0ab-c148ed3241cd": 0,
                "00436515-870c-4b36-a041-de91049b9ab4": 1, "00704310-78a8-4b38-8475-49f4573b2dbb": 1}
    for pid, target in patients.items():
        write_ct(images / f"{pid}.dcm", np.full((16, 16), 200 if target else 50, dtype=np.int16), intercept=0.0,
                 window=(256, 128))
    lines = ["patientId,x,y,width,height,Target", "0004cfab-14fd-4e49-80ba-63a80b6bddd6,,,,,0",
             "00313ee0-9eaa-42f4-b0ab-c148ed3241cd,,,,,0",
             "00436515-870c-4b36-a041-de91049b9ab4,264.0,152.0,213.0,379.0,1",
             "00436515-870c-4b36-a041-de91049b9ab4,562.0,152.0,256.0,453.0,1",
             "00704310-78a8-4b38-8475-49f4573b2dbb,323.0,577.0,160.0,104.0,1", "0070e1c6-missing-dicom,,,,,0"]
    (tmp_path / "stage_2_train_labels.csv").write_text("\n".join(lines) + "\n")
    _, own = default_prompts()
    pos, neg = set(own["Pneumonia"].positive), set(own["Pneumonia"].negative)

    def text_fn(t):
        v = torch.zeros(32)
        v[0 if t in pos else 1 if t in neg else 31] = 1.0
        return v

    def image_fn(i):
        v = torch.zeros(32)
        v[0 if (i >> 16) > 128 else 1] = 1.0
        return v

    out = run_evaluation(ScaledPlanted(image_fn=image_fn, text_fn=text_fn), ["rsna-pneumonia"],
                         {"rsna": str(tmp_path)}, tmp_path / "out", progress=False, n_boot=50)
    res = out["tasks"]["rsna-pneumonia"]
    assert res["n"] == 4 and res["n_listed"] == 5 and res["n_positive"] == 2  # two box rows, one patient
    assert res["metrics"]["AUROC"] == 1.0 and res["metrics"]["accuracy"] == 1.0
    assert res["skipped"] == {"missing image": 1}
    assert res["rows"]["ids"] == list(patients)
