"""SampleDataset / MixtureDataset / Collator / SkipCounter, end to end through a DataLoader with workers."""
import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from fuselip_med.core.text_tokenizer import TextTokenizer
from fuselip_med.data.adapters import ListSource
from fuselip_med.data.collate import Batch, Collator, SkipCounter, collate_samples
from fuselip_med.data.dataset import DecodedSample, MixtureDataset, SampleDataset, SkippedSample
from fuselip_med.data.images import DecodeOptions, ImageDecodeError, decode_image
from fuselip_med.data.sampling import GroupedBatchSampler, mixture_group_weights
from fuselip_med.data.schema import Sample, SampleSide

SIZE = 32
OPTIONS = DecodeOptions(image_size=SIZE)


@pytest.fixture(scope="module")
def tokenizer():
    return TextTokenizer()


def write_png(path, seed, size=(40, 30), mode="RGB"):
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
    return str(path)


@pytest.fixture
def corrupted_set(tmp_path):
    """Good PNGs plus one of each kind of bad item; returns (samples, good ids, {bad id: (reason, label)})."""
    good = [write_png(tmp_path / f"good_{i}.png", i, size=(40 + i, 30), mode="RGB" if i % 2 else "L")
            for i in range(9)]
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    noise = tmp_path / "noise.dcm"
    noise.write_bytes(np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    missing = tmp_path / "missing.png"

    samples = []
    for i, path in enumerate(good):  # image -> caption; groups of 1-3 as hard negatives
        samples.append(Sample(id=f"g{i}", source="fixture", query=SampleSide(image=path),
                              target=SampleSide(text=f"caption {i}"), group=f"grp{i // 3}" if i < 6 else None))
    samples.append(Sample(id="txt2img", source="fixture", query=SampleSide(text="a chest x-ray"),
                          target=SampleSide(image=good[0])))
    good_ids = [s.id for s in samples]

    def bad(id, image, caption):  # image -> caption, as a CSV adapter builds it
        samples.append(Sample(id=id, source="fixture", query=SampleSide(image=image), target=SampleSide(text=caption)))

    bad("truncated", str(truncated), "cut short")
    bad("zero", str(empty), "zero bytes")
    bad("noise", str(noise), "random bytes")
    bad("missing", str(missing), "row naming a missing file")  # as a CSV adapter builds
    bad("empty_caption", good[1], "   ")
    bad("latin1", good[2], "caf\xe9 ".encode("latin-1"))
    expected = {}
    for sample in samples[len(good_ids):]:
        try:
            decode_image(sample.query.image, OPTIONS)
        except ImageDecodeError as error:
            expected[sample.id] = (error.reason, sample.query.image)
    expected["empty_caption"] = ("empty caption", "fixture/empty_caption")
    expected["latin1"] = ("non-UTF-8 text", "fixture/latin1")
    return samples, good_ids, expected


def test_corrupted_files_through_dataloader_workers(corrupted_set, tokenizer):
    samples, good_ids, expected = corrupted_set
    # the contract's reason names for the cases that have one
    assert expected["missing"][0] == "missing file"
    assert expected["zero"][0] == "empty file"
    assert expected["truncated"][0] == "truncated image"
    assert expected["noise"][0] in {"corrupt image", "not an image"}
    assert len(expected) == 6

    dataset = SampleDataset(ListSource(samples, name="fixture"), OPTIONS)
    sampler = GroupedBatchSampler(dataset.groups(), 4, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=2, collate_fn=Collator(tokenizer))
    counter = SkipCounter()
    arrived = []
    for batch in loader:
        assert isinstance(batch, Batch)
        counter.update(batch)
        arrived.extend(batch.ids)
        assert batch.query.text_ids.shape == (len(batch), 180)
        for group in set(batch.groups):  # hard-negative groups arrive whole
            assert batch.groups.count(group) == sum(s.group_key == group for s in samples if s.id in good_ids)
    assert sorted(arrived) == sorted(good_ids)  # every good sample exactly once
    reasons = {}
    for reason, label in expected.values():
        reasons[reason] = reasons.get(reason, 0) + 1
    assert dict(counter.counts) == reasons  # every bad one counted once, with its reason
    assert counter.total == 6 and counter.kept == len(good_ids)
    for reason, label in expected.values():
        assert label in counter.examples[reason]
    summary = counter.summary()
    assert "skipped 6 of 16 sample draws" in summary and "missing file" in summary and "missing.png" in summary
    assert counter.as_dict()["by_reason"] == reasons


def test_strict_mode_raises_naming_the_file(corrupted_set):
    samples, good_ids, _ = corrupted_set
    dataset = SampleDataset(ListSource(samples), OPTIONS, strict=True)
    assert isinstance(dataset[0], DecodedSample)
    index = next(i for i, s in enumerate(samples) if s.id == "missing")
    with pytest.raises(ValueError, match="missing.png.*missing file"):
        dataset[index]
    index = next(i for i, s in enumerate(samples) if s.id == "empty_caption")
    with pytest.raises(ValueError, match="empty_caption.*empty caption"):
        dataset[index]


def test_decoded_sample_fields_and_text_checks(tmp_path):
    png = write_png(tmp_path / "a.png", 0)
    samples = [
        Sample(id="it", source="s", query=SampleSide(image=png, text="left lung"), target=SampleSide(text="nodule"),
               meta={"k": 1}),
        Sample(id="surrogate", source="s", query=SampleSide(image=png), target=SampleSide(text="bad \udcff text")),
        Sample(id="no_target", source="s", query=SampleSide(image=png)),
        Sample(id="utf8_bytes", source="s", query=SampleSide(image=png),
               target=SampleSide(text="caf\xe9".encode("utf-8"))),
        Sample(id="image_only_with_blank_text", source="s", query=SampleSide(image=png, text=" "),
               target=SampleSide(image=png)),
    ]
    dataset = SampleDataset(ListSource(samples), OPTIONS)
    item = dataset[0]
    assert isinstance(item, DecodedSample)
    assert item.query.pixels.shape == (3, SIZE, SIZE) and item.query.pixels.dtype == torch.float32
    assert item.target.pixels is None and item.target.text == "nodule" and item.meta == {"k": 1}
    assert item.group == "s/it"
    assert torch.equal(item.query.pixels, decode_image(png, OPTIONS))  # eval mode: the reference squash
    assert isinstance(dataset[1], SkippedSample) and dataset[1].reason == "non-UTF-8 text"
    assert dataset[2].reason == "empty caption" and "target" in dataset[2].detail
    assert dataset[3].target.text == "caf\xe9"
    assert isinstance(dataset[4], DecodedSample)  # blank text beside an image is fine


def test_train_crops_are_reproducible_across_worker_counts_and_vary_by_epoch(tmp_path, tokenizer):
    samples = [Sample(id=str(i), source="s", query=SampleSide(image=write_png(tmp_path / f"{i}.png", i, size=(50, 40))),
                      target=SampleSide(text="x")) for i in range(8)]

    def run(num_workers, epoch, persistent=False):
        dataset = SampleDataset(ListSource(samples), OPTIONS, train=True, seed=7)
        loader = DataLoader(dataset, batch_size=3, num_workers=num_workers, collate_fn=Collator(tokenizer),
                            persistent_workers=persistent)
        dataset.set_epoch(epoch)
        return torch.cat([b.query.pixels for b in loader]), (dataset, loader)

    single, _ = run(0, 0)
    assert torch.equal(single, run(2, 0)[0])
    epoch1, _ = run(0, 1)
    assert not torch.equal(single, epoch1)
    assert not torch.equal(single, torch.stack([decode_image(s.query.image, OPTIONS) for s in samples]))
    # persistent workers see set_epoch (the epoch lives in shared memory)
    first, (dataset, loader) = run(2, 0, persistent=True)
    dataset.set_epoch(1)
    assert torch.equal(torch.cat([b.query.pixels for b in loader]), epoch1)


def test_collator_mixed_rows_shapes_masks_and_pickling(tmp_path, tokenizer):
    png = write_png(tmp_path / "a.png", 0)
    dataset = SampleDataset(ListSource([
        Sample(id="image_only", source="s", query=SampleSide(image=png), target=SampleSide(image=png)),
        Sample(id="text_only", source="s", query=SampleSide(text="pleural effusion"),
               target=SampleSide(text="chest x-ray")),
        Sample(id="image_text", source="s", query=SampleSide(image=png, text="rotate 90 degrees"),
               target=SampleSide(image=png)),
        Sample(id="img2txt", source="t", query=SampleSide(image=png),
               target=SampleSide(text="axial ct of the abdomen")),
    ]), OPTIONS)
    items = [dataset[i] for i in range(4)] + [SkippedSample("bad", "s", "missing file", "", "/x.png")]
    collator = Collator(tokenizer)
    batch = collator(items)
    assert len(batch) == 4 and batch.ids == ["image_only", "text_only", "image_text", "img2txt"]
    assert batch.sources == ["s", "s", "s", "t"] and batch.skipped == [("/x.png", "missing file")]
    for ids in (batch.query.text_ids, batch.target.text_ids):
        assert ids.shape == (4, 180) and ids.dtype == torch.long
    sot, eot = tokenizer.sot_token_id, tokenizer.eot_token_id
    assert batch.query.text_ids[0, :3].tolist() == [sot, eot, 0]  # None -> "" -> [sot, eot]
    assert torch.equal(batch.query.text_ids[1], tokenizer(["pleural effusion"])[0])
    assert batch.query.has_image.tolist() == [True, False, True, True]
    assert batch.target.has_image.tolist() == [True, False, True, False]
    assert batch.query.has_image.dtype == torch.bool
    assert batch.query.pixels.shape == (3, 3, SIZE, SIZE) and batch.query.pixels.dtype == torch.float32
    assert batch.target.pixels.shape == (2, 3, SIZE, SIZE)
    assert batch.query.image_ids is None and batch.target.image_ids is None
    assert torch.equal(batch.query.pixels[1], decode_image(png, OPTIONS))

    clone = pickle.loads(pickle.dumps(collator))
    again = clone(items)
    assert torch.equal(again.query.text_ids, batch.query.text_ids)
    assert torch.equal(again.target.pixels, batch.target.pixels)
    moved = batch.to("cpu", non_blocking=True)
    assert moved.ids == batch.ids and torch.equal(moved.query.pixels, batch.query.pixels)
    assert collate_samples(items, tokenizer).ids == batch.ids

    # only text rows on a side -> no tensor; only skipped items -> an empty batch
    text_batch = collator([items[1]])
    assert text_batch.query.pixels is None and text_batch.query.has_image.tolist() == [False]
    empty = collator([items[-1]])
    assert len(empty) == 0 and empty.query.text_ids.shape == (0, 180) and empty.skipped == [("/x.png", "missing file")]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batch_pin_memory_and_to_cuda(tmp_path, tokenizer):
    png = write_png(tmp_path / "a.png", 0)
    dataset = SampleDataset(ListSource([Sample(id="a", source="s", query=SampleSide(image=png),
                                               target=SampleSide(text="x"))]), OPTIONS)
    loader = DataLoader(dataset, batch_size=1, collate_fn=Collator(tokenizer), pin_memory=True)
    batch = next(iter(loader))
    assert batch.query.pixels.is_pinned() and batch.query.text_ids.is_pinned()
    on_gpu = batch.to("cuda", non_blocking=True)
    assert on_gpu.query.pixels.is_cuda and on_gpu.query.has_image.is_cuda and on_gpu.ids == ["a"]


def test_mixture_dataset_offsets_groups_and_weights(tmp_path):
    png = write_png(tmp_path / "a.png", 0)

    def source(name, n, group_size):
        return ListSource([Sample(id=str(i), source=name, query=SampleSide(image=png), target=SampleSide(text="t"),
                                  group=str(i // group_size)) for i in range(n)], name=name)

    a = SampleDataset(source("a", 6, 2), OPTIONS)
    b = SampleDataset(source("b", 4, 1), OPTIONS)
    mixture = MixtureDataset([a, b], [1.0, 3.0])
    assert len(mixture) == 10
    assert mixture.groups() == [[0, 1], [2, 3], [4, 5], [6], [7], [8], [9]]
    assert [mixture.dataset_of(i) for i in (0, 5, 6, 9)] == [0, 0, 1, 1]
    assert mixture[7].source == "b" and mixture[7].id == "1"
    weights = mixture_group_weights(mixture)
    assert weights == pytest.approx([1 / 6] * 3 + [3 / 4] * 4)
    mixture.set_epoch(3)
    assert a.epoch == b.epoch == 3
    with pytest.raises(ValueError, match="weights"):
        MixtureDataset([a, b], [1.0])
    with pytest.raises(IndexError):
        mixture[10]


def test_skip_counter_without_skips():
    counter = SkipCounter()
    counter.update([])
    assert counter.summary().startswith("no sample draws skipped") and counter.as_dict()["skipped"] == 0
