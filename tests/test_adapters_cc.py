"""The cc adapter on fixtures in both published layouts: the reference CSV (path,caption) and webdataset shards."""
from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from fuselip_med.data.adapters import BadRowError, DatasetEmptyError, DatasetNotFoundError, SampleSource, get_adapter
from fuselip_med.data.adapters.cc import CCSource, cc, expand_braces
from fuselip_med.data.dataset import DecodedSample, SampleDataset, SkippedSample
from fuselip_med.data.images import DecodeOptions
from fuselip_med.data.sampling import GroupedBatchSampler


def image_bytes(number: int, fmt: str = "JPEG") -> bytes:
    """A 32x32 image whose grey level encodes ``number`` (robust to JPEG)."""
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (8 * number,) * 3).save(buffer, format=fmt)
    return buffer.getvalue()


def number_of(image) -> int:
    source = io.BytesIO(image) if isinstance(image, bytes) else image
    return round(float(np.asarray(Image.open(source).convert("L")).mean()) / 8)


# ------------------------------------------------------------------------------------------------- CSV


def write_csv(root: Path) -> Path:
    """The reference CSV: header path,caption; relative and absolute paths; pandas quoting."""
    images = root / "images"
    images.mkdir(parents=True)
    for n in (1, 2, 3, 4, 6, 7):
        (images / f"{n:09d}.jpg").write_bytes(image_bytes(n))
    absolute = images / f"{2:09d}.jpg"
    rows = [
        "path,caption",
        'images/000000001.jpg,"a dog, running on grass"',
        f"{absolute},an absolute path",
        'images/000000003.jpg,"two lines\nof caption"',
        "images/000000004.jpg,",  # empty caption
        "images/000000005.jpg,its image is missing",
        "images/000000006.jpg,NA",  # stays the text "NA" (keep_default_na=False)
        "images/000000007.jpg,  padded caption  ",
        "images/000000001.jpg,the same image again",
    ]
    table = root / "cc3m_train.csv"
    table.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return table


def test_csv_pairs_paths_and_skips(tmp_path):
    table = write_csv(tmp_path / "cc3m")
    source = get_adapter("cc")(path=str(table), split="train")
    assert isinstance(source, CCSource) and isinstance(source, SampleSource) and source.layout == "csv"
    assert source.ids == ["000000001", "000000002", "000000003", "000000006", "000000007", "000000001#2"]
    assert source.captions == ["a dog, running on grass", "an absolute path", "two lines of caption", "NA",
                               "padded caption", "the same image again"]
    assert dict(source.skipped) == {"empty caption": 1, "missing image": 1}
    sample = source[0]
    assert sample.query.image == str(table.parent / "images" / "000000001.jpg") and sample.query.text is None
    assert sample.target.text == "a dog, running on grass" and sample.target.image is None
    assert sample.source == "cc" and sample.group_key == "cc/000000001"
    assert [number_of(source[i].query.image) for i in range(len(source))] == [1, 2, 3, 6, 7, 1]
    assert source.groups() == [[i] for i in range(len(source))]
    assert len(cc(table, limit=2)) == 2


def test_csv_strict_bad_rows_and_missing_columns(tmp_path):
    table = write_csv(tmp_path / "cc3m")
    with pytest.raises(BadRowError, match=r"cc3m_train.csv, row 4: empty caption"):
        cc(table, strict=True)
    bad = tmp_path / "bad.csv"
    bad.write_text("path,caption\ncc3m/images/000000001.jpg,fine\ncc3m/images/000000002.jpg,too,many,fields\n")
    source = cc(bad)
    assert len(source) == 1 and source.skipped["bad csv row"] == 1
    with pytest.raises(BadRowError, match="bad csv row"):
        cc(bad, strict=True)
    other = tmp_path / "other.csv"
    other.write_text("filepath,title\nx.jpg,y\n")
    with pytest.raises(DatasetEmptyError, match=r"lacks the column\(s\) \['path', 'caption'\]"):
        cc(other)
    empty = tmp_path / "empty.csv"
    empty.write_text("path,caption\ncc3m/images/000000004.jpg,\n")
    with pytest.raises(DatasetEmptyError,
                       match=r"empty.csv has no usable sample \(skipped 1 of 1 rows: 1 empty caption"):
        cc(empty)
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        cc(tmp_path / "nope.csv")


