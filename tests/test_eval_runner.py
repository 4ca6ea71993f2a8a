"""run_evaluation end to end with fake models: every task, one embedding per unique input, report files."""
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from fuselip_med.data.images import ImageDecodeError
from fuselip_med.data.schema import Sample, SampleSide
from fuselip_med.data.transforms.tgit import TGITPair
from fuselip_med.eval.runner import TASKS, run_evaluation
from tests.test_eval_fakes import CLASSES, ConceptModel, HashModel, class_image

CUIS = {"CT": "C0040405", "MRI": "C0024485", "X-ray": "C1306645", "ultrasound": "C0041618",
        "angiography": "C0002978", "PET": "C0032743"}
BROKEN = torch.full((3, 8, 8), -1.0)


def fake_decode(x):
    if torch.equal(x, BROKEN):
        raise ImageDecodeError("corrupt image", "broken sample")
    return x


class ListSource:
    def __init__(self, samples, name, cui_names=None):
        self.samples, self.name = samples, name
        self.cui_names = cui_names or {}

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


def _split(name, n, offset, broken=False):
    samples = []
    for i in range(n):
        c = CLASSES[i % len(CLASSES)]
        caption = f"{c} study number {i + offset}" if i % 5 else "same caption"  # duplicates
        samples.append(Sample(id=f"{name}{i}", source="rocov2", query=SampleSide(image=class_image(i % 6, i + offset)),
                              target=SampleSide(text=caption),
                              meta={"modality": c if i != 1 else None, "image_id": f"{name}{i}",
                                    "concepts": [CUIS[c]] + (["C7"] if i % 2 else [])}))
    if broken:
        samples.append(Sample(id="broken", source="rocov2", query=SampleSide(image=BROKEN),
                              target=SampleSide(text="broken"),
                              meta={"modality": "CT", "concepts": []}))
    names = {cui: c for c, cui in CUIS.items()} | {"C7": "noise finding"}
    return ListSource(samples, f"fake/{name}", names)


def _tgit_pools():
    imgs = [class_image(0, 100 + i) for i in range(4)]
    return {"rotate": [[TGITPair("rotate", imgs[i], imgs[i + 1], "rotate"),
                        TGITPair("rotate", imgs[i], imgs[(i + 2) % 4], "rotate")] for i in range(3)]}


def _composed():
    return ListSource([Sample(id=f"c{i}", source="edit",
                              query=SampleSide(image=class_image(1, 200 + i), text="edit it"),
                              target=SampleSide(image=class_image(2, 300 + i))) for i in range(7)], "fake/composed")


def test_all_tasks_once_each_input(tmp_path):
    model = ConceptModel(noise=0.3)
    data = {"rocov2_test": _split("test", 30, 0, broken=True), "rocov2_valid": _split("valid", 24, 1000),
            "tgit": _tgit_pools(), "composed": _composed()}
    tasks = ["rocov2-retrieval", "rocov2-modality", "rocov2-concepts", "modality-gap", "tgit", "composed-retrieval"]
    out = run_evaluation(model, tasks, data, tmp_path, pool_size=10, n_pools=3, seed=5, batch_size=7,
                         decode=fake_decode, progress=False, concept_top_k=3, model_id="fake")
    assert json.loads((tmp_path / "metrics.json").read_text()) == out
    assert (tmp_path / "report.md").is_file()
    assert (tmp_path / "plots" / "rocov2-retrieval_recall_at_k.png").is_file()
    assert (tmp_path / "plots" / "rocov2-modality_confusion_matrix.png").is_file()
    assert out["model"] == "fake" and list(out["tasks"]) == tasks
    assert set(model.seen.values()) == {1}  # every unique input embedded once across all tasks

    ret = out["tasks"]["rocov2-retrieval"]
    assert (ret["pool_size"], ret["n_pools"], ret["seed"], ret["n"]) == (10, 3, 5, 30)
    assert ret["skipped"] == {"corrupt image": 1} and ret["full_pool"]["pool_size"] == 30
    assert (ret["n_listed"], ret["n_evaluated"]) == (31, 30)
    assert {"image_to_text_R@1", "text_to_image_median_rank"} <= set(ret["metrics"])

    mod = out["tasks"]["rocov2-modality"]
    assert mod["metrics"]["accuracy"] == 1.0 and mod["n"] == 29  # one sample has no modality
    assert mod["skipped"] == {"corrupt image": 1, "no modality label": 1}
    counts = np.array(mod["confusion_matrix"]["counts"])
    assert counts.sum() == 29 and np.trace(counts) == 29

    con = out["tasks"]["rocov2-concepts"]
    assert [c["cui"] for c in con["concepts"]][0] == "C7"  # the most frequent in valid
    assert con["k"] == 3 and 0.0 <= con["metrics"]["samples_f1"] <= 1.0
    assert con["n"] == 30 and con["n_valid"] == 24
    assert (con["n_listed"], con["n_evaluated"], con["skipped"]) == (31, 30, {"corrupt image": 1})
    assert con["skip_examples"] == {"corrupt image": ["broken"]}

    gap = out["tasks"]["modality-gap"]["metrics"]
    assert 0 < gap["gap"] < 2 and -1 <= gap["cosine_of_means"] <= 1

    assert out["tasks"]["tgit"]["per_kind"]["rotate"]["n"] == 3
    comp = out["tasks"]["composed-retrieval"]
    assert comp["n"] == 7 and "composed_to_image_R@1" in comp["metrics"] and comp["pool_size"] == 7


