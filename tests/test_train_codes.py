"""Training on cached image codes: same losses as decoding the same views, resume and 2 processes unchanged."""
import os
import shutil
import subprocess
import sys
import traceback

import pytest
import torch
import yaml

from fuselip_med.core.fuselip import FuseLIP
from fuselip_med.data import dataset as dataset_module
from fuselip_med.data.demo import write_demo_dataset
from fuselip_med.recipes import recipe_from_dict
from fuselip_med.train.objective import EarlyFusionObjective
from fuselip_med.train.trainer import Trainer
from tests.test_trainer import REPO, logged_losses, recipe_dict, run


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("demo") / "rocov2", n_train=40, n_valid=8, n_test=16, n_dicom=0)


def codes_recipe(run_dir, data_dir, mode, cache_dir, **train):
    return recipe_dict(run_dir, data_dir, train={"steps": 4, "image_codes": mode, "code_views": 4,
                                                 "code_cache": str(cache_dir), **train},
                       checkpoint={"every_steps": None})


def test_cached_run_equals_decoding_the_same_views_and_never_decodes(tmp_path, demo_data, monkeypatch, capsys):
    run(codes_recipe(tmp_path / "views", demo_data, "pixel_views", tmp_path / "cache"))
    assert not (tmp_path / "cache").exists()  # pixel_views decodes on the fly and builds nothing
    run(codes_recipe(tmp_path / "first", demo_data, "cache", tmp_path / "cache"))
    assert "Caching image codes: 40 of 40 images" in " ".join(capsys.readouterr().out.split())

    def no_pixels(*args, **kwargs):
        raise AssertionError("a cached run decoded an image or ran TiTok")

    monkeypatch.setattr(dataset_module, "decode_view", no_pixels)
    monkeypatch.setattr(dataset_module, "decode_image", no_pixels)
    monkeypatch.setattr(FuseLIP, "image_codes", no_pixels)
    run(codes_recipe(tmp_path / "second", demo_data, "cache", tmp_path / "cache"))
    assert "Caching image codes" not in capsys.readouterr().out
    views, first, second = (logged_losses(tmp_path / name) for name in ("views", "first", "second"))
    assert sorted(views) == [1, 2, 3, 4] and views == first == second
    monkeypatch.undo()
    pixels = run(codes_recipe(tmp_path / "pixels", demo_data, "pixels", tmp_path / "cache"))
    assert pixels.losses[0] != pytest.approx(views[1], abs=1e-6)  # free crops are other views


def test_cache_codes_command_builds_ahead_and_training_reuses_it(tmp_path, demo_data, capsys):
    recipe = codes_recipe(tmp_path / "run", demo_data, "pixels", tmp_path / "cache")
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    command = [sys.executable, "-m", "fuselip_med.cli", "data", "cache-codes", "--recipe", str(recipe_file)]
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    shard = tmp_path / "cache" / "views4" / "parts" / "rank0"  # the one process's shard
    assert "40 images" in completed.stdout and (shard / "codes.u16").stat().st_size == 40 * 5 * 128 * 2
    recipe["train"]["image_codes"] = "cache"
    run(recipe)
    assert "Caching image codes" not in capsys.readouterr().out
    missing = subprocess.run(command[:-1] + [str(tmp_path / "absent.yaml")], cwd=REPO, capture_output=True, text=True)
    assert missing.returncode == 2 and "error:" in missing.stdout


def test_resume_with_the_cache_continues_exactly(tmp_path, demo_data):
    def recipe(run_dir):
        return recipe_dict(run_dir, demo_data, train={"steps": 8, "image_codes": "cache", "code_views": 4,
                                                      "code_cache": str(tmp_path / "cache")},
                           checkpoint={"every_steps": 4}, data={"num_workers": 1})

    run(recipe(tmp_path / "a"))
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step_000004", tmp_path / "b" / "checkpoints" / "step_000004")
    result = run(recipe(tmp_path / "b"), resume="latest")
    assert result.steps == 8
    full, second = logged_losses(tmp_path / "a"), logged_losses(tmp_path / "b")
    assert sorted(second) == [5, 6, 7, 8]
    for step in second:
        assert second[step] == pytest.approx(full[step], abs=1e-5)


@pytest.mark.slow
def test_two_processes_with_the_cache_give_the_single_process_losses(tmp_path, demo_data):
    recipe = codes_recipe(tmp_path / "two", demo_data, "cache", tmp_path / "cache_two", batch_size=12)
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    completed = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
         "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "fuselip_med.cli", "finetune", "--recipe",
         str(recipe_file)],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    shards = tmp_path / "cache_two" / "views4" / "parts"  # each process wrote its own share; nothing merged
    assert sorted(p.name for p in shards.iterdir()) == ["rank0", "rank1"]
    run(codes_recipe(tmp_path / "one", demo_data, "cache", tmp_path / "cache_one", batch_size=12))
    two, one = logged_losses(tmp_path / "two"), logged_losses(tmp_path / "one")
    assert sorted(two) == sorted(one) == [1, 2, 3, 4]
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-4)