# ------------------------------------------------------------------------------------------ webdataset


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            add(tar, name, data)


def sample_members(key: str, number: int, caption: bytes | None = None, ext: str = "jpg") -> list[tuple[str, bytes]]:
    members = [(f"{key}.{ext}", image_bytes(number, "PNG" if ext == "png" else "JPEG"))]
    members.append((f"{key}.txt", caption if caption is not None else f"caption {number}".encode()))
    members.append((f"{key}.json", b'{"key": "%s", "status": "success"}' % key.encode()))
    return members


def write_shards(root: Path) -> Path:
    """Three train shards as pixparse/cc3m-wds names them; the second is cut short, the third is not a tar."""
    root.mkdir(parents=True)
    shard0 = (sample_members("000000000", 0) + sample_members("000000001", 1, ext="png")
              + [("000000002.jpg", image_bytes(2))]  # no caption
              + sample_members("000000003", 3, caption=b"   ")  # empty caption
              + sample_members("000000004", 4, caption=b"caf\xe9")  # not UTF-8
              + [("000000005.txt", b"no image")]
              + [("000000006.jpg", b"\xff\xd8 not really a jpeg"), ("000000006.txt", b"corrupt image bytes")]
              + sample_members("000000007", 7, caption=b"  line one\nline two "))
    write_shard(root / "cc3m-train-0000.tar", shard0)
    shard1 = root / "cc3m-train-0001.tar"
    write_shard(shard1, sample_members("000000010", 10) + sample_members("000000011", 11)
                + sample_members("000000001", 1))  # a key seen in shard 0
    with tarfile.open(shard1) as tar:
        last = tar.getmember("000000001.txt")
    shard1.write_bytes(shard1.read_bytes()[: last.offset_data + 1])  # truncated inside the last sample
    (root / "cc3m-train-0002.tar").write_bytes(b"this is not a tar archive" * 40)
    write_shard(root / "cc3m-validation-0000.tar", sample_members("000000100", 20))
    return root


def test_shards_index_offsets_and_count_damage(tmp_path):
    root = write_shards(tmp_path / "cc3m-wds")
    source = cc(str(root / "cc3m-train-{0000..0002}.tar"))
    assert source.layout == "wds" and source.name == "cc/train"
    assert source.ids == ["000000000", "000000001", "000000006", "000000007", "000000010", "000000011"]
    assert source.captions == ["caption 0", "caption 1", "corrupt image bytes", "line one line two", "caption 10",
                               "caption 11"]
    assert dict(source.skipped) == {"missing caption": 1, "empty caption": 1, "non-utf8 text": 1,
                                    "missing image": 1, "truncated member": 1, "corrupt shard": 2}
    images = [source[i].query.image for i in range(len(source))]
    assert all(isinstance(image, bytes) for image in images)
    assert images[1].startswith(b"\x89PNG")
    assert [number_of(images[i]) for i in (0, 1, 3, 4, 5)] == [0, 1, 7, 10, 11]
    assert source[4].target.text == "caption 10" and source[4].meta["shard"].endswith("cc3m-train-0001.tar")

    # the folder form picks the split's shards; limit stops early
    assert cc(root, split="validation").ids == ["000000100"]
    assert cc(root, split="train", limit=2).ids == ["000000000", "000000001"]
    assert cc(str(root / "cc3m-train-000[01].tar")).ids == source.ids  # globs too
    with pytest.raises(BadRowError, match=r"cc3m-train-0000.tar: 000000002: missing caption"):
        cc(str(root / "cc3m-train-0000.tar"), strict=True)
    with pytest.raises(DatasetNotFoundError, match="no '\\*-test-\\*.tar'"):
        cc(root, split="test")


