"""metrics.json / report.md / plots: one schema, atomic files, plots drawn from the stored numbers."""
import json

import pytest
from PIL import Image
from pydantic import ValidationError

from fuselip_med.eval.report import EvalReport, TaskResult, plot_confusion_matrix, plot_recall_curve, write_report


def _report():
    curve_i2t = [0.2, 0.4, 0.5, 0.6, 0.7]
    return {
        "model": "fake/model",
        "data": {"rocov2_test": "/data/rocov2 (test)"},
        "created": "2026-01-01T00:00:00+00:00",
        "fuselip_med_version": "0.1.0",
        "tasks": {
            "rocov2-retrieval": {
                "metrics": {"image_to_text_R@1": 0.2, "image_to_text_mean_rank": 3.5},
                "pool_size": 5, "n_pools": 3, "seed": 0, "n": 12,
                "recall_curve": {"image_to_text": curve_i2t, "text_to_image": [0.1, 0.3, 0.5, 0.5, 0.9]},
                "full_pool": {"pool_size": 12, "metrics": {"image_to_text_R@1": 0.1, "image_to_text_mean_rank": 6.0},
                              "recall_curve": {"image_to_text": [0.1] * 10, "text_to_image": [0.05] * 10}},
            },
            "rocov2-modality": {
                "metrics": {"accuracy": 0.5, "macro_f1": 0.4}, "n": 6,
                "confusion_matrix": {"labels": ["CT", "MRI"], "counts": [[2, 1], [2, 1]]},
                "per_class": {"CT": {"precision": 0.5, "recall": 0.67, "f1": 0.57, "support": 3},
                              "MRI": {"precision": 0.5, "recall": 0.33, "f1": 0.4, "support": 3}},
            },
        },
    }


def test_write_report_plots_show_the_stored_numbers(tmp_path):
    out = write_report(_report(), tmp_path)
    stored = json.loads((tmp_path / "metrics.json").read_text())
    assert stored["model"] == "fake/model" and stored["tasks"]["rocov2-retrieval"]["pool_size"] == 5
    drawn = out["drawn"]
    ret = stored["tasks"]["rocov2-retrieval"]
    assert drawn["rocov2-retrieval"]["recall_curve"]["pools of 5"] == ret["recall_curve"]
    assert drawn["rocov2-retrieval"]["recall_curve"]["full pool of 12"] == ret["full_pool"]["recall_curve"]
    cm = stored["tasks"]["rocov2-modality"]["confusion_matrix"]
    assert drawn["rocov2-modality"]["confusion_matrix"]["counts"] == cm["counts"]
    assert drawn["rocov2-modality"]["confusion_matrix"]["annotations"] == [[str(v) for v in r] for r in cm["counts"]]
    for paths in out["plots"].values():
        for p in paths:
            with Image.open(p) as im:
                im.verify()
            with Image.open(p) as im:
                assert im.format == "PNG" and im.size[0] > 100
    md = (tmp_path / "report.md").read_text()
    assert "| image_to_text_R@1 | 0.2000 | 0.1000 |" in md
    assert "| CT | 0.5000 | 0.6700 | 0.5700 | 3 |" in md
    assert "plots/rocov2-retrieval_recall_at_k.png" in md
    assert not [p for p in tmp_path.rglob("*.tmp")]  # atomic writes leave no temporaries


def test_plot_functions_return_what_they_draw(tmp_path):
    drawn = plot_recall_curve({"full": {"a_to_b": [0.1, 0.5, 1.0]}}, tmp_path / "r.png")
    assert drawn == {"full": {"a_to_b": [0.1, 0.5, 1.0]}}
    cm = plot_confusion_matrix(["x", "y", "z"], [[5, 0, 1], [0, 3, 0], [2, 0, 0]], tmp_path / "c.png")
    assert cm["counts"] == [[5, 0, 1], [0, 3, 0], [2, 0, 0]] and cm["annotations"][2] == ["2", "0", "0"]
    assert Image.open(tmp_path / "c.png").size[0] > 100


def test_schema_validation():
    with pytest.raises(ValidationError):
        TaskResult(metrics={"curve": [0.1, 0.2]})  # metrics hold scalars only
    r = TaskResult(metrics={"a": 1}, extra_field={"k": 1})
    assert r.metrics == {"a": 1.0} and r.model_extra == {"extra_field": {"k": 1}}
    with pytest.raises(ValidationError):
        EvalReport(model="m", created="now", fuselip_med_version="0", unknown=1)
