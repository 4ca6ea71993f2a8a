"""ROCOv2-VQA: the adapter (JSONL from `data synth-vqa`, or rules on the fly over a ROCOv2 split; questions of
one image grouped as hard negatives), the VQA retrieval eval task, and the rocov2_mm recipe on demo data."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fuselip_med.data.adapters import BadRowError, DatasetNotFoundError, get_adapter
from fuselip_med.data.schema import Sample, SampleSide
from fuselip_med.eval.runner import TASKS, run_evaluation
from fuselip_med.eval.vqa import evaluate_vqa_retrieval
from fuselip_med.inference.engine import Embedder
from tests.test_eval_fakes import _unit
from tests.test_synth_rules import write_rocov2

REPO = Path(__file__).resolve().parents[1]


def record(image_id, image, question, answer, qtype="modality", **extra):
    return json.dumps({"id": image_id, "image": image, "question": question, "answer": answer, "qtype": qtype,
                       "generator": "rules", "model": None, "prompt_version": "rules-v1", **extra})


def test_jsonl_records_groups_and_skips(tmp_path):
    write_rocov2(tmp_path / "rocov2")
    image = "rocov2/train_images/train/ROCOv2_2023_train_000001.jpg"
    lines = [record("ROCOv2_2023_train_000001", image, f"Question {k}?", f"answer {k}", "side") for k in range(5)]
    lines += [
        record("ROCOv2_2023_train_000007", None, "What imaging modality is this?", "X-ray"),  # found via images=
        "{not json",
        record("ROCOv2_2023_train_000001", image, "Empty?", ""),
        record("gone", "rocov2/missing.jpg", "Where?", "left"),
        "",
    ]
    file = tmp_path / "vqa.jsonl"
    file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    source = get_adapter("rocov2_vqa")(str(file), split="train", images=str(tmp_path / "rocov2"), group_size=2)
    assert len(source) == 6 and source.name == "rocov2_vqa/train"
    assert dict(source.skipped) == {"bad json line": 1, "empty answer": 1, "missing image": 1}
    assert source.groups() == [[0, 1], [2, 3], [4], [5]]
    first = source[0]
    assert (first.query.image, first.query.text, first.target.text, first.target.image) == (
        str(tmp_path / image), "Question 0?", "answer 0", None)
    assert first.group == source[1].group != source[2].group and first.meta["qtype"] == "side"
    assert source[5].query.image.endswith("ROCOv2_2023_train_000007.jpg") and source[5].target.text == "X-ray"
    only = get_adapter("rocov2_vqa")(str(file), images=str(tmp_path / "rocov2"), qtypes=["modality"])
    assert [s.target.text for s in only] == ["X-ray"]
    with pytest.raises(BadRowError, match="line 7: bad json line"):
        get_adapter("rocov2_vqa")(str(file), images=str(tmp_path / "rocov2"), strict=True)
    with pytest.raises(DatasetNotFoundError, match="synth-vqa"):
        get_adapter("rocov2_vqa")(str(tmp_path / "none.jsonl"))


def test_rules_on_the_fly_from_a_rocov2_folder(tmp_path):
    write_rocov2(tmp_path / "rocov2")
    source = get_adapter("rocov2_vqa")(str(tmp_path / "rocov2"), split="train")
    assert [(s.meta["qtype"], s.target.text) for s in source] == [
        ("modality", "CT"), ("plane", "axial"), ("abnormality", "cyst"), ("side", "left"),
        ("location", "left kidney"), ("size", "2 cm"), ("modality", "X-ray"), ("region", "chest"),
        ("projection", "AP")]
    assert source.groups() == [[0, 1, 2, 3], [4, 5], [6, 7, 8]]  # groups of up to 4 questions per image
    assert all(Path(s.query.image).is_file() for s in source)


ANSWERS = ["CT", "MRI", "left", "right upper lobe", "5 mm"]


class AnswerModel(torch.nn.Module):
    """Texts embed to a hash of their words; an (image, question) pair embeds to the answer that the image's
    pixel value names, so the VQA task has a known result."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def encode(self, images=None, texts=None, **_):
        if images is None:
            return torch.stack([_unit(t.lower(), 16) for t in texts])
        return torch.stack([_unit(ANSWERS[int(round(float(px[0, 0, 0]) * 10))].lower(), 16) for px in images])


