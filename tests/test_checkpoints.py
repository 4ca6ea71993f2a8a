"""Checkpoint formats: released hub layout, training checkpoints, our safetensors layout, strict errors."""
import json
import pickle

import pytest
import torch

from fuselip_med import load_model
from fuselip_med.core.checkpoints import export_reference, read_checkpoint
from fuselip_med.core.fuselip import FuseLIP, FuseLIPConfig
from fuselip_med.core.hub import CheckpointError
from fuselip_med.core.pretrained import save_pretrained
from tests.reference_impl import random_released_state_dict, released_text_tower_shapes, titok_shapes


def write_released(directory, size: str, seed: int = 0):
    """A released-layout checkpoint (config.json + pytorch_model.bin) built from the key table, not our model."""
    config = FuseLIPConfig.from_size(size)
    tower = released_text_tower_shapes(config.width, config.layers, config.vocab_size)
    titok = config.titok
    image = titok_shapes(titok.width, titok.layers, titok.token_size, titok.codebook_size)
    shapes = {**{k: v for k, v in tower.items() if k in ("positional_embedding", "logit_scale", "logit_bias")},
              **{f"image_tokenizer.model.{k}": v for k, v in image.items()},
              **{k: v for k, v in tower.items() if k not in ("positional_embedding", "logit_scale", "logit_bias")}}
    state = random_released_state_dict(shapes, seed)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / "pytorch_model.bin")
    (directory / "config.json").write_text(json.dumps(config.to_reference_dict(), indent=2))
    return state


def sample_inputs(model):
    generator = torch.Generator().manual_seed(1)
    pixels = torch.rand(2, 3, 256, 256, generator=generator)
    texts = ["CT chest axial view", "a photo of a cat."]
    return pixels, texts


@torch.no_grad()
def outputs(model):
    pixels, texts = sample_inputs(model)
    return torch.cat([model.encode(images=pixels), model.encode(texts=texts), model.encode(images=pixels, texts=texts)])


def test_released_small_layout_loads_and_round_trips(tmp_path):
    state = write_released(tmp_path / "released", "small")
    assert len(state) == 265
    model, preprocess, tokenizer = load_model(tmp_path / "released")
    assert not model.training and preprocess.image_size == 256 and tokenizer.vocab_size == 49_409
    assert model.config.transformer_size == "small" and model.config.vocab_size == 53_505
    q_weight = model.transformer.resblocks[3].attn.q_proj.weight
    assert torch.equal(q_weight, state["transformer.resblocks.3.attn.in_proj_weight"][:384])
    before = outputs(model)
    save_pretrained(model, tmp_path / "ours")
    reloaded, _, _ = load_model(tmp_path / "ours")
    assert (before - outputs(reloaded)).abs().max() < 1e-6


@pytest.fixture()
def tiny_model():
    torch.manual_seed(0)
    return FuseLIP(FuseLIPConfig.from_size("tiny")).eval()


def test_export_reference_then_load_reproduces_outputs(tmp_path, tiny_model):
    export_reference(tiny_model, tmp_path / "ref")
    state = torch.load(tmp_path / "ref" / "pytorch_model.bin", weights_only=True)
    assert "transformer.resblocks.0.attn.in_proj_weight" in state
    assert torch.equal(state["mask_prediction_head.decoder.weight"], state["token_embedding.weight"])
    loaded, _, _ = load_model(tmp_path / "ref")
    assert (outputs(loaded) - outputs(tiny_model)).abs().max() < 1e-6


def test_training_checkpoint_with_module_prefix(tmp_path, tiny_model):
    export_reference(tiny_model, tmp_path / "ref")
    released = torch.load(tmp_path / "ref" / "pytorch_model.bin", weights_only=True)
    run = tmp_path / "logs" / "run1"
    (run / "checkpoints").mkdir(parents=True)
    (run / "fuse-clip-config.json").write_text((tmp_path / "ref" / "config.json").read_text())
    payload = {"epoch": 3, "name": "run1", "state_dict": {f"module.{k}": v for k, v in released.items()},
               "optimizer": {"state": {}, "param_groups": []}}
    torch.save(payload, run / "checkpoints" / "epoch_3.pt")
    _, _, fmt = read_checkpoint(run / "checkpoints" / "epoch_3.pt")
    assert fmt == "training"
    loaded, _, _ = load_model(run / "checkpoints" / "epoch_3.pt")
    assert (outputs(loaded) - outputs(tiny_model)).abs().max() < 1e-6


def test_missing_and_unexpected_keys_are_listed(tmp_path, tiny_model):
    export_reference(tiny_model, tmp_path / "ref")
    state = torch.load(tmp_path / "ref" / "pytorch_model.bin", weights_only=True)
    del state["ln_final.bias"]
    state["extra.thing"] = torch.zeros(1)
    torch.save(state, tmp_path / "ref" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): ln_final.bias.*unexpected keys \(1\): extra.thing"):
        load_model(tmp_path / "ref")


def test_untied_decoder_is_rejected(tmp_path, tiny_model):
    export_reference(tiny_model, tmp_path / "ref")
    state = torch.load(tmp_path / "ref" / "pytorch_model.bin", weights_only=True)
    state["mask_prediction_head.decoder.weight"] = state["token_embedding.weight"] + 1
    torch.save(state, tmp_path / "ref" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="tied"):
        load_model(tmp_path / "ref")


class Sneaky:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_code_is_refused(tmp_path):
    with open(tmp_path / "evil.pt", "wb") as handle:
        pickle.dump({"state_dict": Sneaky()}, handle)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_model(tmp_path / "evil.pt")


def test_hub_id_resolves_through_snapshot_download(tmp_path, tiny_model, monkeypatch):
    save_pretrained(tiny_model, tmp_path / "snap")
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None):
        calls.append(repo_id)
        return str(tmp_path / "snap")

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    model, _, _ = load_model("chs20/FuseLIP-S-CC3M-MM")
    assert calls == ["chs20/FuseLIP-S-CC3M-MM"]
    assert (outputs(model) - outputs(tiny_model)).abs().max() < 1e-6


def test_unknown_path_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="No checkpoint"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither"):
        load_model(tmp_path / "empty")


def test_save_pretrained_is_atomic_on_failure(tmp_path, tiny_model, monkeypatch):
    save_pretrained(tiny_model, tmp_path / "model")
    original = (tmp_path / "model" / "model.safetensors").read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("fuselip_med.core.pretrained.save_file", broken)
    with pytest.raises(OSError):
        save_pretrained(tiny_model, tmp_path / "model")
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
