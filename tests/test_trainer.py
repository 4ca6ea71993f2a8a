"""Trainer end to end on CPU: fine-tune, resume equivalence, crash safety, 2 processes, LoRA, bad input."""
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fuselip_med import load_model
from fuselip_med.core.checkpoints import export_reference
from fuselip_med.core.fuselip import FuseLIP, FuseLIPConfig
from fuselip_med.data.demo import write_demo_dataset
from fuselip_med.recipes import recipe_from_dict
from fuselip_med.train import checkpointing
from fuselip_med.train.data import DataSetupError
from fuselip_med.train.trainer import Trainer, TrainingStopped

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("demo") / "rocov2", n_train=40, n_valid=8, n_test=16, n_dicom=0)


def deep_update(base: dict, changes: dict) -> dict:
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value
    return base


def recipe_dict(run_dir: Path, data_dir: Path, **changes) -> dict:
    base = {
        "name": "test_run",
        "model": {"size": "tiny"},
        "data": {
            "train": [{"name": "rocov2", "path": str(data_dir), "split": "train"}],
            "eval": [{"name": "rocov2", "id": "rocov2_test", "path": str(data_dir), "split": "test"}],
            "num_workers": 0,
        },
        "train": {"steps": 6, "batch_size": 8, "lr": 3e-3, "warmup_steps": 1, "precision": "fp32", "log_every": 1},
        "eval": {"at_start": False, "at_end": False, "tasks": ["rocov2-retrieval"], "pool_size": 16, "n_pools": 1},
        "checkpoint": {"every_steps": 3, "keep_last": 5},
        "logging": {"progress": False},
        "output": {"dir": str(run_dir)},
    }
    return deep_update(copy.deepcopy(base), changes)


def run(recipe: dict, **kwargs):
    return Trainer(recipe_from_dict(recipe), **kwargs).run()


def logged_losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}


@pytest.fixture()
def released_tiny(tmp_path):
    torch.manual_seed(3)
    model = FuseLIP(FuseLIPConfig.from_size("tiny")).eval()
    export_reference(model, tmp_path / "released")
    return tmp_path / "released", model


def test_finetune_from_released_checkpoint(tmp_path, demo_data, released_tiny):
    init, initial = released_tiny
    recipe = recipe_dict(tmp_path / "run", demo_data, model={"init": str(init)}, train={"steps": 12},
                         eval={"at_start": True, "at_end": True, "every_steps": 6},
                         checkpoint={"every_steps": 4, "keep_last": 2}, logging={"trackers": ["jsonl", "tensorboard"]})
    result = run(recipe)
    assert (tmp_path / "run" / "eval" / "step_000006" / "metrics.json").exists()
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/rocov2-retrieval/image_to_text_R@1" in row and row["step"] == 6 for row in logged)
    assert result.steps == 12 and len(result.losses) == 12
    assert sum(result.losses[-3:]) / 3 < sum(result.losses[:3]) / 3
    checkpoints = checkpointing.list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in checkpoints] == ["step_000008", "step_000012"]
    assert "rocov2-retrieval" in json.loads((tmp_path / "run" / "eval" / "final" / "metrics.json").read_text())["tasks"]
    assert "eval/rocov2-retrieval/image_to_text_R@1" in result.eval_after
    model, _, _ = load_model(result.final_dir)
    card = (result.final_dir / "README.md").read_text()
    assert str(init) in card and "image_to_text_R@1" in card
    texts = ["axial ct of the chest"]
    with torch.no_grad():
        assert not torch.allclose(model.encode(texts=texts), initial.encode(texts=texts))
        assert model.logit_scale.exp() <= 100.0 + 1e-4


def test_resume_continues_exactly(tmp_path, demo_data):
    straight = recipe_dict(tmp_path / "a", demo_data, train={"steps": 8}, checkpoint={"every_steps": 4},
                           data={"num_workers": 1})
    run(straight)
    resumed_dir = tmp_path / "b"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step_000004", resumed_dir / "checkpoints" / "step_000004")
    resumed = recipe_dict(resumed_dir, demo_data, train={"steps": 8}, checkpoint={"every_steps": 4},
                          data={"num_workers": 1})
    result = run(resumed, resume="latest")
    assert result.steps == 8
    full, second = logged_losses(tmp_path / "a"), logged_losses(resumed_dir)
    assert sorted(second) == [5, 6, 7, 8]
    for step in second:
        assert second[step] == pytest.approx(full[step], abs=1e-5)
    a_final, _, _ = load_model(tmp_path / "a" / "final")
    b_final, _, _ = load_model(resumed_dir / "final")
    for (name, p), q in zip(a_final.state_dict().items(), b_final.state_dict().values()):
        assert torch.allclose(p, q, atol=1e-5), name


