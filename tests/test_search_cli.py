"""`fuselip-med index build` and `search` end to end through the CLI with a tiny FuseLIP saved in the test."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fuselip_med.cli import app
from fuselip_med.core.fuselip import FuseLIP, FuseLIPConfig
from fuselip_med.core.pretrained import save_pretrained
from fuselip_med.search.index import open_index
from tests.search_helpers import make_folder

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
runner = CliRunner()


def tiny_model(path, seed: int):
    import torch

    torch.manual_seed(seed)
    return save_pretrained(FuseLIP(FuseLIPConfig.from_size("tiny")).eval(), path)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("search_cli")
    folder, model = make_folder(root / "images", patterned=True), tiny_model(root / "model", 0)
    result = runner.invoke(app, ["index", "build", "--model", str(model), "--input", str(folder),
                                 "--out", str(root / "index"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return root, folder, model


def run_search(root, *args):
    return runner.invoke(app, ["search", "--index", str(root / "index"), *args])


def test_build_reports_and_writes_the_index(built):
    root, folder, model = built
    index = open_index(root / "index")
    assert len(index) == 5 and index.model.name == str(model) and index.dim == 64
    assert sorted(index.meta["id"]) == ["blue.png", "ct.dcm", "green.png", "red.png", "yellow.png"]


def test_search_by_image_finds_the_same_image_first(built):
    root, folder, _ = built
    for name in ("ct.dcm", "green.png", "yellow.png"):
        result = run_search(root, "--image", str(folder / name), "-k", "3", "--json")
        assert result.exit_code == 0, result.output
        hits = json.loads(result.output)
        assert len(hits) == 3 and hits[0]["id"] == name and hits[0]["score"] == pytest.approx(1.0, abs=2e-3)


def test_search_by_text_and_by_image_with_instruction(built):
    root, folder, _ = built
    text = run_search(root, "--text", "a grey ct slice", "-k", "5", "--json")
    assert text.exit_code == 0, text.output
    assert sorted(h["id"] for h in json.loads(text.output)) == sorted(open_index(root / "index").meta["id"])
    fused = run_search(root, "--image", str(folder / "red.png"), "--text", "the same, but green", "--json")
    image_only = run_search(root, "--image", str(folder / "red.png"), "--json")
    scores = [json.loads(r.output)[0]["score"] for r in (fused, image_only)]
    assert scores[0] != pytest.approx(scores[1], abs=1e-4)  # the instruction changes the query
    table = run_search(root, "--text", "red", "-k", "2")
    assert table.exit_code == 0 and "rank" in table.output and "caption" in table.output


def test_search_with_another_model_is_refused(built, tmp_path):
    root, folder, _ = built
    other = tiny_model(tmp_path / "other", 1)
    result = run_search(root, "--text", "red", "--model", str(other))
    assert result.exit_code == 1
    message = " ".join(result.output.split())  # the console wraps long lines
    assert message.startswith("error:") and "was built with model" in message
    rebuild = runner.invoke(app, ["index", "build", "--model", str(other), "--input", str(folder), "--out",
                                  str(root / "index"), "--device", "cpu"])
    assert rebuild.exit_code == 1 and "--rebuild" in " ".join(rebuild.output.split())


def test_search_needs_a_query_and_an_index(built, tmp_path):
    root, _, _ = built
    assert run_search(root).exit_code == 2
    missing = runner.invoke(app, ["search", "--index", str(tmp_path), "--text", "x"])
    assert missing.exit_code == 1 and "not a search index" in " ".join(missing.output.split())


@pytest.mark.slow
def test_accelerate_launch_two_processes_builds_the_single_process_index(built, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root, folder, model = built
    repo = Path(__file__).parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    completed = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
         "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "fuselip_med.cli", "index", "build", "-m",
         str(model), "-i", str(folder), "-o", str(tmp_path / "two"), "--chunk-size", "2"],
        cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    message = " ".join(completed.stdout.split())
    assert "embedded 3 images (+2 by other processes" in message  # chunks 0, 2 here; chunk 1 on process 1
    single = open_index(root / "index")
    two = open_index(tmp_path / "two")
    assert two.manifest["generation"] == single.manifest["generation"]
    assert two.meta.drop(columns="mtime_ns").equals(single.meta.drop(columns="mtime_ns"))
