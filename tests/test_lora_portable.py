"""LoRA adapters written by training work from any folder, with PEFT's own loader, and name a missing base."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from typer.testing import CliRunner

from fuselip_med import load_model
from fuselip_med.cli import app
from fuselip_med.core.checkpoints import export_reference
from fuselip_med.core.fuselip import FuseLIP, FuseLIPConfig
from fuselip_med.core.hub import CheckpointError, state_dict_sha256
from fuselip_med.core.lora import load_adapter, merge_adapter
from fuselip_med.core.pretrained import save_pretrained
from fuselip_med.data.demo import write_demo_dataset
from fuselip_med.recipes import recipe_from_dict
from fuselip_med.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


@torch.no_grad()
def outputs(model: FuseLIP) -> torch.Tensor:
    generator = torch.Generator().manual_seed(5)
    pixels = torch.rand(2, 3, 256, 256, generator=generator)
    texts = ["mri of the knee", "ct of the head"]
    return torch.cat([model.encode(images=pixels), model.encode(texts=texts), model.encode(images=pixels, texts=texts)])


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A 2-step LoRA run in ``work/`` whose recipe gives ``model.init`` as the relative path ``models/base``."""
    import os

    work = tmp_path_factory.mktemp("work")
    data = write_demo_dataset(work / "demo", n_train=24, n_valid=8, n_test=8, n_dicom=0)
    torch.manual_seed(11)
    export_reference(FuseLIP(FuseLIPConfig.from_size("tiny")).eval(), work / "models" / "base")
    recipe = recipe_from_dict({
        "name": "lora_portable",
        "model": {"size": "tiny", "init": "models/base", "lora": {
            "enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj", "c_fc"]}},
        "data": {"train": [{"name": "rocov2", "path": "demo", "split": "train"}], "num_workers": 0},
        "train": {"steps": 2, "batch_size": 8, "lr": 3e-2, "warmup_steps": 0, "precision": "fp32", "log_every": 1},
        "eval": {"at_start": False, "at_end": False},
        "checkpoint": {"every_steps": None},
        "logging": {"progress": False},
        "output": {"dir": "runs/lora"},
    })
    previous = os.getcwd()
    os.chdir(work)
    try:
        Trainer(recipe).run()
        in_folder = outputs(merge_adapter("runs/lora/final").eval())
    finally:
        os.chdir(previous)
    assert data.exists()
    return work, work / "runs" / "lora" / "final", in_folder


def test_adapter_records_an_absolute_hashed_base(lora_run):
    work, adapter, _ = lora_run
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((work / "models" / "base").resolve())
    pointer = json.loads((adapter / "fuselip_base.json").read_text())
    assert pointer["given_as"] == "models/base"
    base = FuseLIP.from_pretrained(work / "models" / "base")
    assert pointer["weights_sha256"] == state_dict_sha256(base.state_dict())


def test_adapter_loads_from_another_folder_and_with_peft_alone(lora_run, tmp_path, monkeypatch):
    work, adapter, in_folder = lora_run
    monkeypatch.chdir(tmp_path)
    elsewhere = outputs(load_model(adapter)[0])
    assert (elsewhere - in_folder).abs().max() < 1e-6
    base_path = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    peft_model = PeftModel.from_pretrained(FuseLIP.from_pretrained(base_path), str(adapter)).eval()
    assert (outputs(peft_model.get_base_model()) - in_folder).abs().max() < 1e-6
    trained = load_adapter(adapter).get_base_model()
    assert torch.equal(peft_model.get_base_model().logit_scale, trained.logit_scale)
    assert not torch.equal(trained.logit_scale, FuseLIP.from_pretrained(base_path).logit_scale)