def vqa_samples() -> list[Sample]:
    # (the answer the image "shows", the recorded answer): the last two disagree, so they rank the answer lower
    cases = [(0, "CT"), (1, "MRI"), (2, "left"), (3, "right upper lobe"), (4, "5 mm"), (0, "ct"), (2, "MRI"),
             (4, "left")]
    return [Sample(id=f"s{i}", source="rocov2_vqa",
                   query=SampleSide(image=torch.full((3, 4, 4), shown / 10), text=f"question {i}?"),
                   target=SampleSide(text=answer), meta={"qtype": "side" if i % 2 else "modality"})
            for i, (shown, answer) in enumerate(cases)] + [
        Sample(id="x", source="rocov2", target=SampleSide(text="no image"))]


def test_vqa_retrieval_scores_the_answer_pool():
    embedder = Embedder(AnswerModel(), decode=lambda x: x, progress=False)
    res = evaluate_vqa_retrieval(embedder, vqa_samples())
    assert res["pool_size"] == 5 and res["n"] == 8  # "ct" and "CT" are one answer
    assert res["metrics"]["vqa_R@1"] == res["metrics"]["accuracy"] == 6 / 8
    assert res["metrics"]["chance_R@1"] == 1 / 5 and res["metrics"]["vqa_R@5"] == 1.0
    assert res["per_qtype"] == {"modality": {"R@1": 0.75, "n": 4}, "side": {"R@1": 0.75, "n": 4}}
    assert res["skipped"] == {"not an (image + question -> answer) sample": 1}


def test_vqa_task_is_registered_in_the_runner(tmp_path):
    assert "rocov2-vqa" in TASKS
    out = run_evaluation(AnswerModel(), ["rocov2-vqa"], {"rocov2_vqa": vqa_samples()}, tmp_path,
                         decode=lambda x: x, progress=False)
    assert out["tasks"]["rocov2-vqa"]["metrics"]["vqa_R@1"] == 6 / 8
    with pytest.raises(ValueError, match="rocov2_vqa"):
        run_evaluation(AnswerModel(), ["rocov2-vqa"], {}, tmp_path)


@pytest.mark.slow
def test_rocov2_mm_recipe_trains_and_vqa_improves(tmp_path):
    from fuselip_med.data.demo import write_demo_dataset

    demo = write_demo_dataset(tmp_path / "demo", n_train=96, n_valid=8, n_test=48, n_dicom=0)
    paths = [f"--set=data.{part}.path={demo}" for part in ("train.0", "train.1", "eval.0", "eval.1")]
    done = subprocess.run(
        [sys.executable, "-m", "fuselip_med.cli", "finetune", "--recipe", "rocov2_mm", *paths,
         "--set", "train.steps=80", "--set", "train.batch_size=32", "--set", "checkpoint.every_steps=null",
         "--set", f"output.dir={tmp_path / 'run'}", "--set", "eval.pool_size=48"],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    before, after = (json.loads((tmp_path / "run" / "eval" / tag / "metrics.json").read_text())["tasks"]["rocov2-vqa"]
                     for tag in ("start", "final"))
    assert after["metrics"]["vqa_R@1"] > before["metrics"]["vqa_R@1"] + 0.1
    assert after["metrics"]["vqa_R@1"] > 3 * after["metrics"]["chance_R@1"]


def test_parquet_mirror_records_find_their_images_by_id(tmp_path):
    from fuselip_med.data.synth.run import run_synth_vqa
    from tests.test_adapters_rocov2 import decode_id, number_of, write_hf

    mirror = write_hf(tmp_path / "ROCOv2-radiology")
    out = tmp_path / "vqa.jsonl"
    report = run_synth_vqa(str(mirror), out)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"][-6:], r["answer"], r["image"]) for r in lines] == [
        ("000001", "CT", None), ("000004", "X-ray", None), ("000004", "chest", None), ("000004", "PA", None),
        ("000011", "ultrasound", None)]
    assert report.skipped_rows == {"duplicate id": 2, "empty caption": 1}
    source = get_adapter("rocov2_vqa")(str(out), images=str(mirror))
    assert [decode_id(s.query.image) for s in source] == [number_of(r["id"]) for r in lines]
    assert source.groups() == [[0], [1, 2, 3], [4]]
