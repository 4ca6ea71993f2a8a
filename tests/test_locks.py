"""Two writers, one folder: a second index build is refused naming the first, a second code-cache build waits and
keeps the first one's rows, the synthesis output and the run directory are refused while held, and the lock of a
killed process is taken over. Every overlap uses real processes, the first paused (SIGSTOP/SIGCONT)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fuselip_med.locks import FolderBusyError, writer_lock
from tests.search_helpers import make_folder, write_png

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def start(script: str, *args: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, proc: subprocess.Popen, what: str, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert proc.poll() is None, f"{what}: the process ended first: {proc.stderr.read()[-2000:]}"
        assert time.time() < deadline, f"{what}: never happened"
        time.sleep(0.05)


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
    return proc.returncode, out, err


BUILD = """
import sys, time
from fuselip_med.search.index import IndexSettings, build_index, list_entries
from tests.search_helpers import KEEP_PATHS, PlantedEncoder

class Slow(PlantedEncoder):
    def encode(self, **kw):
        time.sleep(0.2)
        return super().encode(**kw)

entries, _ = list_entries(sys.argv[1], privacy=KEEP_PATHS)
try:
    report = build_index(sys.argv[2], entries, Slow(), Slow.model_id, IndexSettings(chunk_size=1, batch_size=1),
                         progress=False)
except Exception as error:
    print(f"{type(error).__name__}: {error}")
    sys.exit(1)
print("rows", report.n_rows)
"""


@pytest.mark.slow  # several processes: seconds of start-up each (CI runs the slow tests)
def test_a_second_index_build_is_refused_naming_the_first_and_nothing_is_lost(tmp_path):
    from fuselip_med.search.index import open_index

    folder = make_folder(tmp_path / "images")
    for i in range(4):
        write_png(folder / f"extra{i}.png", (40 * i, 90, 150))
    out = tmp_path / "index"
    first = start(BUILD, folder, out)
    try:
        wait_for(lambda: len(list((out / ".work" / "image").glob("*.npz"))) >= 2, first, "first build's chunks")
        os.kill(first.pid, signal.SIGSTOP)
        code, text, err = finish(start(BUILD, folder, out))
        assert code == 1, (text, err[-2000:])
        assert text.startswith("FolderBusyError") and f"process {first.pid} " in text and "index build" in text
    finally:
        os.kill(first.pid, signal.SIGCONT)
    code, text, err = finish(first)
    assert code == 0 and "rows 9" in text, err[-2000:]
    assert len(open_index(out)) == 9 and not (out / ".work").exists()


CACHE = """
import sys, time
from pathlib import Path
import numpy as np
import torch
from PIL import Image
from fuselip_med.core.titok import TiTokConfig, TiTokTokenizer
from fuselip_med.data.hashing import content_hash
from fuselip_med.data.token_cache import row_key
from fuselip_med.train.image_codes import ensure_code_cache
from tests.test_token_cache import spec_for