KILLER = """
import sys, time
from pathlib import Path
from fuselip_med.recipes import load_recipe
from fuselip_med.train import checkpointing
from fuselip_med.train.trainer import Trainer

original = checkpointing.write_main_files
def slow_write(tmp, *args, **kwargs):
    original(tmp, *args, **kwargs)
    if tmp.name.endswith("000004"):
        Path(sys.argv[2]).write_text("writing")
        time.sleep(600)
checkpointing.write_main_files = slow_write
Trainer(load_recipe(sys.argv[1]), resume=sys.argv[3] if len(sys.argv) > 3 else None).run()
"""


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, demo_data):
    import yaml

    recipe = recipe_dict(tmp_path / "run", demo_data, train={"steps": 6}, checkpoint={"every_steps": 2})
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    marker = tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, str(script), str(recipe_file), str(marker)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not marker.exists():
            assert proc.poll() is None, "the training process ended before the checkpoint write"
            assert time.time() < deadline, "the checkpoint write was never reached"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    checkpoints = tmp_path / "run" / "checkpoints"
    assert [p.name for p in checkpointing.list_checkpoints(checkpoints)] == ["step_000002"]
    assert any(p.name.startswith(checkpointing.TMP_PREFIX) for p in checkpoints.iterdir())
    assert load_model(checkpoints / "step_000002")[0] is not None
    result = run(recipe, resume="latest")
    assert result.steps == 6
    assert sorted(logged_losses(tmp_path / "run"))[-4:] == [3, 4, 5, 6]
    assert not any(p.name.startswith(checkpointing.TMP_PREFIX) for p in checkpoints.iterdir())


@pytest.mark.slow  # several processes: seconds of start-up each (CI runs the slow tests)
def test_two_processes_give_the_single_process_losses(tmp_path, demo_data):
    import yaml

    recipe = recipe_dict(tmp_path / "two", demo_data, train={"steps": 4, "batch_size": 12},
                         checkpoint={"every_steps": None})
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "-m", "fuselip_med.cli", "finetune", "--recipe", str(recipe_file)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    single = recipe_dict(tmp_path / "one", demo_data, train={"steps": 4, "batch_size": 12},
                         checkpoint={"every_steps": None})
    run(single)
    two, one = logged_losses(tmp_path / "two"), logged_losses(tmp_path / "one")
    assert sorted(two) == sorted(one) == [1, 2, 3, 4]
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-4)


