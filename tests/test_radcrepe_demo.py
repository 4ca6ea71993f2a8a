"""Slow: fine-tune the demo model (``finetune --recipe rocov2_demo``, a few minutes on 2 cores), write RadCrepe from
the demo test split and report the demo model's accuracy per edit type (laterality first).

    python -m pytest tests/test_radcrepe_demo.py -m slow -s
"""
import json
import subprocess
import sys

import pytest


def fuselip_med(*args):
    proc = subprocess.run([sys.executable, "-m", "fuselip_med.cli", "-q", *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_demo_finetune_laterality(tmp_path):
    fuselip_med("data", "demo", "--out", str(tmp_path / "demo"))
    fuselip_med("data", "radcrepe", "--input", str(tmp_path / "demo"), "--out", str(tmp_path / "rc"))
    items = {k: len(json.loads((tmp_path / "rc" / f"{k}.json").read_text()))
             for k in ("laterality", "negation", "modality", "body_region", "size_number")}
    assert items["laterality"] > 0
    fuselip_med("finetune", "--recipe", "rocov2_demo", "--set", f"output.dir={tmp_path / 'run'}")
    fuselip_med("eval", "-m", str(tmp_path / "run" / "final"), "-t", "radcrepe", "-d", f"radcrepe={tmp_path / 'rc'}",
                "-o", str(tmp_path / "eval"), "--device", "cpu")
    after = json.loads((tmp_path / "eval" / "metrics.json").read_text())["tasks"]["radcrepe"]
    assert after["per_edit"]["laterality"]["n"] == items["laterality"]
    lines = [f"{k}: {v['accuracy']:.3f} [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}] n={v['n']}"
             for k, v in after["per_edit"].items() if v["n"]]
    print("\nRadCrepe after finetune --recipe rocov2_demo:\n  " + "\n  ".join(lines))