def test_missing_and_unreadable_shards_are_counted(tmp_path, monkeypatch):
    import builtins

    import fuselip_med.data.adapters.cc as cc_module

    root = write_shards(tmp_path / "cc3m-wds")
    source = cc(str(root / "cc3m-train-{0000..0001}.tar"))
    listed = cc(str(root / "cc3m-{train-0000,train-0001,train-0009}.tar"))
    assert listed.ids == source.ids and listed.skipped["missing shard"] == 1

    def deny(file, *args, **kwargs):
        if str(file).endswith("cc3m-train-0001.tar"):
            raise PermissionError(13, "Permission denied", str(file))
        return builtins.open(file, *args, **kwargs)

    monkeypatch.setattr(cc_module, "open", deny, raising=False)
    partial = cc(str(root / "cc3m-train-{0000..0001}.tar"))
    assert partial.ids == source.ids[:4] and partial.skipped["unreadable shard"] == 1
    with pytest.raises(BadRowError, match="unreadable shard"):
        cc(str(root / "cc3m-train-0001.tar"), strict=True)


def test_damaged_header_mid_shard_keeps_earlier_members(tmp_path):
    shard = tmp_path / "cc12m-train-0000.tar"
    write_shard(shard, sample_members("a", 1) + sample_members("b", 2) + sample_members("c", 3))
    with tarfile.open(shard) as tar:
        header = tar.getmember("b.jpg").offset
    data = bytearray(shard.read_bytes())
    data[header: header + 100] = b"\x01" * 100  # scribble over a header: checksum fails
    shard.write_bytes(bytes(data))
    source = cc(shard)
    assert source.ids == ["a"] and source.skipped["corrupt shard"] == 1


def test_shards_read_lazily_in_dataloader_workers(tmp_path):
    root = write_shards(tmp_path / "cc3m-wds")
    source = cc(str(root / "cc3m-train-{0000..0001}.tar"))
    clone = pickle.loads(pickle.dumps(source))
    assert clone[3].query.image == source[3].query.image
    dataset = SampleDataset(source, DecodeOptions(image_size=32))
    loader = DataLoader(dataset, batch_size=None, num_workers=1)
    items = list(loader)
    skipped = [item for item in items if isinstance(item, SkippedSample)]
    assert [item.id for item in skipped] == ["000000006"] and skipped[0].reason == "not an image"
    decoded = [item for item in items if isinstance(item, DecodedSample)]
    assert len(decoded) == 5 and decoded[0].query.pixels.shape == (3, 32, 32)


def test_sampler_and_tgit_task_on_top(tmp_path):
    from fuselip_med.data.transforms.tasks import TGITTask

    source = cc(str(write_shards(tmp_path / "cc3m-wds") / "cc3m-train-{0000..0001}.tar"))
    task = get_adapter("tgit")(source, identity_fraction=0.5, eval_fraction=0.0, seed=1)
    assert isinstance(task, TGITTask) and task.name == "cc/train+tgit"
    owner = {i: g for g, members in enumerate(task.groups()) for i in members}
    for batch in GroupedBatchSampler(task.groups(), 12, seed=0):
        for g in {owner[i] for i in batch}:
            assert set(task.groups()[g]) <= set(batch)
    kinds = [task.item_kind(i) for i in range(len(task))]
    assert "identity" in kinds and len(set(kinds)) > 1
    sample = task[kinds.index("identity")]
    assert sample.target.text in source.captions and isinstance(sample.query.image, bytes)
    pair = task[kinds.index(next(k for k in kinds if k != "identity"))]  # rendered from the lazily read bytes
    assert pair.query.text and pair.target.image is not None


def test_expand_braces():
    assert expand_braces("cc3m-train-{0000..0002}.tar") == [f"cc3m-train-{n:04d}.tar" for n in range(3)]
    assert expand_braces("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]
    assert expand_braces("x{2..0}") == ["x2", "x1", "x0"]
    assert expand_braces("keep{me}-{1..2}") == ["keep{me}-1", "keep{me}-2"]