def test_seeded_runs_are_reproducible(tmp_path):
    data = {"rocov2_test": _split("test", 25, 0)}
    a = run_evaluation(HashModel(), ["rocov2-retrieval"], data, tmp_path / "a", pool_size=8, n_pools=4,
                       decode=fake_decode, progress=False)
    b = run_evaluation(HashModel(), ["rocov2-retrieval"], data, tmp_path / "b", pool_size=8, n_pools=4,
                       decode=fake_decode, progress=False)
    c = run_evaluation(HashModel(), ["rocov2-retrieval"], data, tmp_path / "c", pool_size=8, n_pools=4, seed=1,
                       decode=fake_decode, progress=False)
    ta, tb, tc = (x["tasks"]["rocov2-retrieval"] for x in (a, b, c))
    assert ta["metrics"] == tb["metrics"] and ta["metrics"] != tc["metrics"]
    assert ta["full_pool"] == tc["full_pool"]


def test_bad_task_and_missing_data_fail_before_work(tmp_path):
    model = HashModel()
    with pytest.raises(ValueError, match="unknown evaluation task"):
        run_evaluation(model, ["nope"], {}, tmp_path)
    with pytest.raises(ValueError, match="rocov2_valid"):
        run_evaluation(model, ["rocov2-concepts"], {"rocov2_test": _split("t", 3, 0)}, tmp_path)
    assert not model.seen and not (tmp_path / "metrics.json").exists()
    assert "rocov2-retrieval" in TASKS


def _official_rocov2(root, split, n):
    (root / f"{split}_images" / split).mkdir(parents=True)
    rows, concepts = [], []
    for i in range(n):
        iid = f"ROCOv2_2023_{split}_{i + 1:06d}"
        arr = np.random.default_rng([i, len(split)]).integers(0, 256, (20, 24), dtype=np.uint8)
        Image.fromarray(arr).save(root / f"{split}_images" / split / f"{iid}.jpg")
        rows.append([iid, f"caption {i % 4}, with a comma"])
        concepts.append([iid, ";".join([list(CUIS.values())[i % 3], "C0000726"][: 1 + i % 2])])
    for name, body, header in ((f"{split}_captions.csv", rows, ["ID", "Caption"]),
                               (f"{split}_concepts.csv", concepts, ["ID", "CUIs"]),
                               (f"{split}_concepts_manual.csv", concepts, ["ID", "CUIs"])):
        with open(root / name, "w", newline="") as f:
            csv.writer(f).writerows([header] + body)


def test_rocov2_folder_with_real_adapter_and_decoder(tmp_path):
    root = tmp_path / "rocov2"
    root.mkdir()
    _official_rocov2(root, "test", 9)
    _official_rocov2(root, "valid", 6)
    with open(root / "cui_mapping.csv", "w", newline="") as f:
        csv.writer(f).writerows([["CUI", "Canonical name"], ["C0000726", "Abdomen"]])
    model = HashModel()
    out = run_evaluation(model, ["rocov2-retrieval", "rocov2-modality", "rocov2-concepts"], {"rocov2": str(root)},
                         tmp_path / "out", pool_size=4, n_pools=2, progress=False, concept_top_k=2)
    assert out["tasks"]["rocov2-retrieval"]["n"] == 9
    assert out["tasks"]["rocov2-modality"]["n"] == 9
    assert {c["name"] for c in out["tasks"]["rocov2-concepts"]["concepts"]} <= {
        "Abdomen", "X-Ray Computed Tomography", "Magnetic Resonance Imaging", "Plain x-ray"}
    assert set(model.seen.values()) == {1}
    assert out["data"] == {"rocov2": str(root)}


def test_real_tiny_model_retrieval_and_tgit(tmp_path):
    from fuselip_med.core.fuselip import FuseLIP, FuseLIPConfig

    torch.manual_seed(0)
    model = FuseLIP(FuseLIPConfig.from_size("tiny")).eval()
    root = tmp_path / "rocov2"
    root.mkdir()
    _official_rocov2(root, "test", 4)
    out = run_evaluation(model, ["rocov2-retrieval", "tgit", "tgit-med"], {"rocov2_test": root}, tmp_path / "out",
                         tgit_images=1, progress=False, batch_size=16)
    assert out["tasks"]["rocov2-retrieval"]["n"] == 4
    for task in ("tgit", "tgit-med"):
        res = out["tasks"][task]
        assert res["n_images"] == 1 and 0.0 <= res["metrics"]["mean_accuracy"] <= 1.0
    assert len(out["tasks"]["tgit"]["per_kind"]) == 5 and len(out["tasks"]["tgit-med"]["per_kind"]) == 7