def test_lora_trains_only_adapters_and_merges_exactly(tmp_path, demo_data, released_tiny):
    from fuselip_med.core.lora import adapter_parameter_count, apply_lora, load_adapter, merge_adapter

    init, _ = released_tiny
    probe = apply_lora(load_model(init)[0], r=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj", "c_fc"],
                       train_logit_params=False)
    trainable = sum(p.numel() for p in probe.parameters() if p.requires_grad)
    assert trainable == adapter_parameter_count(probe) == 2 * (4 * 64 + 4 * 64) * 2 + 2 * (4 * 64 + 4 * 256)

    recipe = recipe_dict(tmp_path / "lora", demo_data, model={"init": str(init), "lora": {
        "enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "train_logit_params": True}}, train={"steps": 4})
    result = run(recipe)
    adapter_dir = result.final_dir
    assert (adapter_dir / "adapter_config.json").exists() and (adapter_dir / "fuselip_base.json").exists()
    peft_model = load_adapter(adapter_dir).eval()
    merged = merge_adapter(adapter_dir).eval()
    base, _, _ = load_model(init)
    pixels = torch.rand(2, 3, 256, 256)
    texts = ["mri of the knee", "ct of the head"]
    with torch.no_grad():
        with_adapter = peft_model.get_base_model().encode(images=pixels, texts=texts)
        assert torch.allclose(merged.encode(images=pixels, texts=texts), with_adapter, atol=1e-5)
        assert not torch.allclose(base.encode(images=pixels, texts=texts), with_adapter, atol=1e-4)
        assert not torch.equal(merged.logit_scale, base.logit_scale)

    out = tmp_path / "merged"
    completed = subprocess.run([sys.executable, "-m", "fuselip_med.cli", "merge-lora", str(adapter_dir),
                                "--out", str(out)],
                               cwd=REPO, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    reloaded, _, _ = load_model(out)
    with torch.no_grad():
        assert torch.allclose(reloaded.encode(images=pixels, texts=texts), with_adapter, atol=1e-5)


def test_non_finite_loss_skips_then_stops_and_keeps_the_last_checkpoint(tmp_path, demo_data, monkeypatch):
    from fuselip_med.train.objective import EarlyFusionObjective

    original = EarlyFusionObjective.forward

    def poisoned(self, inputs):
        out = original(self, inputs)
        if inputs.step >= 3:
            out.total = out.total * float("nan")
        return out

    monkeypatch.setattr(EarlyFusionObjective, "forward", poisoned)
    recipe = recipe_dict(tmp_path / "run", demo_data, train={"steps": 10, "max_bad_steps": 3},
                         checkpoint={"every_steps": 3})
    with pytest.raises(TrainingStopped, match="not finite for 3 steps"):
        run(recipe)
    assert [p.name for p in checkpointing.list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_000003"]
    assert load_model(tmp_path / "run" / "checkpoints" / "step_000003")[0] is not None


def interrupt_at_third_step(monkeypatch):
    """Ctrl-C (KeyboardInterrupt) in the third step's learning-rate update; returns the function that undoes it."""
    from fuselip_med.train import trainer as trainer_module

    calls = {"n": 0}
    original = trainer_module.set_learning_rate

    def interrupt(optimizer, lr):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        original(optimizer, lr)

    monkeypatch.setattr(trainer_module, "set_learning_rate", interrupt)
    return lambda: monkeypatch.setattr(trainer_module, "set_learning_rate", original)


def test_interrupt_writes_a_checkpoint_and_resume_finishes(tmp_path, demo_data, monkeypatch):
    restore = interrupt_at_third_step(monkeypatch)
    recipe = recipe_dict(tmp_path / "run", demo_data, train={"steps": 5}, checkpoint={"every_steps": 10})
    result = run(recipe)
    assert result.interrupted and result.final_dir is None
    assert [p.name for p in checkpointing.list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_000002"]
    restore()
    result = run(recipe, resume="latest")
    assert result.steps == 5 and not result.interrupted and (result.final_dir / "model.safetensors").exists()


def test_missing_dataset_fails_before_the_model_is_built(tmp_path, monkeypatch):
    from fuselip_med.train import trainer as trainer_module

    def no_model(*args, **kwargs):
        raise AssertionError("the model must not be built when the data is missing")

    monkeypatch.setattr(trainer_module, "build_model", no_model)
    recipe = recipe_dict(tmp_path / "run", tmp_path / "no_such_dir")
    with pytest.raises(DataSetupError, match="download_rocov2.py"):
        run(recipe)


def test_wandb_without_credentials_falls_back_to_offline(tmp_path, demo_data, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    recipe = recipe_dict(tmp_path / "run", demo_data, train={"steps": 2}, checkpoint={"every_steps": None},
                         logging={"trackers": ["jsonl", "wandb"], "wandb_mode": "online"})
    run(recipe)
    assert "logging offline instead" in " ".join(capsys.readouterr().out.split())
    assert list((tmp_path / "run").glob("wandb/offline-run-*"))


def test_a_new_run_moves_an_earlier_run_aside(tmp_path, demo_data):
    recipe = recipe_dict(tmp_path / "runs" / "r", demo_data, train={"steps": 2}, checkpoint={"every_steps": None})
    run(recipe)
    run(recipe)
    names = sorted(p.name for p in (tmp_path / "runs").iterdir() if not p.name.startswith(".r.lock"))
    assert names[0] == "r" and names[1].startswith("r.prev-") and len(names) == 2
    assert len(logged_losses(tmp_path / "runs" / "r")) == 2


def test_gradient_accumulation_consumes_accum_batches_per_step(tmp_path, demo_data):
    recipe = recipe_dict(tmp_path / "run", demo_data, train={"steps": 3, "grad_accum": 2},
                         checkpoint={"every_steps": 3})
    result = run(recipe)
    assert result.steps == 3
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_000003" / "trainer_state.json").read_text())
    per_epoch = 40  # demo train split of 40 images, batch 8
    assert state["sampler"]["epoch"] * per_epoch + state["sampler"]["samples_done"] == 3 * 2 * 8


def test_resume_with_a_larger_batch_continues_the_epoch_in_samples(tmp_path, demo_data, monkeypatch):
    """Batch 8 for two steps (16 of 40 samples), resumed with batch 16: the 24 samples left make one full batch of
    16 (the short rest is dropped, as drop_last does in an uninterrupted run), so the run ends at step 3."""
    restore = interrupt_at_third_step(monkeypatch)
    recipe = recipe_dict(tmp_path / "run", demo_data, checkpoint={"every_steps": 10})
    recipe["train"] = {**recipe["train"], "steps": None, "epochs": 1}
    assert run(recipe).interrupted
    restore()
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_000002" / "trainer_state.json").read_text())
    assert state["sampler"] == {"seed": 0, "epoch": 0, "samples_done": 16, "segments": [[8, 2]]}
    recipe["train"]["batch_size"] = 16
    result = run(recipe, resume="latest")
    assert result.steps == 3 and not result.interrupted
