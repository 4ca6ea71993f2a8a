"""Hub-native FuseLIP: from_pretrained over every layout, one atomic save path, model cards, push to a stand-in."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from typer.testing import CliRunner

from fuselip_med import load_model
from fuselip_med.cli import app
from fuselip_med.core.checkpoints import export_reference
from fuselip_med.core.fuselip import FuseLIP, FuseLIPConfig
from fuselip_med.core.hub import CheckpointError
from fuselip_med.core.lora import apply_lora, save_adapter
from fuselip_med.core.pretrained import save_pretrained
from fuselip_med.core.push import push_folder

runner = CliRunner()


@torch.no_grad()
def outputs(model: FuseLIP) -> torch.Tensor:
    generator = torch.Generator().manual_seed(2)
    pixels = torch.rand(2, 3, 256, 256, generator=generator)
    texts = ["chest x-ray, frontal", "axial ct of the abdomen"]
    return torch.cat([model.encode(images=pixels), model.encode(texts=texts), model.encode(images=pixels, texts=texts)])


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(4)
    return FuseLIP(FuseLIPConfig.from_size("tiny")).eval()


def training_layout(model: FuseLIP, root: Path, **extras) -> Path:
    """The official training checkpoint: logs/<run>/checkpoints/epoch_N.pt with a DDP-prefixed state_dict (and
    ``extras``, e.g. the run's ``args`` Namespace, beside it as open_clip's training writes them)."""
    export_reference(model, root / "ref")
    released = torch.load(root / "ref" / "pytorch_model.bin", weights_only=True)
    run = root / "logs" / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "fuse-clip-config.json").write_text((root / "ref" / "config.json").read_text())
    payload = {"epoch": 1, "state_dict": {f"module.{k}": v for k, v in released.items()}, **extras}
    torch.save(payload, run / "checkpoints" / "epoch_1.pt")
    return run / "checkpoints" / "epoch_1.pt"


@pytest.mark.parametrize("layout", ["released", "safetensors", "training"])
def test_from_pretrained_equals_load_model_for_every_layout(layout, tiny, tmp_path):
    if layout == "released":
        source = export_reference(tiny, tmp_path / "released")
    elif layout == "safetensors":
        source = save_pretrained(tiny, tmp_path / "ours")
    else:
        source = training_layout(tiny, tmp_path)
    hub_model = FuseLIP.from_pretrained(source)
    loaded, preprocess, tokenizer = load_model(source)
    assert not hub_model.training and preprocess.image_size == 256 and tokenizer.vocab_size == 49_409
    assert torch.equal(outputs(hub_model), outputs(loaded))
    assert (outputs(hub_model) - outputs(tiny)).abs().max() < 1e-6


def test_save_pretrained_writes_config_weights_and_a_card(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["transformer_size"] == "tiny" and config["titok"]["codebook_size"] == tiny.config.codebook_size
    card = ModelCard.load(tmp_path / "saved" / "README.md")
    assert card.data.library_name == "fuselip_med" and "fuselip" in card.data.tags
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]  # no temp folder left behind


class LocalHub(HfApi):
    """A file-based stand-in for the Hub: repos are folders under ``root``; nothing leaves the machine."""

    root: Path

    def create_repo(self, repo_id, *, private=None, exist_ok=False, **kwargs):
        (self.root / repo_id).mkdir(parents=True, exist_ok=exist_ok)
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, *, repo_id, folder_path, commit_message=None, ignore_patterns=None, **kwargs):
        target = self.root / repo_id
        for path in Path(folder_path).rglob("*"):
            if path.is_file() and not path.name.startswith("."):
                (target / path.relative_to(folder_path)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target / path.relative_to(folder_path))
        (target / ".commits").open("a").write(f"{commit_message}\n")
        return f"local://{repo_id}/commit/1"


@pytest.fixture()
def local_hub(tmp_path, monkeypatch):
    root = tmp_path / "hub"
    root.mkdir()
    LocalHub.root = root

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        folder = root / repo_id
        if not folder.is_dir():
            raise FileNotFoundError(f"Repository {repo_id} not found")
        return str(folder)

    monkeypatch.setattr("huggingface_hub.HfApi", LocalHub)
    monkeypatch.setattr("huggingface_hub.hub_mixin.HfApi", LocalHub)
    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    return root


def test_push_to_hub_then_from_pretrained_reloads(tiny, local_hub):
    tiny.push_to_hub("me/fuselip-tiny")
    assert (local_hub / "me" / "fuselip-tiny" / "model.safetensors").exists()
    reloaded = FuseLIP.from_pretrained("me/fuselip-tiny")
    assert torch.equal(outputs(reloaded), outputs(tiny))
    assert torch.equal(outputs(load_model("me/fuselip-tiny")[0]), outputs(tiny))


def test_push_command_uploads_a_run_folder_with_its_card(tiny, local_hub, tmp_path):
    folder = save_pretrained(tiny, tmp_path / "runs" / "demo" / "final")
    result = runner.invoke(app, ["push", str(folder), "--repo-id", "me/fuselip-med-demo"])
    assert result.exit_code == 0, result.output
    pushed = local_hub / "me" / "fuselip-med-demo"
    assert sorted(p.name for p in pushed.iterdir() if not p.name.startswith(".")) == \
        ["README.md", "config.json", "model.safetensors"]
    assert torch.equal(outputs(FuseLIP.from_pretrained("me/fuselip-med-demo")), outputs(tiny))


def test_push_refuses_damaged_folders_and_local_base_adapters(tiny, local_hub, tmp_path):
    folder = save_pretrained(tiny, tmp_path / "model")
    weights = folder / "model.safetensors"
    weights.write_bytes(b"\xff" * 16)
    result = runner.invoke(app, ["push", str(folder), "--repo-id", "me/broken"])
    assert result.exit_code == 1 and "model.safetensors is damaged" in result.output
    assert not (local_hub / "me" / "broken").exists()

    base = save_pretrained(tiny, tmp_path / "base")
    lora = apply_lora(FuseLIP.from_pretrained(base), 2, 4, 0.0, ["q_proj"])
    adapter = save_adapter(lora, tmp_path / "adapter", str(base))
    with pytest.raises(CheckpointError, match="local base"):
        push_folder(adapter, "me/adapter")
    embedded = save_adapter(apply_lora(FuseLIP(tiny.config), 2, 4, 0.0, ["q_proj"]), tmp_path / "embedded", None)
    card = ModelCard.load(embedded / "README.md")
    assert card.data.base_model is None and "lora" in card.data.tags  # "base" is a folder, not a hub id
    assert push_folder(embedded, "me/embedded").startswith("local://")
    assert (local_hub / "me" / "embedded" / "base" / "model.safetensors").exists()
    from_hub, _, _ = load_model("me/embedded")
    assert torch.equal(outputs(from_hub), outputs(load_model(embedded)[0]))


def test_training_writes_a_hub_model_card(tmp_path):
    from fuselip_med.recipes import recipe_from_dict
    from fuselip_med.train.model_card import write_model_card

    recipe = recipe_from_dict({
        "name": "rocov2_tiny", "model": {"size": "tiny", "init": "chs20/FuseLIP-S-CC3M-MM"},
        "data": {"train": [{"name": "rocov2", "path": "eltorio/ROCOv2-radiology", "split": "train"}],
                 "eval": [{"name": "rocov2", "path": str(tmp_path), "split": "test"}]},
        "train": {"steps": 12},
    })
    before = {"eval/rocov2-retrieval/image_to_text_R@1": 0.1, "eval/rocov2-modality/accuracy": 0.5}
    after = {"eval/rocov2-retrieval/image_to_text_R@1": 0.4, "eval/rocov2-modality/accuracy": 0.75}
    path = write_model_card(tmp_path, recipe, "chs20/FuseLIP-S-CC3M-MM", 12, before, after)
    card = ModelCard.load(path)
    assert card.data.base_model == "chs20/FuseLIP-S-CC3M-MM"
    assert card.data.datasets == ["eltorio/ROCOv2-radiology"]  # the local eval folder is not a hub dataset
    assert card.data.license == "other" and card.data.library_name == "fuselip_med"
    results = {(r.task_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results == {("rocov2-retrieval", "image_to_text_R@1"): 0.4, ("rocov2-modality", "accuracy"): 0.75}
    task_types = {r.task_name: r.task_type for r in card.data.eval_results}
    assert task_types["rocov2-modality"] == "zero-shot-image-classification"
    assert "| rocov2-retrieval/image_to_text_R@1 | 0.1000 | 0.4000 |" in card.text


def test_another_model_class_reuses_the_mixin(tmp_path, local_hub):
    """The late-fusion baselines (or any model) get the same save/load/push by inheriting HubModelMixin."""
    from dataclasses import asdict, dataclass

    from torch import nn

    from fuselip_med.core.pretrained import HubModelMixin

    @dataclass
    class ToyConfig:
        arch: str = "toy"
        width: int = 3

        def to_dict(self):
            return asdict(self)

        @classmethod
        def from_dict(cls, data):
            return cls(**data)

    class Toy(nn.Module, HubModelMixin):
        config_class = ToyConfig

        def __init__(self, config: ToyConfig):
            super().__init__()
            self.config = config
            self.proj = nn.Linear(config.width, 2)

    torch.manual_seed(0)
    toy = Toy(ToyConfig(width=5))
    save_pretrained(toy, tmp_path / "toy")  # the function form is the same single save path
    assert json.loads((tmp_path / "toy" / "config.json").read_text()) == {"arch": "toy", "width": 5}
    assert torch.equal(Toy.from_pretrained(tmp_path / "toy").proj.weight, toy.proj.weight)
    toy.push_to_hub("me/toy")
    assert torch.equal(Toy.from_pretrained("me/toy").proj.weight, toy.proj.weight)
    (tmp_path / "toy" / "config.json").write_text(json.dumps({"arch": "toy", "width": 4}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors .*wrong shapes"):
        Toy.from_pretrained(tmp_path / "toy")


def test_push_has_help_with_examples():
    result = runner.invoke(app, ["push", "--help"])
    assert result.exit_code == 0 and "Usage" in result.output and "--repo-id" in result.output
    assert "fuselip-med push runs/rocov2/final" in result.output
