"""RadCrepe: rule-made one-fact edits on ROCOv2-style captions, the SugarCrepe layout `data radcrepe` writes, and
the `radcrepe` task's exact accuracy with planted embeddings (and ~0.5 for an untrained model)."""
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import fuselip_med.cli as cli
from fuselip_med.eval.radcrepe import (
    edit_body_region,
    edit_laterality,
    edit_modality,
    edit_negation,
    edit_size_number,
    make_edits,
)
from fuselip_med.eval.runner import run_evaluation
from tests.planted import PlantedModel, unit

# Captions in the style of ROCOv2's (PMC figure captions: sentence fragments, abbreviations, measurements).
CAPTIONS = [
    "Chest X-ray showing a left-sided pleural effusion and bilateral infiltrates.",
    "Axial CT of the abdomen shows a 2.5 cm hypodense lesion in the right lobe of the liver (arrow).",
    "No evidence of fracture, but a small effusion in the left knee.",
    "Contrast-enhanced computed tomography of the chest without pulmonary embolism.",
    "Sagittal T2-weighted MRI of the lumbar spine demonstrating a disc herniation at L4-L5.",
    "Ultrasound of the right kidney demonstrating a solitary cyst measuring 14 mm.",
    "Consolidation in the RLL and LUL on CXR.",
    "Coronal CT image revealing multiple nodules in both lungs.",
    "The catheter was left in place in the right atrium.",
    "Lt knee radiograph with a loose body.",
]


@pytest.mark.parametrize("caption, expected", [
    ("Chest X-ray showing a left-sided pleural effusion and bilateral infiltrates.",
     "Chest X-ray showing a right-sided pleural effusion and bilateral infiltrates."),
    ("Bilateral hilar lymphadenopathy.", None),  # "bilateral" holds "lateral", not a side
    ("Left renal mass; the left adrenal gland and right kidney are normal.",
     "Right renal mass; the right adrenal gland and right kidney are normal."),  # every mention of the first side
    ("Consolidation in the RLL and LUL on CXR.", "Consolidation in the LLL and LUL on CXR."),
    ("Lt knee radiograph with a loose body.", "Rt knee radiograph with a loose body."),
    ("Nodule in the RML.", None),  # the right middle lobe has no left twin
    ("The catheter was left in place in the right atrium.", "The catheter was left in place in the left atrium."),
    ("CT image at a right angle to the axis.", None),
    ("Leftward deviation of the trachea.", None),
])
def test_laterality(caption, expected):
    assert edit_laterality(caption) == expected


@pytest.mark.parametrize("caption, expected", [
    ("No pleural effusion or pneumothorax.", "Pleural effusion or pneumothorax."),
    ("No evidence of fracture, but a small effusion in the left knee.",
     "Evidence of fracture, but a small effusion in the left knee."),  # the effusion after "but" is untouched
    ("There is no residual tumor after resection.", "There is residual tumor after resection."),
    ("Contrast-enhanced CT of the chest without pulmonary embolism.",
     "Contrast-enhanced CT of the chest with pulmonary embolism."),
    ("The lesion is not seen on the follow-up scan.", "The lesion is seen on the follow-up scan."),
    ("Biopsy negative for malignancy.", "Biopsy positive for malignancy."),
    ("Axial CT showing a large mass in the pancreas.", "Axial CT showing no large mass in the pancreas."),
    ("Nodular opacity in the left lung.", None),  # "no" inside "nodular" is not a cue
])
def test_negation(caption, expected):
    assert edit_negation(caption) == expected


@pytest.mark.parametrize("caption, expected", [
    ("Axial CT of the abdomen.", "Axial MRI of the abdomen."),
    ("Enhanced computed tomography of the chest.", "Enhanced magnetic resonance imaging of the chest."),
    ("Sagittal MR image of the knee.", "Sagittal CT image of the knee."),
    ("Chest X-ray on admission.", "Chest ultrasound on admission."),
    ("Ultrasound of the right kidney.", "X-ray of the right kidney."),
    ("PET/CT fusion image.", None),  # two modalities: no single swap
    ("Photograph of the specimen.", None),
])
def test_modality(caption, expected):
    assert edit_modality(caption) == expected


def test_body_region_and_size_number():
    assert edit_body_region("Chest CT: the chest wall is intact.") == "Abdomen CT: the abdomen wall is intact."
    assert edit_body_region("Abdominal ultrasound.") == "Thoracic ultrasound."
    assert edit_size_number("A 2.5 cm lesion and a 4 mm nodule.") == "A 7.5 cm lesion and a 4 mm nodule."
    assert edit_size_number("Multiple liver metastases.") == "Single liver metastases."
    assert edit_size_number("A small effusion.") == "A large effusion."
    assert edit_size_number("Effusion.") is None


