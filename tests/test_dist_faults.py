"""Several gloo processes on the CPU (issue 25): an empty share of a global batch, SIGTERM to one worker,
process-group timeouts around rank 0's work. Each case once hung or crashed a multi-process run."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from fuselip_med.data.demo import write_demo_dataset
from fuselip_med.train import checkpointing
from tests.test_trainer import logged_losses, recipe_dict, run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("demo") / "rocov2", n_train=24, n_valid=4, n_test=8, n_dicom=0)


def launch(tmp_path: Path, recipe: dict, *args: str) -> subprocess.Popen:
    """``accelerate launch`` of ``finetune`` with 2 gloo processes."""
    recipe_file = tmp_path / f"recipe_{time.monotonic_ns()}.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "-m", "fuselip_med.cli", "finetune", "--recipe", str(recipe_file), *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int | None, str]:
    """(exit code, output); None when the launch did not end within ``timeout`` s (then it and its workers,
    which torchrun starts in sessions of their own, are killed)."""
    try:
        output, _ = proc.communicate(timeout=timeout)
        return proc.returncode, output
    except subprocess.TimeoutExpired:
        kill(proc)
        output, _ = proc.communicate()
        return None, output


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL to a launch and every process under it."""
    import psutil

    try:
        family = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
    except psutil.NoSuchProcess:
        return
    for member in family:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.mark.slow  # several processes: seconds of start-up each (CI runs the slow tests)
def test_a_global_batch_of_one_under_two_processes_trains(tmp_path, demo_data):
    changes = {"train": {"steps": 3, "batch_size": 1}, "checkpoint": {"every_steps": None}}
    code, output = finish(launch(tmp_path, recipe_dict(tmp_path / "two", demo_data, **changes)), timeout=240)
    assert code == 0, output[-3000:]
    run(recipe_dict(tmp_path / "one", demo_data, **changes))
    two, one = logged_losses(tmp_path / "two"), logged_losses(tmp_path / "one")
    assert sorted(two) == sorted(one) == [1, 2, 3]
    assert [two[step] for step in one] == pytest.approx([one[step] for step in one], abs=1e-4)


