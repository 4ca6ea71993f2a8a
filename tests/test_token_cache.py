"""The code cache of training views: exact ids, invalidation by content, resumable and self-repairing builds."""
import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fuselip_med.core.image_preprocess import ImagePreprocess
from fuselip_med.core.titok import TiTokConfig, TiTokTokenizer
from fuselip_med.data import token_cache
from fuselip_med.data.hashing import content_hash
from fuselip_med.data.images import DecodeOptions, decode_image
from fuselip_med.data.token_cache import (
    CODES_FILE,
    INDEX_FILE,
    CodeCache,
    ViewSpec,
    decode_view,
    draw_view,
    row_key,
    titok_fingerprint,
)
from fuselip_med.train.image_codes import ensure_code_cache

REPO = Path(__file__).resolve().parents[1]
VIEWS = 3


@pytest.fixture(scope="module")
def titok():
    torch.manual_seed(0)
    return TiTokTokenizer(TiTokConfig.tiny()).eval()


def write_images(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for number in range(count):
        path = folder / f"{number}.png"
        Image.fromarray(rng.integers(0, 255, (40 + number, 48, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def spec_for(titok, **decode) -> ViewSpec:
    return ViewSpec(DecodeOptions(**decode), VIEWS, titok_fingerprint("tiny", titok))


def images_of(paths, spec):
    found = {}
    for path in paths:
        content = content_hash(path)
        found[row_key(content, spec)] = (content, path)
    return found


@dataclasses.dataclass
class WiderCrops(ImagePreprocess):
    scale: tuple[float, float] = (0.5, 1.0)


class Counting:
    """A tokenizer that counts the images it is given."""

    def __init__(self, titok):
        self.titok, self.images = titok, 0

    def __call__(self, pixels):
        self.images += pixels.shape[0]
        return self.titok.encode(pixels)


def test_cached_ids_equal_the_on_the_fly_ids_of_the_same_view(tmp_path, titok):
    paths = write_images(tmp_path / "img", 3)
    spec = spec_for(titok)
    images = images_of(paths, spec)
    messages = []
    cache = ensure_code_cache(tmp_path / "cache", spec, images, titok.encode, say=messages.append)
    assert len(cache) == 3 and "Caching image codes: 3 of 3 images" in messages[0]
    assert cache.codes.dtype == np.uint16 and cache.codes.shape == (3, VIEWS + 1, 128)
    for key, (content, path) in images.items():
        for view in range(VIEWS + 1):
            pixels = decode_view(path, spec.decode, content, view, VIEWS)
            with torch.no_grad():
                assert torch.equal(cache.get(key, view), titok.encode(pixels[None])[0])
        plain = decode_image(path, spec.decode)
        assert torch.equal(decode_view(path, spec.decode, content, VIEWS, VIEWS), plain)
        assert not torch.equal(decode_view(path, spec.decode, content, 0, VIEWS), plain)  # an augmented crop
    draws = {draw_view(7, epoch, 5, 0, VIEWS) for epoch in range(20)}
    assert draws == set(range(VIEWS)) and draw_view(7, 1, 5, 0, VIEWS) == draw_view(7, 1, 5, 0, VIEWS)


def test_an_edited_image_is_tokenized_again_and_the_others_are_not(tmp_path, titok, monkeypatch):
    paths = write_images(tmp_path / "img", 4)
    spec = spec_for(titok)
    counting = Counting(titok)
    ensure_code_cache(tmp_path / "cache", spec, images_of(paths, spec), counting)
    assert counting.images == 4 * (VIEWS + 1)
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(paths[2])  # edited after caching
    counting.images = 0
    cache = ensure_code_cache(tmp_path / "cache", spec, images_of(paths, spec), counting)
    assert counting.images == VIEWS + 1  # only the edited image
    edited = images_of([paths[2]], spec)
    key, (content, path) = next(iter(edited.items()))
    assert torch.equal(cache.get(key, 1), titok.encode(decode_view(path, spec.decode, content, 1, VIEWS)[None])[0])
    # other preprocessing, crop range or tokenizer makes new keys: everything is tokenized for it
    before = spec.fingerprint()
    monkeypatch.setattr(token_cache, "ImagePreprocess", WiderCrops)
    assert spec.fingerprint() != before
    monkeypatch.undo()
    counting.images = 0
    other = spec_for(titok, resize="pad")
    ensure_code_cache(tmp_path / "cache", other, images_of(paths, other), counting)
    assert counting.images == 4 * (VIEWS + 1) and other.fingerprint() != spec.fingerprint()
    retrained = TiTokTokenizer(TiTokConfig.tiny())
    with torch.no_grad():
        next(retrained.parameters()).add_(1.0)
    assert titok_fingerprint("tiny", retrained) != titok_fingerprint("tiny", titok)


def test_a_damaged_cache_is_reported_and_rebuilt(tmp_path, titok):
    paths = write_images(tmp_path / "img", 3)
    spec = spec_for(titok)
    images = images_of(paths, spec)
    reference = ensure_code_cache(tmp_path / "cache", spec, images, titok.encode)
    expected = {key: reference.get(key, 0) for key in images}
    codes_file = tmp_path / "cache" / "views3" / CODES_FILE
    raw = bytearray(codes_file.read_bytes())
    raw[reference.row_bytes + 10] ^= 0xFF  # one flipped byte in the second row
    codes_file.write_bytes(bytes(raw))
    messages, counting = [], Counting(titok)
    cache = ensure_code_cache(tmp_path / "cache", spec, images, counting, say=messages.append)
    assert any("1 row(s) failed their checksum" in m for m in messages)
    assert counting.images == VIEWS + 1
    assert all(torch.equal(cache.get(key, 0), expected[key]) for key in images)

    (tmp_path / "cache" / "views3" / INDEX_FILE).write_bytes(b"\x00garbage")
    messages, counting.images = [], 0
    cache = ensure_code_cache(tmp_path / "cache", spec, images, counting, say=messages.append)
    assert any("no readable header; rebuilding it" in m for m in messages)
    assert counting.images == 3 * (VIEWS + 1) and all(torch.equal(cache.get(k, 0), expected[k]) for k in images)


KILLED_BUILD = """
import sys, time
from pathlib import Path
import torch
from fuselip_med.core.image_preprocess import ImagePreprocess
from fuselip_med.core.titok import TiTokConfig, TiTokTokenizer
from fuselip_med.data import token_cache
from tests.test_token_cache import images_of, spec_for, write_images
from fuselip_med.train.image_codes import ensure_code_cache

root = Path(sys.argv[1])
torch.manual_seed(0)
titok = TiTokTokenizer(TiTokConfig.tiny()).eval()
spec = spec_for(titok)
original = token_cache.CodeCache.append
def slow_append(self, keys, codes):
    original(self, keys, codes)
    if self.count >= 2:
        (root / "marker").write_text("committed")
        time.sleep(600)
token_cache.CodeCache.append = slow_append
ensure_code_cache(root / "cache", spec, images_of(write_images(root / "img", 5), spec), titok.encode,
                  images_per_batch=1)
"""


def test_a_build_killed_midway_resumes_where_it_stopped(tmp_path, titok):
    script = tmp_path / "build.py"
    script.write_text(KILLED_BUILD)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "marker").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    part = CodeCache(tmp_path / "cache" / "views3" / "parts" / "rank0", VIEWS, writable=False)
    assert len(part) == 2  # two committed chunks of one image survived the kill
    spec = spec_for(titok)
    images = images_of(write_images(tmp_path / "img", 5), spec)
    counting = Counting(titok)
    cache = ensure_code_cache(tmp_path / "cache", spec, images, counting)
    assert counting.images == 3 * (VIEWS + 1) and len(cache) == 5
    fresh = ensure_code_cache(tmp_path / "fresh", spec, images, titok.encode)
    assert all(torch.equal(cache.get(k, v), fresh.get(k, v)) for k in images for v in range(VIEWS + 1))
    assert not (tmp_path / "cache" / "views3" / "parts").exists()



def test_an_unreadable_image_is_named_and_left_out(tmp_path, titok):
    paths = write_images(tmp_path / "img", 2)
    broken = tmp_path / "img" / "broken.png"
    broken.write_bytes(b"not a png")
    spec = spec_for(titok)
    messages = []
    cache = ensure_code_cache(tmp_path / "cache", spec, images_of(paths + [broken], spec), titok.encode,
                              say=messages.append)
    assert len(cache) == 2 and row_key(content_hash(broken), spec) not in cache
    assert any("not cached" in m and content_hash(broken)[:12] in m for m in messages)
