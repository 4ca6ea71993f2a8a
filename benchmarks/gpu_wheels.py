"""Download the wheels a GPU machine without network needs to run this project next to its own torch.

``make gpu-wheels`` runs this: it resolves the project's dependencies for CPython 3.12 on manylinux x86-64
(``pip install --dry-run --report``: metadata only), drops torch and what torch brings (``nvidia-*``,
``triton``: the GPU machine's torch build has its own), downloads the rest as binary wheels with ``pip
download --no-deps --python-version 3.12 --platform manylinux2014_x86_64 --only-binary=:all:`` (plus
``manylinux_2_28_x86_64``, the tag of newer wheels) and builds this project's own wheel, all into ``.whl/``.
Dependencies published only as source (``langdetect``) are built here into pure-Python wheels first
(``py3-none-any``; a source-only package that would compile is an error naming it) and found by the
resolver through ``--find-links``.
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


def _report(project: str, flags: list[str]) -> list[dict]:
    """pip's install report (metadata only, nothing installed) for ``project`` under ``flags``."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                        "--target", str(Path(tmp) / "target"), "--report", str(report), *flags, project],
                       check=True)
        return json.loads(report.read_text())["install"]


def build_source_only(project: str, out: Path) -> list[str]:
    """Build wheels into ``out`` for the dependencies that the package index serves only as source archives
    (resolved for this interpreter); returns their names. Raises ``SystemExit`` naming a package whose wheel is
    not pure Python (it would need building on the target)."""
    built = []
    for item in _report(project, []):
        url = item.get("download_info", {}).get("url", "")
        name, version = item["metadata"]["name"], item["metadata"]["version"]
        if url.endswith(".whl") or url.startswith("file:") or TORCH_OWN.match(name.lower()):
            continue
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(out),
                        f"{name}=={version}"], check=True)
        wheel = next(out.glob(f"{re.sub(r'[-.]+', '_', name)}-{version}-*.whl"), None)
        if wheel is None or not wheel.name.endswith("-py3-none-any.whl") and "-py2.py3-none-any" not in wheel.name:
            raise SystemExit(f"{name} {version} is published only as source and does not build a pure-Python "
                             "wheel: build it on the GPU machine's Python instead")
        built.append(name)
    return built


def project_spec(extras: list[str]) -> str:
    """This checkout as a pip requirement, with ``extras``."""
    return f"{REPO}[{','.join(extras)}]" if extras else str(REPO)


def resolve(python_version: str, extras: list[str], find_links: Path) -> list[tuple[str, str]]:
    """(name, version) of every distribution the project needs on the target, torch and its own kin left out."""
    project = project_spec(extras)
    installs = _report(project, [*target_flags(python_version), "--find-links", str(find_links)])
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
    source_only = build_source_only(project_spec(args.extra), args.out)
    pins = resolve(args.python_version, args.extra, args.out)
    requirements = args.out / "requirements.txt"
    requirements.write_text("".join(f"{name}=={version}\n" for name, version in pins))
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(args.out),
                    "--find-links", str(args.out), *target_flags(args.python_version), "-r", str(requirements)],
                   check=True)
    if source_only:
        print(f"built pure-Python wheels of the source-only {', '.join(source_only)}")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(args.out),
                    str(REPO)], check=True)
    wheels = sorted(args.out.glob("*.whl"))
    print(f"{len(wheels)} wheels in {args.out} for CPython {args.python_version} "
          f"({sum(w.stat().st_size for w in wheels) / 2**20:.0f} MiB; torch, triton and nvidia-* left out)")


if __name__ == "__main__":
    main()
