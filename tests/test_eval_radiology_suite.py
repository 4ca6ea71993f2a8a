"""``eval --suite radiology --data-root DIR``: runs what DIR holds and writes radiology_table.md/.json/.png, every
number with its interval and row count."""
import json
import shutil

from typer.testing import CliRunner

import fuselip_med.cli as cli
from fuselip_med.eval.suite import radiology_table
from tests.radiology_fixtures import ScaledPlanted, write_chexpert
from tests.test_eval_med_vqa import write_vqa_rad
from tests.test_radcrepe import write_rocov2_test


def test_radiology_suite_runs_what_the_root_holds(tmp_path, monkeypatch):
    root = tmp_path / "radiology"
    write_vqa_rad(root / "VQA_RAD")
    write_rocov2_test(root / "ROCOv2_data", 10)
    (root / "findings").mkdir()
    for split, rows in (("test", [{"n": n, "Edema": "1.0" if n % 2 else "0.0"} for n in range(6)]),
                        ("valid", [{"n": 10 + n, "Edema": "1.0" if n % 2 else "0.0"} for n in range(4)])):
        shutil.move(write_chexpert(root, split, rows, patient0=100 * len(split)), root / "findings" / f"{split}.csv")
    monkeypatch.setattr(cli.common, "load_inference_model", lambda *a, **k: (ScaledPlanted(), None, None))
    out = tmp_path / "out"
    result = CliRunner().invoke(cli.app, ["-q", "eval", "-m", "planted", "--suite", "radiology", "--data-root",
                                          str(root), "-o", str(out), "--bootstrap", "50", "--labels",
                                          str(_labels(tmp_path))])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["tasks"]) == {"vqa-rad", "roco2k", "radcrepe", "findings"}
    table = json.loads((out / "radiology_table.json").read_text())
    assert table["rows"] == radiology_table(metrics)
    tasks = {r["task"] for r in table["rows"]}
    assert tasks == {"vqa-rad", "roco2k", "radcrepe", "findings"}
    for row in table["rows"]:
        assert row["ci"][0] <= row["value"] <= row["ci"][1] and row["n"] > 0
    md = (out / "radiology_table.md").read_text()
    assert "| findings | macro_AUROC |" in md and "| vqa-rad | closed_accuracy |" in md
    assert (out / "radiology_table.png").stat().st_size > 1000
    assert (out / "roco2k_rows.txt").read_text().count("\n") == 10


def _labels(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("Edema\n")
    return path


def test_radiology_suite_needs_some_data(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(cli.app, ["eval", "-m", "x", "--suite", "radiology", "--data-root",
                                          str(tmp_path / "empty")])
    assert result.exit_code != 0 and "holds none of" in result.output
