"""Damaged files on disk: every file of an index (and of a training checkpoint) is checked against the size and
SHA-256 recorded at commit; a damaged one is one line naming the file and the repair, and `index build` repairs it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fuselip_med.cli import app
from fuselip_med.search.index import IndexDamagedError, IndexSettings, ModelId, build_index, list_entries, open_index
from fuselip_med.search.query import check_model
from tests.search_helpers import KEEP_PATHS, PlantedEncoder, make_folder


def build(folder: Path, out: Path):
    entries, _ = list_entries(folder, privacy=KEEP_PATHS)
    encoder = PlantedEncoder()
    return build_index(out, entries, encoder, encoder.model_id, IndexSettings(), progress=False)


def cut_short(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("images"))


@pytest.mark.parametrize("role", ["image_faiss", "image_vectors", "meta", "caption_vectors", "manifest"])
def test_a_cut_index_file_is_named_with_the_repair_and_index_build_repairs_it(folder, tmp_path, role):
    out = tmp_path / "index"
    build(folder, out)
    manifest = json.loads((out / "manifest.json").read_text())
    damaged = out / ("manifest.json" if role == "manifest" else manifest["files"][role])
    cut_short(damaged)
    with pytest.raises(IndexDamagedError) as caught:
        open_index(out)
    message = str(caught.value)
    assert str(damaged) in message and "fuselip-med index build" in message and f"--out {out}" in message
    done = CliRunner().invoke(app, ["search", "--index", str(out), "--text", "red"])
    lines = done.output.strip().splitlines()
    assert done.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error:") and damaged.name in lines[0]
    report = build(folder, out)
    assert not report.up_to_date and report.repaired and damaged.name in report.repaired
    assert len(open_index(out)) == 5
    assert build(folder, out).up_to_date  # and the repaired index is whole


def test_search_with_changed_weights_under_the_same_name_advises_a_rebuild(folder, tmp_path):
    out = tmp_path / "index"
    build(folder, out)
    with pytest.raises(IndexDamagedError.__mro__[1], match=r"changed since .* --rebuild") as caught:
        check_model(open_index(out), ModelId("planted", "retrained"))
    assert "search with --model planted" not in str(caught.value)  # advice that cannot work is not given


def test_a_damaged_training_checkpoint_names_the_file_and_the_checkpoint_to_resume_from(tmp_path):
    from fuselip_med.train import checkpointing as ckpt

    directory = tmp_path / "checkpoints"
    for step in (2, 4):
        tmp = ckpt.temporary_dir(directory, step)
        ckpt.write_process_files(tmp, 0)
        ckpt.write_main_files(tmp, {"w": torch.ones(3)}, {"state": {}, "param_groups": []}, None, {"step": step},
                              "name: t\n", {})
        ckpt.commit(tmp, directory, step)
    cut_short(directory / "step_000004" / "optimizer.pt")
    with pytest.raises(ckpt.CheckpointDamagedError) as caught:
        ckpt.read_checkpoint(directory / "step_000004", 0)
    message = str(caught.value)
    assert str(directory / "step_000004" / "optimizer.pt") in message
    assert f"--resume {directory / 'step_000002'}" in message
    assert ckpt.read_checkpoint(directory / "step_000002", 0)["trainer_state"] == {"step": 2}