def test_make_edits_change_one_fact_each():
    for caption in CAPTIONS:
        for kind, negative in make_edits(caption).items():
            assert negative != caption, kind
            assert abs(len(negative.split()) - len(caption.split())) <= 3, (kind, negative)


def write_rocov2_test(root, n):
    """The official ROCOv2 layout: test_captions.csv (ID,Caption) + test_images/test/ROCOv2_2023_test_NNNNNN.jpg."""
    (root / "test_images" / "test").mkdir(parents=True)
    rows = []
    for i in range(n):
        iid = f"ROCOv2_2023_test_{i + 1:06d}"
        arr = np.full((24, 24, 3), (i + 1, 7, 9), dtype=np.uint8)
        Image.fromarray(arr).save(root / "test_images" / "test" / f"{iid}.png", format="PNG")
        (root / "test_images" / "test" / f"{iid}.png").rename(root / "test_images" / "test" / f"{iid}.jpg")
        rows.append([iid, CAPTIONS[i % len(CAPTIONS)]])
    with open(root / "test_captions.csv", "w", newline="") as f:
        csv.writer(f).writerows([["ID", "Caption"], *rows])
    for name in ("test_concepts.csv", "test_concepts_manual.csv"):
        (root / name).write_text("ID,CUIs\n" + "".join(f"{r[0]},C0040405\n" for r in rows))
    return root


def test_data_radcrepe_writes_sugarcrepe_layout_and_task_scores_exactly(tmp_path):
    root = write_rocov2_test(tmp_path / "ROCOv2", 10)
    result = CliRunner().invoke(cli.app, ["-q", "data", "radcrepe", "--input", str(root), "--out",
                                          str(tmp_path / "rc")])
    assert result.exit_code == 0, result.output
    lat = json.loads((tmp_path / "rc" / "laterality.json").read_text())
    entry = lat["ROCOv2_2023_test_000001"]
    assert set(entry) == {"filename", "caption", "negative_caption"}
    assert entry["filename"] == "../ROCOv2/test_images/test/ROCOv2_2023_test_000001.jpg"
    assert entry["negative_caption"] == CAPTIONS[0].replace("left-sided", "right-sided")
    captions = {i + 1: CAPTIONS[i] for i in range(10)}
    # the planted image embedding is its true caption's: every true caption wins
    model = PlantedModel(image_fn=lambda k: unit(f"text:{captions[k // 65536]}"))
    out = run_evaluation(model, ["radcrepe"], {"radcrepe": str(tmp_path / "rc")}, tmp_path / "out", progress=False)
    res = out["tasks"]["radcrepe"]
    counts = {k: len(json.loads((tmp_path / "rc" / f"{k}.json").read_text())) for k in res["per_edit"]}
    assert res["counts"] == {f"{k}_accuracy": v for k, v in counts.items() if v}
    assert all(v == 1.0 for k, v in res["metrics"].items() if k.endswith("_accuracy"))
    lo, hi = res["intervals"]["laterality_accuracy"]
    assert hi == 1.0 and 0 < lo < 1 and res["metrics"]["chance"] == 0.5


def test_untrained_tiny_model_is_near_chance(tmp_path):
    """Three untrained tiny models (seeds 0-2) pooled: an untrained model's preference between two captions is a
    coin flip per caption pair, so the pooled accuracy's binomial interval holds 0.5."""
    from fuselip_med.core.fuselip import FuseLIP, FuseLIPConfig
    from fuselip_med.eval.intervals import binomial_interval

    root = write_rocov2_test(tmp_path / "ROCOv2", 30)
    correct = total = 0
    for seed in range(3):
        torch.manual_seed(seed)
        model = FuseLIP(FuseLIPConfig.from_size("tiny")).eval()
        res = run_evaluation(model, ["radcrepe"], {"test": str(root)}, tmp_path / f"out{seed}", progress=False,
                             batch_size=32)["tasks"]["radcrepe"]
        assert res["n"] >= 80 and "in memory" in res["source"]
        correct += sum(v["correct"] for v in res["per_edit"].values())
        total += res["n"]
    lo, hi = binomial_interval(correct, total)
    assert lo <= 0.5 <= hi and 0.4 <= correct / total <= 0.6
