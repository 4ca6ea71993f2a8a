"""TokenCache: atomic build, lookups, pickling, and serving ids through SampleDataset + Collator."""
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from fuselip_med.core.text_tokenizer import TextTokenizer
from fuselip_med.data.adapters import ListSource
from fuselip_med.data.collate import Collator
from fuselip_med.data.dataset import SampleDataset
from fuselip_med.data.images import DecodeOptions, decode_image
from fuselip_med.data.schema import Sample
from fuselip_med.data.token_cache import TokenCache, build_token_cache, image_key

OPTIONS = DecodeOptions(image_size=16)


def fake_tokenizer(pixels):
    """Stands in for TiTok: 128 ids per image, a function of its pixels."""
    base = (pixels.mean(dim=(1, 2, 3)) * 1000).long()
    return base[:, None] + torch.arange(128)


def test_build_get_and_reopen(tmp_path):
    keys = [f"k{i}" for i in range(5)]
    pixels = torch.rand(5, 3, 16, 16)
    path = tmp_path / "cache"
    cache = TokenCache.build(path, keys, [pixels[:2], pixels[2:]], fake_tokenizer, meta={"tokenizer": "fake"})
    expected = fake_tokenizer(pixels)
    assert len(cache) == 5 and "k3" in cache and cache.meta == {"tokenizer": "fake"}
    got = cache.get(["k3", "k0"])
    assert got.dtype == torch.long and torch.equal(got, expected[[3, 0]])
    assert cache.get(["k1", "nope"]) is None
    assert torch.equal(cache.get_one("k4"), expected[4]) and cache.get_one("nope") is None
    assert np.load(path / "codes.npy", mmap_mode="r").dtype == np.int16
    reopened = pickle.loads(pickle.dumps(TokenCache(path)))
    assert torch.equal(reopened.get(keys), expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # no temp dirs left


def test_build_is_atomic_and_checks_inputs(tmp_path):
    path = tmp_path / "cache"
    TokenCache.build(path, ["a"], [torch.rand(1, 3, 16, 16)], fake_tokenizer)
    with pytest.raises(FileExistsError, match="overwrite"):
        TokenCache.build(path, ["b"], [torch.rand(1, 3, 16, 16)], fake_tokenizer)

    def failing_batches():
        yield torch.rand(1, 3, 16, 16)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        TokenCache.build(path, ["b", "c"], failing_batches(), fake_tokenizer, overwrite=True)
    assert "a" in TokenCache(path) and sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # old cache intact
    with pytest.raises(ValueError, match="2 keys"):
        TokenCache.build(tmp_path / "x", ["a", "b"], [torch.rand(1, 3, 16, 16)], fake_tokenizer)
    with pytest.raises(ValueError, match="int32"):
        TokenCache.build(tmp_path / "y", ["a"], [torch.rand(1, 3, 16, 16)], lambda p: torch.full((1, 128), 40000))
    big = TokenCache.build(tmp_path / "z", ["a"], [torch.rand(1, 3, 16, 16)], lambda p: torch.full((1, 128), 40000),
                           dtype=np.int32)
    assert int(big.get(["a"])[0, 0]) == 40000
    replaced = TokenCache.build(path, ["b", "b"], [torch.rand(2, 3, 16, 16)], fake_tokenizer, overwrite=True)
    assert len(replaced) == 1 and "a" not in replaced  # duplicate keys keep one row
    with pytest.raises(FileNotFoundError, match="no token cache"):
        TokenCache(tmp_path / "absent")


def test_image_key_depends_on_image_and_options(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert image_key("a.png", OPTIONS, "s/1#query") == image_key(tmp_path / "sub" / ".." / "a.png", OPTIONS, "")
    assert image_key(tmp_path / "a.png", OPTIONS, "") == image_key(str(tmp_path / "a.png"), OPTIONS, "other")
    assert image_key(tmp_path / "a.png", OPTIONS, "") != image_key(tmp_path / "a.png", DecodeOptions(), "")
    assert image_key(b"abc", OPTIONS, "x") == image_key(b"abc", OPTIONS, "y") != image_key(b"abd", OPTIONS, "x")
    array = np.zeros((4, 4), np.uint8)
    assert image_key(array, OPTIONS, "s/1#query") != image_key(array, OPTIONS, "s/2#query")


def test_dataset_serves_cached_ids_and_collator_stacks_them(tmp_path):
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(np.full((20, 24), 60 * i, np.uint8)).save(paths[-1])
    (tmp_path / "bad.png").write_bytes(b"")
    samples = [Sample(id=str(i), source="s", query_image=p, target_text=f"c{i}") for i, p in enumerate(paths)]
    samples.append(Sample(id="pair", source="s", query_image=paths[0], query_text="edit", target_image=paths[1]))
    samples.append(Sample(id="bad", source="s", query_image=str(tmp_path / "bad.png"), target_text="x"))
    samples.append(Sample(id="bytes", source="s", query_image=open(paths[2], "rb").read(), target_text="b"))
    dataset = SampleDataset(ListSource(samples), OPTIONS)

    cache = build_token_cache(dataset, tmp_path / "cache", fake_tokenizer, batch_size=2, num_workers=2)
    assert len(cache) == 4  # three files + the bytes image; repeats and the bad file left out

    cached = SampleDataset(ListSource(samples), OPTIONS, token_cache=cache)
    item = cached[3]
    assert item.query_pixels is None and item.target_pixels is None
    assert torch.equal(item.query_image_ids, fake_tokenizer(decode_image(paths[0], OPTIONS)[None])[0])
    batch = Collator(TextTokenizer())([cached[i] for i in range(len(samples))])
    assert batch.ids == ["0", "1", "2", "pair", "bytes"]
    assert batch.skipped == [(str(tmp_path / "bad.png"), "empty file")]
    assert batch.query_pixels is None and batch.query_image_ids.shape == (5, 128)
    assert batch.query_image_ids.dtype == torch.long
    assert batch.target_image_ids.shape == (1, 128) and batch.target_has_image.tolist() == [0, 0, 0, 1, 0]
    assert torch.equal(batch.query_image_ids[4], batch.query_image_ids[2])  # same pixels, bytes vs path

    # an image missing from the cache is decoded; a batch mixing both on one side is refused clearly
    extra = str(tmp_path / "extra.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(extra)
    new = Sample(id="new", source="s", query_image=extra, target_text="n")
    partial = SampleDataset(ListSource([samples[0], new]), OPTIONS, token_cache=cache)
    assert partial[1].query_pixels is not None
    mixed = Collator(TextTokenizer())([partial[0], partial[1]])
    assert mixed.query_has_codes.tolist() == [True, False] and mixed.query_pixels.shape[0] == 1
    with pytest.raises(ValueError, match="train"):
        SampleDataset(ListSource(samples), OPTIONS, train=True, token_cache=cache)
