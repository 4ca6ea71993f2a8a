"""One loading door (issue 24): ``fuselip_med.load_model`` opens every checkpoint layout, LoRA adapters included,
and official training checkpoints with their harmless extras (open_clip issue 998) but nothing else."""
import argparse
import shutil

import numpy as np
import pytest
import torch

import fuselip_med
from fuselip_med.core.checkpoints import export_reference
from fuselip_med.core.configs import config_for
from fuselip_med.core.fuselip import FuseLIP, FuseLIPConfig
from fuselip_med.core.hub import CheckpointError
from fuselip_med.core.late_fusion import LateFusion
from fuselip_med.core.lora import apply_lora, save_adapter
from fuselip_med.core.pretrained import save_pretrained
from tests.test_hub import outputs, training_layout


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(4)
    return FuseLIP(FuseLIPConfig.from_size("tiny")).eval()


def layouts(model, root):
    """{layout: path} of every model layout, each holding ``model``."""
    ours = save_pretrained(model, root / "ours")
    released = export_reference(model, root / "released")
    bare = root / "bare"
    bare.mkdir()
    shutil.copy(ours / "model.safetensors", bare / "weights.safetensors")
    shutil.copy(ours / "config.json", bare / "config.json")
    shutil.copy(released / "pytorch_model.bin", root / "state_dict.bin")
    run = root / "runs" / "demo"
    save_pretrained(model, run / "final")
    extras = {"args": argparse.Namespace(lr=5e-4, model="ViT-S"), "val_loss": np.float64(0.25), "step": np.int64(7)}
    return {
        "ours": ours, "released": released, "bare safetensors": bare / "weights.safetensors",
        "bare released state dict": root / "state_dict.bin", "run folder": run,
        "official training .pt": training_layout(model, root, **extras),
    }


def test_every_model_layout_loads_through_load_model(tiny, tmp_path):
    expected = outputs(tiny)
    found = layouts(tiny, tmp_path)
    with pytest.raises(CheckpointError, match="save_pretrained"):  # no config.json: only released sizes are inferred
        fuselip_med.load_model(found.pop("bare released state dict"))
    for layout, path in found.items():
        model, preprocess, tokenizer = fuselip_med.load_model(path)
        assert not model.training and preprocess.image_size == 256 and tokenizer.vocab_size == 49_409, layout
        assert (outputs(model) - expected).abs().max() < 1e-6, layout


def test_lora_adapters_load_through_load_model(tiny, tmp_path):
    base = save_pretrained(tiny, tmp_path / "base")
    torch.manual_seed(1)
    lora = apply_lora(FuseLIP.from_pretrained(base), 2, 4, 0.0, ["q_proj", "v_proj"])
    for module in lora.modules():
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.05)  # a trained adapter changes outputs
    merged = outputs(lora.eval())
    adapter = save_adapter(lora, tmp_path / "runs" / "lora" / "final", str(base))
    assert (merged - outputs(tiny)).abs().max() > 1e-3
    for path in (adapter, adapter.parent):  # the adapter folder, and the run folder whose final it is
        model, _, _ = fuselip_med.load_model(path)
        assert (outputs(model) - merged).abs().max() < 1e-5
    moved = shutil.move(base, tmp_path / "moved_base")
    with pytest.raises(CheckpointError, match="--base"):
        fuselip_med.load_model(adapter)
    assert (outputs(fuselip_med.load_model(adapter, base=moved)[0]) - merged).abs().max() < 1e-5


def test_late_fusion_loads_through_load_model(tmp_path):
    torch.manual_seed(0)
    mlf = LateFusion(config_for("siglip_mlf", "tiny")).eval()
    model, preprocess, _ = fuselip_med.load_model(save_pretrained(mlf, tmp_path / "mlf"))
    assert isinstance(model, LateFusion) and model.config.arch == "siglip_mlf" and preprocess.image_size == 256
    assert torch.equal(outputs(model), outputs(mlf))


class Unexpected:
    """Stands in for any object other than the allowed extras (a pickled class could run code)."""


def test_other_objects_in_a_training_checkpoint_are_one_line_naming_the_type(tiny, tmp_path):
    path = training_layout(tiny, tmp_path, extra=Unexpected())
    renamed = path.with_name("epoch\x1b[31m_1.pt")
    path.rename(renamed)
    with pytest.raises(CheckpointError) as error:
        fuselip_med.load_model(renamed)
    message = str(error.value)
    assert "Unexpected" in message and "\n" not in message and "\x1b" not in message
    assert "weights_only=False" not in message and "safe_globals" not in message