def workers_of(launcher: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} of the training processes an ``accelerate launch`` started."""
    import psutil

    found = {}
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            rank = child.environ().get("RANK")
        except psutil.Error:
            continue
        if rank is not None:
            found[int(rank)] = child.pid
    return found


@pytest.mark.slow  # three runs, about 4 minutes on 2 busy cores
def test_sigterm_to_one_worker_stops_both_after_the_same_step_with_one_checkpoint(tmp_path, demo_data):
    steps = 14
    changes = {"train": {"steps": steps, "batch_size": 8, "log_every": 1}, "checkpoint": {"every_steps": None}}
    recipe = recipe_dict(tmp_path / "two", demo_data, **changes)
    proc = launch(tmp_path, recipe)
    try:
        deadline = time.time() + 240
        while len(logged_losses(tmp_path / "two") if (tmp_path / "two" / "metrics.jsonl").exists() else []) < 3:
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.time() < deadline, "training never reached step 3"
            time.sleep(0.2)
        workers = workers_of(proc)
        assert sorted(workers) == [0, 1]
        os.kill(workers[1], signal.SIGTERM)
        code, output = finish(proc, timeout=120)
    finally:
        if proc.poll() is None:
            kill(proc)
    assert code is not None, "the processes did not stop within 2 minutes of SIGTERM:\n" + output[-3000:]
    checkpoints = checkpointing.list_checkpoints(tmp_path / "two" / "checkpoints")
    assert len(checkpoints) == 1, output[-3000:]
    state = json.loads((checkpoints[0] / "trainer_state.json").read_text())
    assert state["interrupted"] and 3 <= state["step"] < steps
    assert not (tmp_path / "two" / "final").exists()

    code, output = finish(launch(tmp_path, recipe, "--resume"), timeout=300)
    assert code == 0, output[-3000:]
    run(recipe_dict(tmp_path / "one", demo_data, **changes))
    two, one = logged_losses(tmp_path / "two"), logged_losses(tmp_path / "one")
    assert sorted(two) == sorted(one) == list(range(1, steps + 1))
    assert [two[step] for step in one] == pytest.approx([one[step] for step in one], abs=1e-4)


def test_process_group_timeout_is_the_recipe_value(tmp_path, demo_data):
    from datetime import timedelta

    from accelerate.state import AcceleratorState

    from fuselip_med.recipes import recipe_from_dict
    from fuselip_med.train.trainer import Trainer

    AcceleratorState._reset_state(True)
    trainer = Trainer(recipe_from_dict(recipe_dict(tmp_path / "run", demo_data, train={"dist_timeout_min": 90})))
    assert trainer.accelerator.init_handler.timeout == timedelta(minutes=90)
    assert recipe_from_dict(recipe_dict(tmp_path / "run", demo_data)).train.dist_timeout_min == 60


class CountingModel(torch.nn.Module):
    """``encode`` of a fixed text embedding, counting the texts this process embedded."""

    def __init__(self):
        super().__init__()
        self.texts: list[str] = []

    def encode(self, texts):
        self.texts += list(texts)
        return torch.stack([torch.tensor([float(len(t)), float(sum(map(ord, t))), 1.0]) for t in texts])


def _embed_worker(rank: int, texts: list[str], out: str) -> None:
    from fuselip_med.inference.engine import Embedder
    from fuselip_med.inference.items import EmbedItem

    model = CountingModel()
    table = Embedder(model, batch_size=2, progress=False, shard=True).embed([EmbedItem.of_text(t) for t in texts])
    torch.save({"keys": table.keys, "embeddings": table.embeddings, "embedded_here": model.texts},
               f"{out}.{rank}")


def test_evaluation_embeddings_are_shared_across_processes(tmp_path):
    from fuselip_med.inference.engine import Embedder
    from fuselip_med.inference.items import EmbedItem
    from tests.dist_helpers import spawn_gloo

    texts = [f"finding number {i}" for i in range(7)]
    spawn_gloo(_embed_worker, texts, str(tmp_path / "table"))
    single = Embedder(CountingModel(), batch_size=2, progress=False).embed([EmbedItem.of_text(t) for t in texts])
    parts = [torch.load(tmp_path / f"table.{rank}") for rank in range(2)]
    assert sorted(parts[0]["embedded_here"] + parts[1]["embedded_here"]) == sorted(texts)
    assert len(parts[0]["embedded_here"]) == 4 and len(parts[1]["embedded_here"]) == 3
    for part in parts:
        assert torch.equal(part["embeddings"][[part["keys"].index(k) for k in single.keys]], single.embeddings)


def _fake_spec():
    from fuselip_med.data.images import DecodeOptions
    from fuselip_med.data.token_cache import ViewSpec

    return ViewSpec(DecodeOptions(), 3, "fake codes")


def _fake_codes(pixels: torch.Tensor) -> torch.Tensor:
    """Deterministic code ids ``[n, 128]`` from pixels (a stand-in for TiTok)."""
    return (pixels.flatten(1)[:, :128] * 4000).long()


def _cache_worker(rank: int, folder: str, out: str) -> None:
    import torch.distributed as dist

    from fuselip_med.data import token_cache
    from fuselip_med.train.image_codes import ensure_code_cache
    from tests.test_token_cache import images_of

    appended: list[int] = []
    original = token_cache.CodeCache.append

    def counted(cache, keys, codes):
        appended.append(len(keys))
        original(cache, keys, codes)

    token_cache.CodeCache.append = counted
    spec = _fake_spec()
    images = images_of(sorted((Path(folder) / "img").glob("*.png")), spec)
    cache = ensure_code_cache(Path(folder) / "cache", spec, images, _fake_codes, rank=rank, world=2,
                              barrier=dist.barrier, images_per_batch=1)
    torch.save({"appended": appended, "codes": {key: cache.get(key, 1) for key in images}}, f"{out}.{rank}")


def test_the_code_cache_build_gives_each_process_an_equal_share_and_merges_nothing(tmp_path):
    from fuselip_med.train.image_codes import ensure_code_cache
    from tests.dist_helpers import spawn_gloo
    from tests.test_token_cache import images_of, write_images

    paths = write_images(tmp_path / "img", 6)  # once, before the processes read them
    spawn_gloo(_cache_worker, str(tmp_path), str(tmp_path / "result"))
    results = [torch.load(tmp_path / f"result.{rank}") for rank in range(2)]
    # each process appended its 3 images, one chunk each, and nothing else (before: rank 0 copied all 6 again)
    assert [result["appended"] for result in results] == [[1, 1, 1], [1, 1, 1]]
    spec = _fake_spec()
    alone = ensure_code_cache(tmp_path / "alone", spec, images_of(paths, spec), _fake_codes)
    for result in results:
        assert len(result["codes"]) == 6
        assert all(torch.equal(codes, alone.get(key, 1)) for key, codes in result["codes"].items())
