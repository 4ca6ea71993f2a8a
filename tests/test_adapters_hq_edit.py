"""The hq_edit adapter on parquet shards in the published schema (HF Image structs with PNG bytes)."""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fuselip_med.data.adapters import BadRowError, DatasetEmptyError, DatasetNotFoundError, get_adapter
from fuselip_med.data.adapters.hq_edit import HQEditSource, hq_edit
from fuselip_med.data.sampling import GroupedBatchSampler


def png(level: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 24), (level, 255 - level, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def level_of(image: bytes) -> int:
    return int(np.asarray(Image.open(io.BytesIO(image)))[0, 0, 0])


def row(k: int, **changes) -> dict:
    values = {"input": f"input text {k}", "input_image": {"bytes": png(2 * k), "path": None},
              "edit": f"make it {k}", "inverse_edit": f"undo {k}", "output": f"output text {k}",
              "output_image": {"bytes": png(2 * k + 1), "path": None}}
    values.update(changes)
    return values


def write_hq_edit(root: Path) -> Path:
    """Two shards as the hub publishes them: data/train-0000N-of-00002.parquet."""
    from datasets import Dataset, Features, Image as HFImage, Value

    features = Features({"input": Value("string"), "input_image": HFImage(), "edit": Value("string"),
                         "inverse_edit": Value("string"), "output": Value("string"), "output_image": HFImage()})
    shards = [
        [row(0), row(1, inverse_edit=""), row(2)],  # row 1: no inverse edit
        [row(3, output_image=None), row(4, output=""), row(5, edit=None)],  # 3: no output image; 5: no edit
    ]
    (root / "data").mkdir(parents=True)
    for number, rows in enumerate(shards):
        columns = {name: [r[name] for r in rows] for name in features}
        Dataset.from_dict(columns, features=features).to_parquet(
            str(root / "data" / f"train-{number:05d}-of-00002.parquet"))
    return root


@pytest.fixture
def hq(tmp_path) -> Path:
    return write_hq_edit(tmp_path / "HQ-Edit")


def test_three_samples_per_row_and_groups(hq, tmp_path):
    source = get_adapter("hq_edit")(path=str(hq), split="train", cache_dir=str(tmp_path / "hf_cache"))
    assert isinstance(source, HQEditSource) and source.name == "hq_edit/train"
    assert source.rows == [0, 2, 4] and len(source) == 9
    assert dict(source.skipped) == {"empty inverse edit": 1, "missing image": 1, "empty edit": 1}
    n = 3
    for i, k in enumerate(source.rows):
        forward, inverse, with_text = source[i], source[n + i], source[2 * n + i]
        assert forward.query.text == f"make it {k}" and forward.target.text is None
        assert (level_of(forward.query.image), level_of(forward.target.image)) == (2 * k, 2 * k + 1)
        assert inverse.query.text == f"undo {k}" and inverse.target.text is None
        assert (level_of(inverse.query.image), level_of(inverse.target.image)) == (2 * k + 1, 2 * k)
        assert with_text.query.text == f"make it {k}"
        assert (level_of(with_text.query.image), level_of(with_text.target.image)) == (2 * k, 2 * k + 1)
        assert forward.group_key == inverse.group_key != with_text.group_key
        assert (forward.id, inverse.id, with_text.id) == (f"{k}/edit", f"{k}/inverse", f"{k}/edit_text")
    assert [source[2 * n + i].target.text for i in range(n)] == ["output text 0", "output text 2", None]
    assert source.groups() == [[0, 3], [1, 4], [2, 5], [6], [7], [8]]
    assert isinstance(source[0].query.image, bytes) and source[0].query.image.startswith(b"\x89PNG")

    owner = {i: g for g, members in enumerate(source.groups()) for i in members}
    for batch in GroupedBatchSampler(source.groups(), 3, seed=0):
        for g in {owner[i] for i in batch}:
            assert set(source.groups()[g]) <= set(batch)

    clone = pickle.loads(pickle.dumps(source))
    assert clone[4].query.image == source[4].query.image
    limited = hq_edit(hq, limit=1, cache_dir=str(tmp_path / "hf_cache"))
    assert limited.rows == [0] and len(limited) == 3 and limited.groups() == [[0, 1], [2]]


def test_single_parquet_file_strict_and_bad_layouts(hq, tmp_path):
    cache = str(tmp_path / "hf_cache")
    single = hq_edit(hq / "data" / "train-00000-of-00002.parquet", cache_dir=cache)
    assert single.rows == [0, 2]
    with pytest.raises(BadRowError, match=r"row 1: empty inverse edit"):
        hq_edit(hq, strict=True, cache_dir=cache)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="no HQ-Edit parquet shards"):
        hq_edit(tmp_path / "empty", cache_dir=cache)
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        hq_edit(tmp_path / "not" / "there" / "at-all", cache_dir=cache)
    from datasets import Dataset

    other = tmp_path / "other"
    other.mkdir()
    Dataset.from_dict({"edit": ["x"]}).to_parquet(str(other / "train-00000-of-00001.parquet"))
    with pytest.raises(DatasetEmptyError, match="lacks the HQ-Edit columns"):
        hq_edit(other, cache_dir=cache)


