"""Download the wheels a GPU machine without network needs to run this project next to its own torch.

``make gpu-wheels`` runs this: it resolves the project's dependencies for CPython 3.12 on manylinux x86-64
(``pip install --dry-run --report``: metadata only), drops torch and what torch brings (``nvidia-*``,
``triton``: the GPU machine's torch build has its own), downloads the rest as binary wheels with ``pip
download --no-deps --python-version 3.12 --platform manylinux2014_x86_64 --only-binary=:all:`` (plus
``manylinux_2_28_x86_64``, the tag of newer wheels) and builds this project's own wheel, all into ``.whl/``.
``benchmarks/gpu_check.sh`` installs them there with ``pip install --no-index --find-links .whl``.

    python benchmarks/gpu_wheels.py --out .whl
    python benchmarks/gpu_wheels.py --out .whl --python-version 3.11 --extra app
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_28_x86_64")
TORCH_OWN = re.compile(r"^(torch|triton|pytorch-triton.*|nvidia-.*)$")  # the GPU machine's torch brings these


def target_flags(python_version: str) -> list[str]:
    """pip's flags for wheels of another interpreter and platform."""
    flags = ["--python-version", python_version, "--implementation", "cp", "--only-binary=:all:"]
    for platform in PLATFORMS:
        flags += ["--platform", platform]
    return flags


def resolve(python_version: str, extras: list[str]) -> list[tuple[str, str]]:
    """(name, version) of every distribution the project needs on the target, torch and its own kin left out."""
    project = f"{REPO}[{','.join(extras)}]" if extras else str(REPO)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                        "--target", str(Path(tmp) / "target"), "--report", str(report),
                        *target_flags(python_version), project], check=True)
        installs = json.loads(report.read_text())["install"]
    pins = []
    for item in installs:
        metadata = item["metadata"]
        name = re.sub(r"[-_.]+", "-", metadata["name"]).lower()
        if name == "fuselip-med" or TORCH_OWN.match(name):
            continue
        pins.append((name, metadata["version"]))
    return sorted(pins)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / ".whl", help="wheel folder (default .whl/)")
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python (default 3.12)")
    parser.add_argument("--extra", action="append", default=[], help="a project extra to include too (app, ...)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    pins = resolve(args.python_version, args.extra)
    requirements = args.out / "requirements.txt"
    requirements.write_text("".join(f"{name}=={version}\n" for name, version in pins))
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(args.out),
                    *target_flags(args.python_version), "-r", str(requirements)], check=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(args.out),
                    str(REPO)], check=True)
    wheels = sorted(args.out.glob("*.whl"))
    print(f"{len(wheels)} wheels in {args.out} for CPython {args.python_version} "
          f"({sum(w.stat().st_size for w in wheels) / 2**20:.0f} MiB; torch, triton and nvidia-* left out)")


if __name__ == "__main__":
    main()