def test_the_adapter_loads_in_a_fresh_process_elsewhere(lora_run, tmp_path):
    _, adapter, in_folder = lora_run
    out = tmp_path / "merged"
    completed = subprocess.run([sys.executable, "-m", "fuselip_med.cli", "merge-lora", str(adapter), "--out", str(out)],
                               cwd=tmp_path, capture_output=True, text=True, timeout=120,
                               env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert (outputs(FuseLIP.from_pretrained(out)) - in_folder).abs().max() < 1e-6


def test_a_moved_base_is_named_and_base_option_finds_it(lora_run, tmp_path):
    work, adapter, in_folder = lora_run
    copy = tmp_path / "adapter"
    shutil.copytree(adapter, copy)
    config_path = copy / "adapter_config.json"
    config = json.loads(config_path.read_text())
    gone = str(tmp_path / "moved_away")
    config["base_model_name_or_path"] = gone
    config_path.write_text(json.dumps(config))
    pointer = json.loads((copy / "fuselip_base.json").read_text())
    (copy / "fuselip_base.json").write_text(json.dumps({**pointer, "base_model": gone}))
    with pytest.raises(CheckpointError, match="moved_away.*--base"):
        load_adapter(copy)
    result = runner.invoke(app, ["info", str(copy)])
    assert result.exit_code == 1 and "--base" in result.output and "moved_away" in result.output
    moved = tmp_path / "base_copy"
    shutil.copytree(work / "models" / "base", moved)
    assert (outputs(merge_adapter(copy, base=moved)) - in_folder).abs().max() < 1e-6
    result = runner.invoke(app, ["info", str(copy), "--base", str(moved)])
    assert result.exit_code == 0, result.output
    assert "LoRA adapter" in result.output


def test_a_changed_base_is_refused(lora_run, tmp_path):
    work, adapter, _ = lora_run
    torch.manual_seed(99)
    save_pretrained(FuseLIP(FuseLIPConfig.from_size("tiny")), tmp_path / "other_base")
    with pytest.raises(CheckpointError, match="not the one LoRA adapter .* was trained on"):
        merge_adapter(adapter, base=tmp_path / "other_base")
    result = runner.invoke(app, ["merge-lora", str(adapter), "--base", str(tmp_path / "other_base"),
                                 "--out", str(tmp_path / "m")])
    assert result.exit_code == 1 and "sha256" in result.output and not (tmp_path / "m").exists()


def test_same_weights_in_another_format_are_accepted(lora_run, tmp_path):
    work, adapter, in_folder = lora_run
    save_pretrained(FuseLIP.from_pretrained(work / "models" / "base"), tmp_path / "as_safetensors")
    assert (outputs(merge_adapter(adapter, base=tmp_path / "as_safetensors")) - in_folder).abs().max() < 1e-6


def test_damaged_adapter_weights_fail_clearly(lora_run, tmp_path):
    _, adapter, _ = lora_run
    copy = tmp_path / "adapter"
    shutil.copytree(adapter, copy)
    weights = copy / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"adapter_model\.safetensors is damaged"):
        load_adapter(copy)


def test_adapter_weights_of_another_shape_name_the_mismatch_in_one_line(lora_run, tmp_path):
    """torch's load_state_dict error opens with a bare header ("Error(s) in loading state_dict for PeftModel:");
    the message must carry the line after it (which weight, which shapes), not the header alone."""
    from safetensors.torch import load_file, save_file

    _, adapter, _ = lora_run
    copy = tmp_path / "adapter"
    shutil.copytree(adapter, copy)
    weights = load_file(copy / "adapter_model.safetensors")
    name = next(key for key in weights if "lora_A" in key)
    weights[name] = torch.zeros(4, 7)
    save_file(weights, copy / "adapter_model.safetensors")
    result = CliRunner().invoke(app, ["merge-lora", str(copy), "--out", str(tmp_path / "merged")])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "does not fit its base model" in lines[0] and "size mismatch" in lines[0] and "[4, 7]" in lines[0]


def test_base_option_on_a_plain_model_is_an_error(tmp_path):
    save_pretrained(FuseLIP(FuseLIPConfig.from_size("tiny")), tmp_path / "plain")
    with pytest.raises(CheckpointError, match="LoRA adapters only"):
        load_model(tmp_path / "plain", base="x/y")
