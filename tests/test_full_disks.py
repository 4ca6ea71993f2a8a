"""Unwritable or full disks: the output location is checked before any work (one `error:` line naming it), a full
device is one line naming the folder and the space needed, nothing partial is left, and `--resume` works after."""
from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fuselip_med.cli import app
from fuselip_med.io import OutputError, atomic_write_bytes, check_writable

runner = CliRunner()


def mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                                                capture_output=True).returncode == 0


@pytest.fixture
def read_only(tmp_path):
    """A read-only folder: a read-only tmpfs as root (root ignores permission bits), mode 0555 otherwise."""
    folder = tmp_path / "ro"
    mounted = mount_tmpfs(folder, "ro,size=1m")
    if not mounted:
        folder.chmod(0o555)
    yield folder
    if mounted:
        subprocess.run(["umount", str(folder)], check=True)
    else:
        folder.chmod(0o755)


@pytest.fixture
def small_disk(tmp_path):
    folder = tmp_path / "small"
    if not mount_tmpfs(folder, "size=256k"):
        pytest.skip("mounting a small tmpfs needs root")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


COMMANDS = {
    "index build": lambda out, tmp: ["index", "build", "-m", str(tmp / "no-model"), "-i", str(tmp), "-o", str(out)],
    "embed": lambda out, tmp: ["embed", "-m", str(tmp / "no-model"), "-i", str(tmp), "-o", str(out / "e.npy")],
    "eval": lambda out, tmp: ["eval", "-m", str(tmp / "no-model"), "-d", f"rocov2={tmp}", "-o", str(out / "ev")],
    "synth-vqa": lambda out, tmp: ["data", "synth-vqa", "-i", str(tmp / "c.csv"), "-o", str(out / "qa.jsonl")],
    "data demo": lambda out, tmp: ["data", "demo", "-o", str(out / "demo")],
    "merge-lora": lambda out, tmp: ["merge-lora", str(tmp / "adapter"), "-o", str(out / "merged")],
    "finetune": lambda out, tmp: ["finetune", "-r", "rocov2_demo", "--set", f"output.dir={out / 'run'}"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_an_unwritable_output_is_one_line_before_any_work(command, read_only, tmp_path):
    (tmp_path / "c.csv").write_text("path,caption\na.png,a chest x-ray\n")
    result = runner.invoke(app, COMMANDS[command](read_only, tmp_path))
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0].startswith("error: cannot write to") and str(read_only) in lines[0]


def test_a_full_device_names_the_folder_and_the_space_and_keeps_the_old_file(small_disk):
    target = small_disk / "vectors.npy"
    atomic_write_bytes(target, b"old")
    with pytest.raises(OutputError) as caught:
        atomic_write_bytes(target, b"x" * 512 * 1024)
    message = str(caught.value)
    assert caught.value.errno == errno.ENOSPC and str(small_disk) in message and "512.0 KiB" not in message
    assert "no space left" in message and "524,288 bytes" in message
    assert target.read_bytes() == b"old" and [p.name for p in small_disk.iterdir()] == ["vectors.npy"]
    check_writable(small_disk)


def test_a_full_disk_while_checkpointing_is_one_line_and_resume_works(tmp_path, monkeypatch):
    import torch

    from fuselip_med.data.demo import write_demo_dataset
    from fuselip_med.train import checkpointing
    from tests.test_trainer import recipe_dict, run

    data = write_demo_dataset(tmp_path / "demo", n_train=24, n_valid=4, n_test=8, n_dicom=0)
    recipe = recipe_dict(tmp_path / "run", data, train={"steps": 4}, checkpoint={"every_steps": 2})
    original = torch.save

    def full_at_step_4(obj, path, *args, **kwargs):
        if "000004" in str(path) and "optimizer" in str(path):
            raise RuntimeError(f"[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
                               f"data/0: file write failed ({path})")
        return original(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpointing.torch, "save", full_at_step_4)
    with pytest.raises(OutputError, match=r"no space left on the device of .*checkpoints: about .* MiB more"):
        run(recipe)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["step_000002"]  # nothing partial left
    monkeypatch.setattr(checkpointing.torch, "save", original)
    assert run(recipe, resume="latest").steps == 4