def test_hub_id_goes_to_datasets(monkeypatch, hq, tmp_path):
    import datasets

    real_load = datasets.load_dataset
    calls = []

    def fake_load(path, *args, **kwargs):
        calls.append((path, kwargs))
        if path == "UCSC-VLAA/HQ-Edit":  # serve the local shards instead of the network
            files = [str(f) for f in sorted((hq / "data").glob("train-*.parquet"))]
            return real_load("parquet", data_files={"train": files}, split="train",
                             cache_dir=str(tmp_path / "hf_cache"))
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    source = hq_edit()  # the default path is the hub id
    assert calls == [("UCSC-VLAA/HQ-Edit", {"split": "train"})] and source.rows == [0, 2, 4]
    with pytest.raises(DatasetNotFoundError, match="could not load HQ-Edit") as info:
        hq_edit("someone/else", revision="main")
    assert isinstance(info.value.__cause__, ConnectionError) and calls[-1][1]["revision"] == "main"


def test_numeric_text_column_is_one_user_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"input": ["a"], "input_image": pa.array([{"bytes": png(1), "path": None}], image),
                             "edit": pa.array([3]), "inverse_edit": ["undo"], "output": ["b"],
                             "output_image": pa.array([{"bytes": png(2), "path": None}], image)}),
                   tmp_path / "data" / "train-00000-of-00001.parquet")
    with pytest.raises(DatasetEmptyError, match="edit is int64, expected string"):
        hq_edit(tmp_path, cache_dir=str(tmp_path / "cache"))


def test_path_only_image_outside_the_folder_is_skipped_not_read(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "HQ" / "data").mkdir(parents=True)
    (tmp_path / "HQ" / "in.png").write_bytes(png(3))
    (tmp_path / "out.png").write_bytes(png(5))
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = [row(0, input_image={"bytes": None, "path": "in.png"}),
            row(1, output_image={"bytes": None, "path": str(tmp_path / "out.png")})]
    pq.write_table(pa.table({name: pa.array([r[name] for r in rows], image if name.endswith("image") else None)
                             for name in rows[0]}), tmp_path / "HQ" / "data" / "train-00000-of-00001.parquet")
    source = hq_edit(tmp_path / "HQ", cache_dir=str(tmp_path / "cache"))
    assert source.rows == [0] and source[0].query.image == str(tmp_path / "HQ" / "in.png")
    assert level_of(source[0].target.image) == 1
    assert dict(source.skipped) == {"outside image root": 1}


def test_damaged_parquet_shard_is_one_user_error(hq, tmp_path):
    (hq / "data" / "train-00001-of-00002.parquet").write_text("<html>502 Bad Gateway</html>")
    with pytest.raises(DatasetEmptyError, match="not a readable parquet file"):
        hq_edit(hq, cache_dir=str(tmp_path / "cache"))
