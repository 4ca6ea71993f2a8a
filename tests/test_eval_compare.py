"""``fuselip-med eval`` with several ``--model`` values: one comparison table (markdown + JSON + bar plot)."""
import json

import pytest
import torch
from typer.testing import CliRunner

from fuselip_med.cli import app
from fuselip_med.core.loading import build_model
from fuselip_med.core.pretrained import save_pretrained
from fuselip_med.data.demo import write_demo_dataset
from fuselip_med.eval.compare import model_labels, plot_comparison, render_comparison_markdown


def test_model_labels_from_paths_and_explicit_labels():
    assert model_labels(["runs/a/final", "sf=runs/b/final", "runs/c", "runs/c/"]) == {
        "a/final": "runs/a/final", "sf": "runs/b/final", "c": "runs/c", "c#2": "runs/c/"}
    with pytest.raises(ValueError, match="LABEL=CHECKPOINT"):
        model_labels(["=runs/a"])


def test_markdown_marks_the_best_model_per_metric_and_the_plot_draws_the_values(tmp_path):
    comparison = {"models": {"fuselip": "x", "sf": "y"},
                  "metrics": {"r/R@1": {"fuselip": 0.5, "sf": 0.25}, "r/mean_rank": {"fuselip": 3.0, "sf": 7.0},
                              "t/acc": {"fuselip": 0.1, "sf": 0.9}}}
    lines = render_comparison_markdown(comparison).splitlines()
    assert "| r/R@1 | **0.5000** | 0.2500 |" in lines and "| t/acc | 0.1000 | **0.9000** |" in lines
    assert "| r/mean_rank | **3.0000** | 7.0000 |" in lines  # ranks: lower is better
    drawn = plot_comparison(comparison, tmp_path / "c.png")
    assert drawn == {"fuselip": [0.5, 0.1], "sf": [0.25, 0.9]}  # mean_rank is not a [0, 1] score
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_cli_compares_fuselip_and_a_baseline_in_one_table(tmp_path):
    data = write_demo_dataset(tmp_path / "demo", n_train=4, n_valid=4, n_test=12, n_dicom=0)
    torch.manual_seed(0)
    save_pretrained(build_model("tiny"), tmp_path / "early")
    save_pretrained(build_model("tiny", arch="siglip_sf"), tmp_path / "late")
    out = tmp_path / "cmp"
    result = CliRunner().invoke(app, ["eval", "-m", f"fuselip={tmp_path / 'early'}", "-m", f"sf={tmp_path / 'late'}",
                                      "-t", "rocov2-retrieval,rocov2-modality", "-d", f"rocov2={data}",
                                      "--out", str(out),
                                      "--pool-size", "8", "--n-pools", "1", "--num-workers", "0"])
    assert result.exit_code == 0, result.output
    comparison = json.loads((out / "comparison.json").read_text())
    assert list(comparison["models"]) == ["fuselip", "sf"]
    for label in ("fuselip", "sf"):
        single = json.loads((out / label / "metrics.json").read_text())
        r1 = single["tasks"]["rocov2-retrieval"]["metrics"]["image_to_text_R@1"]
        assert comparison["metrics"]["rocov2-retrieval/image_to_text_R@1"][label] == r1
    assert "rocov2-modality/accuracy" in comparison["metrics"]
    table = (out / "comparison.md").read_text()
    assert "| metric | fuselip | sf |" in table and "rocov2-retrieval/image_to_text_R@1" in table
    assert (out / "comparison.png").stat().st_size > 0
