"""Damaged checkpoints fail with one line naming the file; every CLI command turns it into `error: ...`, exit 1."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fuselip_med import load_model
from fuselip_med.cli import app
from fuselip_med.core.checkpoints import export_reference
from fuselip_med.core.fuselip import FuseLIP, FuseLIPConfig
from fuselip_med.core.hub import CheckpointError
from fuselip_med.core.pretrained import save_pretrained

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return FuseLIP(FuseLIPConfig.from_size("tiny")).eval()


@pytest.fixture()
def corrupt_safetensors(tmp_path, tiny):
    """A saved model whose safetensors header length claims more bytes than the file holds."""
    folder = tmp_path / "model"
    save_pretrained(tiny, folder)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[:8] = (10**12).to_bytes(8, "little")
    weights.write_bytes(bytes(data))
    return folder


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    Image.fromarray(np.full((32, 32, 3), 120, dtype=np.uint8)).save(folder / "a.png")
    (folder / "a.txt").write_text("CT of the chest")
    return folder


def one_error_line(output: str, *needles: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, output
    assert "Traceback" not in output
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def test_corrupt_safetensors_header_names_the_file(corrupt_safetensors):
    with pytest.raises(CheckpointError, match=r"model\.safetensors is damaged") as error:
        load_model(corrupt_safetensors)
    assert "\n" not in str(error.value)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is damaged"):
        FuseLIP.from_pretrained(corrupt_safetensors)


@pytest.mark.parametrize("command", ["info", "embed", "eval"])
def test_every_command_reports_a_corrupt_checkpoint_in_one_line(command, corrupt_safetensors, image_folder, tmp_path):
    args = {
        "info": ["info", str(corrupt_safetensors)],
        "embed": ["embed", "-m", str(corrupt_safetensors), "-i", str(image_folder), "-o", str(tmp_path / "e.npy"),
                  "--num-workers", "0"],
        "eval": ["eval", "-m", str(corrupt_safetensors), "-d", f"rocov2={image_folder}", "-o", str(tmp_path / "ev")],
    }[command]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    one_error_line(result.output, "model.safetensors", "damaged")


def test_console_script_prints_no_traceback_unless_debug(corrupt_safetensors):
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "60"}
    env.pop("FUSELIP_MED_DEBUG", None)
    plain = subprocess.run([sys.executable, "-m", "fuselip_med.cli", "info", str(corrupt_safetensors)],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 1
    one_error_line(plain.stdout + plain.stderr, "model.safetensors")  # one line even at 60 columns
    debug = subprocess.run([sys.executable, "-m", "fuselip_med.cli", "--debug", "info", str(corrupt_safetensors)],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "CheckpointError" in debug.stderr
    by_env = subprocess.run([sys.executable, "-m", "fuselip_med.cli", "info", str(corrupt_safetensors)], cwd=REPO,
                            env={**env, "FUSELIP_MED_DEBUG": "1"}, capture_output=True, text=True, timeout=120)
    assert by_env.returncode == 1 and "Traceback" in by_env.stderr


def test_truncated_pytorch_model_bin(tmp_path, tiny):
    export_reference(tiny, tmp_path / "released")
    weights = tmp_path / "released" / "pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*damaged") as error:
        load_model(tmp_path / "released")
    assert "\n" not in str(error.value)
    result = runner.invoke(app, ["info", str(tmp_path / "released")])
    assert result.exit_code == 1
    one_error_line(result.output, "pytorch_model.bin")


def test_truncated_safetensors(tmp_path, tiny):
    save_pretrained(tiny, tmp_path / "model")
    weights = tmp_path / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is damaged"):
        load_model(tmp_path / "model")


def test_config_that_does_not_match_the_weights(tmp_path, tiny):
    save_pretrained(tiny, tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    config.update(width=128, heads=4)
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as error:
        load_model(tmp_path / "model")
    message = str(error.value)
    assert "model.safetensors" in message and "config.json" in message and "wrong shapes" in message
    assert "positional_embedding: checkpoint (180, 64) vs model (180, 128)" in message and "\n" not in message
    result = runner.invoke(app, ["embed", "-m", str(tmp_path / "model"), "-i", str(tmp_path), "-o", "x.npy"])
    assert result.exit_code == 1


def test_missing_keys_are_capped_in_the_message(tmp_path, tiny):
    from safetensors.torch import load_file, save_file

    save_pretrained(tiny, tmp_path / "model")
    weights = tmp_path / "model" / "model.safetensors"
    state = {k: v for k, v in load_file(str(weights)).items() if not k.startswith("transformer.")}
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match=r"missing keys \(32\): .*, \.\.\. and 24 more"):
        load_model(tmp_path / "model")


def test_missing_and_invalid_config_json(tmp_path, tiny):
    save_pretrained(tiny, tmp_path / "model")
    config_path = tmp_path / "model" / "config.json"
    good = config_path.read_text()
    config_path.unlink()  # a tiny model's shapes match no released size: the missing config is named
    with pytest.raises(CheckpointError, match=r"config\.json is missing and the architecture cannot be inferred"):
        load_model(tmp_path / "model")
    config_path.write_text(good[:40])
    with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON"):
        load_model(tmp_path / "model")
    config_path.write_text(json.dumps({**json.loads(good), "titok": {"no_such_field": 1}}))
    with pytest.raises(CheckpointError, match=r"config\.json is not a valid FuseLIPConfig"):
        load_model(tmp_path / "model")
    config_path.write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"config\.json holds a JSON list"):
        load_model(tmp_path / "model")
    result = runner.invoke(app, ["merge-lora", str(tmp_path / "model"), "--out", str(tmp_path / "m")])
    assert result.exit_code == 1
    one_error_line(result.output, "not a LoRA adapter folder")


def test_bugs_still_raise(monkeypatch, tmp_path, tiny):
    save_pretrained(tiny, tmp_path / "model")

    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug, not a user error")

    monkeypatch.setattr("fuselip_med.core.checkpoints.read_model_files", bug)
    result = runner.invoke(app, ["info", str(tmp_path / "model")])
    assert result.exit_code == 1 and isinstance(result.exception, ZeroDivisionError)


def test_finetune_with_a_corrupt_init_reports_it_in_one_line(corrupt_safetensors, tmp_path):
    from fuselip_med.data.demo import write_demo_dataset

    data = write_demo_dataset(tmp_path / "demo", n_train=8, n_valid=4, n_test=4, n_dicom=0)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: broken_init\nmodel: {{size: tiny, init: '{corrupt_safetensors}'}}\n"
                      f"data: {{train: [{{name: rocov2, path: '{data}'}}], num_workers: 0}}\n"
                      f"train: {{steps: 1, batch_size: 4, precision: fp32}}\neval: {{at_start: false, at_end: false}}\n"
                      f"logging: {{progress: false}}\noutput: {{dir: '{tmp_path / 'run'}'}}\n")
    result = runner.invoke(app, ["finetune", "--recipe", str(recipe)])
    assert result.exit_code == 1, result.output
    one_error_line(result.output, "model.safetensors", "damaged")


def test_a_file_that_is_no_checkpoint_never_repeats_torchs_advice_to_load_unsafely(tmp_path):
    """`info photo.jpg` quoted torch's "Re-running torch.load with weights_only set to False will likely
    succeed ..." (advice to execute the file) and ended with '..'."""
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "photo.jpg")
    result = runner.invoke(app, ["info", str(tmp_path / "photo.jpg")])
    message = " ".join(result.output.split())
    assert result.exit_code == 1 and message.startswith("error:") and "photo.jpg" in message
    assert "weights_only set to" not in message and "False" not in message and ".." not in message


def test_a_code_executing_pickle_is_refused_in_one_line_without_torch_warnings(tmp_path):
    """Before: a pickle.dump'ed (protocol 4) pytorch_model.bin whose object runs os.system was refused, but torch's
    "Detected pickle protocol 4" UserWarning (two lines of torch source) was printed above the error line."""
    import pickle
    import warnings

    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"state_dict": Payload()}, protocol=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(CheckpointError, match="pytorch_model.bin"):
            load_model(str(folder))
    assert not marker.exists()
    assert [str(w.message) for w in caught] == []