@pytest.mark.parametrize("switch", ["grad_checkpointing", pytest.param("compile", marks=pytest.mark.slow)])
def test_step_switches_keep_the_losses(tmp_path, demo_data, switch):
    plain = run(codes_recipe(tmp_path / "plain", demo_data, "cache", tmp_path / "cache", steps=3))
    switched = run(codes_recipe(tmp_path / switch, demo_data, "cache", tmp_path / "cache", steps=3, **{switch: True}))
    assert switched.losses == pytest.approx(plain.losses, abs=1e-4)


HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


def test_the_device_half_of_a_step_never_reads_a_tensor_on_the_host(tmp_path, demo_data, monkeypatch):
    """Everything of train_step but loading the batch and the host ``prepare`` (CPU ids and masks) must not call
    item()/float()/bool() and friends on a tensor: on CUDA each would wait for the device. The loss values and
    non-finite flags are read at the logging cadence (``flush``)."""
    trainer = Trainer(recipe_from_dict(codes_recipe(tmp_path / "run", demo_data, "cache", tmp_path / "cache",
                                                    grad_accum=2)))
    trainer.setup()
    trainer.iterator = iter(trainer.data.loader)
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}
    reads = []

    def forbid():
        for name in HOST_READS:
            def read(self, *args, _name=name, **kwargs):
                reads.append((_name, traceback.format_stack(limit=3)[0].strip()))
                return originals[_name](self, *args, **kwargs)
            monkeypatch.setattr(torch.Tensor, name, read)

    def host_side(function):
        def wrapped(*args, **kwargs):
            for name, method in originals.items():
                monkeypatch.setattr(torch.Tensor, name, method)
            try:
                return function(*args, **kwargs)
            finally:
                forbid()
        return wrapped

    monkeypatch.setattr(EarlyFusionObjective, "prepare", host_side(EarlyFusionObjective.prepare))
    monkeypatch.setattr(trainer, "_next_batch", host_side(trainer._next_batch))
    with trainer.out.progress() as trainer.bar:
        trainer.bar_task = trainer.bar.add_task("train", total=2, loss=0.0, lr=0.0, rate=0.0)
        trainer.train_step()  # first use of every kernel
        forbid()
        trainer.train_step()
        monkeypatch.undo()
    assert reads == [] and trainer.step == 2 and len(trainer.pending) == 2
    assert [step for step, *_ in trainer.flush()] == [1, 2]


def test_evaluation_during_training_reads_the_eval_images_codes_from_the_cache(tmp_path, demo_data, monkeypatch):
    """With a code cache, the eval set's images are cached with the training images and evaluation during training
    runs no TiTok on them (issue 25, fault 5); the metrics equal evaluating from pixels."""
    recipe = codes_recipe(tmp_path / "run", demo_data, "cache", tmp_path / "cache", steps=1)
    recipe["eval"]["at_end"] = True
    trainer = Trainer(recipe_from_dict(recipe))
    trainer.setup()
    assert len(trainer.eval_codes) == 16  # every test image of the demo data (the eval set)
    tokenizer = trainer.base_model.image_tokenizer
    encode, tokenized = tokenizer.encode, []
    monkeypatch.setattr(tokenizer, "encode", lambda pixels: tokenized.append(len(pixels)) or encode(pixels))
    cached = trainer.evaluate("cached")
    assert tokenized == [] and cached
    trainer.eval_codes = {}
    from_pixels = trainer.evaluate("pixels")
    assert sum(tokenized) == 16 and cached == pytest.approx(from_pixels, abs=1e-6)


@pytest.mark.parametrize("mode", ["cache", "pixels"])
def test_titok_codes_are_computed_without_tf32_after_the_trainer_enables_it(tmp_path, demo_data, monkeypatch, mode):
    """The trainer turns CUDA's TF32 matmuls on for speed; TiTok's float32 codes (the cache build and the
    on-the-fly path alike) must still be computed with it off, as the reference inference path does (a TF32
    latent can flip a code at a near-tie), and the trainer's setting is back afterwards. (On this CPU machine the
    flag changes no number; the test checks the flag TiTok's work sees.)"""
    from fuselip_med.core.titok import TiTokTokenizer

    seen: list[bool] = []
    original = TiTokTokenizer.codes

    def recording(self, pixels):
        seen.append(torch.backends.cuda.matmul.allow_tf32)
        return original(self, pixels)

    monkeypatch.setattr(TiTokTokenizer, "codes", recording)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # restored after the test
    run(codes_recipe(tmp_path / "run", demo_data, mode, tmp_path / "cache"))
    assert seen and not any(seen)
    assert torch.backends.cuda.matmul.allow_tf32  # the trainer's choice for everything else stands