root, seed = Path(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(seed)
images = {}
for number in range(4):
    path = root / f"img{seed}" / f"{number}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
torch.manual_seed(0)
titok = TiTokTokenizer(TiTokConfig.tiny()).eval()
spec = spec_for(titok)
for path in sorted((root / f"img{seed}").glob("*.png")):
    images[row_key(content_hash(path), spec)] = (content_hash(path), path)
say = lambda message: print(message, flush=True)
def slow_encode(pixels):  # slow enough that the test pauses the first build mid-way on any machine
    time.sleep(0.5)
    return titok.encode(pixels)

cache = ensure_code_cache(root / "cache", spec, images, slow_encode, images_per_batch=1, say=say)
print("cached", sum(key in cache for key in images), "of", len(images))
"""


@pytest.mark.slow  # several processes: seconds of start-up each (CI runs the slow tests)
def test_a_second_code_cache_build_waits_and_both_keep_their_rows(tmp_path):
    from fuselip_med.data.token_cache import ShardedCodeCache

    first = start(CACHE, tmp_path, 1)
    part = tmp_path / "cache" / "views3" / "parts" / "rank0" / "index.jsonl"
    try:
        wait_for(lambda: part.is_file() and len(part.read_text().splitlines()) >= 2, first, "first build's chunk")
        os.kill(first.pid, signal.SIGSTOP)
        second = start(CACHE, tmp_path, 2)
        said = second.stdout.readline()  # its first message: waiting (or, unlocked, its own caching)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    code1, text1, err1 = finish(first)
    code2, text2, err2 = finish(second)
    text2 = said + text2
    assert code1 == 0 and "cached 4 of 4" in text1, err1[-2000:]
    assert code2 == 0 and "cached 4 of 4" in text2, err2[-2000:]
    assert f"process {first.pid} " in text2 and "waiting" in text2  # the second said whom it waited for
    assert len(ShardedCodeCache(tmp_path / "cache" / "views3", 3)) == 8


HOLD = """
import os, signal, sys
from fuselip_med.locks import writer_lock
with writer_lock(sys.argv[1], "test holder"):
    print("held", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)
"""


def held(target: Path) -> subprocess.Popen:
    holder = start(HOLD, target)
    assert holder.stdout.readline().strip() == "held", holder.stderr.read()
    return holder


def test_synthesis_output_held_by_another_process_is_one_error_line(tmp_path):
    import csv

    image = write_png(tmp_path / "a.png", (200, 10, 10))
    with open(tmp_path / "captions.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["path", "caption"], [str(image), "CT of the chest with a left effusion"]])
    out = tmp_path / "qa.jsonl"
    holder = held(out)
    try:
        done = subprocess.run([sys.executable, "-m", "fuselip_med.cli", "data", "synth-vqa", "-i",
                               str(tmp_path / "captions.csv"), "-o", str(out)], cwd=REPO, env=ENV,
                              capture_output=True, text=True, timeout=120)
    finally:
        os.kill(holder.pid, signal.SIGCONT)
        holder.wait(timeout=30)
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith("error:"), lines
    assert f"process {holder.pid} " in lines[0] and "Traceback" not in done.stderr
    assert not out.exists()


def test_a_run_directory_in_use_is_refused_before_any_work(tmp_path):
    from fuselip_med.recipes import recipe_from_dict
    from fuselip_med.train.trainer import Trainer

    run_dir = tmp_path / "run"
    holder = held(run_dir)
    try:
        recipe = recipe_from_dict({"name": "t", "model": {"size": "tiny"},
                                   "data": {"train": [{"name": "rocov2", "path": str(tmp_path / "none")}]},
                                   "train": {"steps": 1, "batch_size": 2}, "logging": {"progress": False},
                                   "output": {"dir": str(run_dir)}})
        with pytest.raises(FolderBusyError, match=f"process {holder.pid} "):
            Trainer(recipe, resume="latest").run()
    finally:
        os.kill(holder.pid, signal.SIGCONT)
        holder.wait(timeout=30)


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path):
    target = tmp_path / "index"
    holder = held(target)
    with pytest.raises(FolderBusyError):
        with writer_lock(target, "index build"):
            pass
    holder.kill()
    holder.wait(timeout=30)
    with writer_lock(target, "index build") as lock:
        assert lock.exists()


def test_a_second_code_cache_build_waits_at_most_code_cache_wait_min_then_names_the_holder(tmp_path):
    from fuselip_med.core.titok import TiTokConfig, TiTokTokenizer
    from fuselip_med.recipes import recipe_from_dict
    from fuselip_med.train.image_codes import ensure_code_cache
    from tests.test_token_cache import images_of, spec_for, write_images

    titok = TiTokTokenizer(TiTokConfig.tiny()).eval()
    spec = spec_for(titok)
    holder = held(tmp_path / "cache" / f"views{spec.views}")  # another build holds the cache
    messages: list[str] = []
    try:
        start_time = time.monotonic()
        with pytest.raises(FolderBusyError) as raised:
            ensure_code_cache(tmp_path / "cache", spec, images_of(write_images(tmp_path / "img", 1), spec),
                              titok.encode, say=messages.append, wait_min=0.02)
        waited = time.monotonic() - start_time
    finally:
        os.kill(holder.pid, signal.SIGCONT)
        holder.wait(timeout=30)
    assert 1.0 <= waited < 30
    assert f"process {holder.pid} " in str(raised.value) and "after 0.02 min of waiting" in str(raised.value)
    assert "train.code_cache_wait_min" in str(raised.value)
    assert len(messages) == 1 and "at most 0.02 min" in messages[0]
    base = {"name": "t", "data": {"train": [{"name": "rocov2", "path": "x"}]}}
    assert recipe_from_dict({**base, "train": {"steps": 1}}).train.code_cache_wait_min == 30
    with pytest.raises(ValueError, match="code_cache_wait_min"):
        recipe_from_dict({**base, "train": {"steps": 1, "code_cache_wait_min": 60}})


def test_the_holder_file_names_the_writer_not_the_command_line_and_goes_with_the_lock(tmp_path, monkeypatch):
    """The command line names inputs (``/data/Doe_John/PID12345``): the holder file keeps pid, host, the writer's
    name and start time only, and is removed when the lock is released."""
    import json

    from fuselip_med.locks import holder_of, lock_path

    monkeypatch.setattr(sys, "argv", ["fuselip-med", "index", "build", "-i", "/data/Doe_John/PID12345", "-o", "x"])
    target = tmp_path / "index"
    holder_file = lock_path(target).with_name(lock_path(target).name + ".holder")
    with writer_lock(target, "index build"):
        text = holder_file.read_text()
        assert "Doe_John" not in text and "PID12345" not in text
        assert set(json.loads(text)) == {"pid", "host", "command", "since"}
        assert holder_of(target).startswith(f"process {os.getpid()} on ") and "(index build) since" in holder_of(target)
    assert not holder_file.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".index.lock"]
