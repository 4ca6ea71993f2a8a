"""The SigLIP-SF/MLF baselines through the same trainer and recipes as FuseLIP: finetune, save/reload, resume,
2 processes, bf16, LoRA."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from fuselip_med import load_model
from fuselip_med.cli import app
from fuselip_med.core.late_fusion import LateFusion
from fuselip_med.data.demo import write_demo_dataset
from fuselip_med.recipes import load_recipe
from fuselip_med.train import trainer as trainer_module
from tests.test_trainer import logged_losses, recipe_dict, run

REPO = Path(__file__).resolve().parents[1]
PIXELS = torch.rand(3, 3, 256, 256, generator=torch.Generator().manual_seed(0))
TEXTS = ["ct of the chest", None, "mri of the knee"]
IMAGES = [PIXELS[0], PIXELS[1], None]


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("demo") / "rocov2", n_train=32, n_valid=8, n_test=16, n_dicom=0)


def baseline_recipe(run_dir: Path, data_dir: Path, arch: str, **changes) -> dict:
    changes.setdefault("model", {})["arch"] = arch
    return recipe_dict(run_dir, data_dir, **changes)


@pytest.mark.parametrize("recipe_name", ["cc3m_mm", "cc12m_mm", "rocov2", "rocov2_lora", "rocov2_demo", "tgit_demo"])
def test_paper_and_rocov2_recipes_accept_the_baselines(recipe_name):
    for arch in ("siglip_sf", "siglip_mlf"):
        assert load_recipe(recipe_name, [f"model.arch={arch}"]).model.arch == arch
    assert load_recipe(recipe_name).model.arch == "fuselip"


@pytest.mark.parametrize("arch", ["siglip_sf", "siglip_mlf"])
def test_finetune_trains_saves_and_reloads_a_baseline_exactly(tmp_path, demo_data, monkeypatch, arch):
    captured = {}
    original_save = trainer_module.save_pretrained

    def save_and_remember(model, directory, *args, **kwargs):
        model.eval()
        with torch.no_grad():
            captured["outputs"] = model.encode(images=IMAGES, texts=TEXTS).clone()
            captured["scale"] = model.logit_scale.detach().clone()
        return original_save(model, directory, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "save_pretrained", save_and_remember)
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe_dict(tmp_path / "run", demo_data, train={"steps": 4},
                                                      checkpoint={"every_steps": None})))
    result = CliRunner().invoke(app, ["finetune", "--recipe", str(recipe_file), "--set", f"model.arch={arch}"])
    assert result.exit_code == 0, result.output
    losses = logged_losses(tmp_path / "run")
    assert sorted(losses) == [1, 2, 3, 4] and all(torch.isfinite(torch.tensor(list(losses.values()))))
    model, _, _ = load_model(tmp_path / "run" / "final")
    assert isinstance(model, LateFusion) and model.config.arch == arch and model.config.size == "tiny"
    with torch.no_grad():
        assert torch.allclose(model.encode(images=IMAGES, texts=TEXTS), captured["outputs"], atol=1e-6)
        assert torch.equal(model.logit_scale, captured["scale"])
        torch.manual_seed(0)
        fresh = LateFusion(model.config).eval()
        assert not torch.allclose(fresh.encode(images=IMAGES, texts=TEXTS), captured["outputs"], atol=1e-3)


@pytest.mark.slow
def test_resume_continues_a_baseline_exactly(tmp_path, demo_data):
    changes = dict(train={"steps": 4}, checkpoint={"every_steps": 2})
    straight = baseline_recipe(tmp_path / "a", demo_data, "siglip_mlf", **changes)
    run(straight)
    resumed = baseline_recipe(tmp_path / "b", demo_data, "siglip_mlf", **changes)
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    os.rename(tmp_path / "a" / "checkpoints" / "step_000002", tmp_path / "b" / "checkpoints" / "step_000002")
    assert run(resumed, resume="latest").steps == 4
    full, second = logged_losses(tmp_path / "a"), logged_losses(tmp_path / "b")
    assert sorted(second) == [3, 4]
    for step in second:
        assert second[step] == pytest.approx(full[step], abs=1e-5)
    a, b = load_model(tmp_path / "a" / "final")[0], load_model(tmp_path / "b" / "final")[0]
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(p, q, atol=1e-5), name


@pytest.mark.slow  # several processes: seconds of start-up each (CI runs the slow tests)
def test_two_processes_give_the_single_process_losses_for_a_baseline(tmp_path, demo_data):
    changes = dict(train={"steps": 3, "batch_size": 12}, checkpoint={"every_steps": None})
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(baseline_recipe(tmp_path / "two", demo_data, "siglip_sf", **changes)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "fuselip_med.cli",
         "finetune", "--recipe", str(recipe_file)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    run(baseline_recipe(tmp_path / "one", demo_data, "siglip_sf", **changes))
    two, one = logged_losses(tmp_path / "two"), logged_losses(tmp_path / "one")
    assert sorted(two) == sorted(one) == [1, 2, 3]
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-4)


@pytest.mark.slow
def test_bf16_mixed_precision_tracks_fp32_for_a_baseline(tmp_path, demo_data):
    changes = dict(train={"steps": 2, "precision": "bf16"}, checkpoint={"every_steps": None})
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(baseline_recipe(tmp_path / "bf16", demo_data, "siglip_mlf", **changes)))
    # its own process: Accelerate's precision is fixed once per process
    completed = subprocess.run([sys.executable, "-m", "fuselip_med.cli", "finetune", "--recipe", str(recipe_file)],
                               cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                               timeout=300)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    changes["train"]["precision"] = "fp32"
    fp32 = run(baseline_recipe(tmp_path / "fp32", demo_data, "siglip_mlf", **changes))
    bf16 = logged_losses(tmp_path / "bf16")
    assert sorted(bf16) == [1, 2] and bf16[1] == pytest.approx(fp32.losses[0], rel=0.05)
    assert bf16[2] == pytest.approx(fp32.losses[1], rel=0.1)
    assert load_model(tmp_path / "bf16" / "final")[0].logit_scale.dtype == torch.float32


def test_lora_on_a_baseline_trains_only_adapters_and_merges_exactly(tmp_path, demo_data):
    from fuselip_med.core.lora import adapter_parameter_count, load_adapter, merge_adapter

    recipe = baseline_recipe(tmp_path / "lora", demo_data, "siglip_sf", train={"steps": 2},
                             checkpoint={"every_steps": None},
                             model={"lora": {"enabled": True, "r": 2, "alpha": 4, "dropout": 0.0}})
    result = run(recipe)
    peft_model = load_adapter(result.final_dir).eval()
    base = peft_model.get_base_model()
    wrapped = [n for n, _ in base.named_modules() if n.endswith("lora_A")]
    # tiny: 2 ViT + 2 text blocks, 6 linears each
    assert len(wrapped) == 24 and any(".vit." in n for n in wrapped) and any("text_tower" in n for n in wrapped)
    assert adapter_parameter_count(peft_model) > 0
    merged = merge_adapter(result.final_dir).eval()
    assert isinstance(merged, LateFusion)
    with torch.no_grad():
        assert torch.allclose(merged.encode(images=IMAGES, texts=TEXTS), base.encode(images=IMAGES, texts=TEXTS),
                              atol=1e-5)


def test_a_fuselip_init_for_a_baseline_arch_is_one_error_line(tmp_path, demo_data):
    from fuselip_med.core.loading import build_model
    from fuselip_med.core.pretrained import save_pretrained

    save_pretrained(build_model("tiny"), tmp_path / "fuselip_init")
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe_dict(tmp_path / "run", demo_data, train={"steps": 1})))
    result = CliRunner().invoke(app, ["finetune", "--recipe", str(recipe_file), "--set", "model.arch=siglip_mlf",
                                      "--set", f"model.init={tmp_path / 'fuselip_init'}"])
    assert result.exit_code == 1
    assert "error:" in result.output and "is a fuselip checkpoint but model.arch is siglip_mlf" in " ".join(
        result.output.split())


@pytest.mark.slow
def test_the_paper_mixture_trains_a_baseline(tmp_path):
    from tests.test_paper_recipes import paper_overrides, write_paper_data

    root = write_paper_data(tmp_path / "data")
    overrides = paper_overrides(root, tmp_path) + [
        "model.arch=siglip_mlf", "model.size=tiny", "train.epochs=null", "train.steps=2", "train.batch_size=12",
        "train.warmup_steps=1", "train.precision=fp32", "data.num_workers=0", "data.eval=[]", "eval.at_end=false",
        "checkpoint.every_steps=null", "logging.trackers=[jsonl]", "logging.progress=false",
        f"output.dir={tmp_path / 'run'}",
    ]
    result = trainer_module.Trainer(load_recipe("cc3m_mm", overrides)).run()
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert load_model(result.final_dir)[0].config.arch == "siglip_mlf"
