"""The rocov2 adapter on fixtures built in both published layouts (official Zenodo release, HF parquet mirror)."""
from __future__ import annotations

import io
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fuselip_med.data.adapters import (
    BadRowError,
    DatasetEmptyError,
    DatasetNotFoundError,
    ListSource,
    SampleSource,
    available_adapters,
    get_adapter,
    register_adapter,
)
from fuselip_med.data.adapters.rocov2 import ROCOV2_MANUAL_CUI_NAMES, ROCOV2_MODALITIES, RocoV2Source, rocov2
from fuselip_med.data.schema import Sample, SampleSide

CT, MRI, XRAY, US = "C0040405", "C0024485", "C1306645", "C0041618"
CHEST, PA = "C0817096", "C1996865"


# ------------------------------------------------------------------------------------------- pixels <-> id


def id_pixels(number: int) -> np.ndarray:
    """A 16x96 gray image whose six 16x16 blocks hold the digits of ``number`` (robust to JPEG)."""
    digits = f"{number:06d}"
    return np.concatenate([np.full((16, 16), 5 + 25 * int(d), np.uint8) for d in digits], axis=1)


def encode(number: int, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(id_pixels(number)).save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def decode_id(image) -> int:
    """The number an id image carries; ``image`` is a path or encoded bytes, as the adapter hands them on."""
    source = io.BytesIO(image) if isinstance(image, bytes) else image
    pixels = np.asarray(Image.open(source).convert("L"), dtype=np.float32)
    blocks = [pixels[4:12, 16 * k + 4: 16 * k + 12].mean() for k in range(6)]
    return int("".join(str(round((b - 5) / 25)) for b in blocks))


def number_of(image_id: str) -> int:
    return int(image_id.rsplit("_", 1)[1])


# ---------------------------------------------------------------------------------- official fixture

TRAIN_CAPTIONS = """ID,Caption
ROCOv2_2023_train_000001,"Axial CT of the chest, showing a nodule."
ROCOv2_2023_train_000002,  Chest X-ray with the \u201ctarget\u201d sign \u2013 PA view.  
ROCOv2_2023_train_000005,"MRI of the brain
with a second line"
ROCOv2_2023_train_000009,
ROCOv2_2023_train_000010,Ultrasound of the liver.
ROCOv2_2023_train_000014,A caption whose image is missing.
ROCOv2_2023_train_000015,unquoted, comma, makes a bad row
ROCOv2_2023_train_000001,A duplicate of the first ID.
ROCOv2_2023_train_000017,"He said ""quoted"" words, twice."
ROCOv2_2023_train_000020,Angiogram stored as PNG.
ROCOv2_2023_train_000023,A DICOM image of a CT slice.
"""
TRAIN_CONCEPTS = """ID,CUIs
ROCOv2_2023_train_000001,C0040405;C0024109
ROCOv2_2023_train_000002,C1306645;C0817096;C1996865;C0034079
ROCOv2_2023_train_000005,C0024485
ROCOv2_2023_train_000010,C0041618;C0023884
ROCOv2_2023_train_000017,
ROCOv2_2023_train_000020,C0002978
ROCOv2_2023_train_000023,C0040405
"""
TRAIN_MANUAL = """ID,CUIs
ROCOv2_2023_train_000001,C0040405
ROCOv2_2023_train_000002,C1306645;C0817096;C1996865
ROCOv2_2023_train_000005,C0024485
ROCOv2_2023_train_000010,C0041618
ROCOv2_2023_train_000017,
ROCOv2_2023_train_000020,C0002978
ROCOv2_2023_train_000023,C0040405
"""
CUI_MAPPING = """CUI,Canonical name
C0040405,X-Ray Computed Tomography
C0024485,Magnetic Resonance Imaging
C1306645,Plain x-ray
C0041618,Ultrasonography
C0002978,angiogram
C0817096,Chest
C1996865,Postero-Anterior
C0024109,Lung
C0034079,Lung nodule
C0023884,"Liver, NOS"
"""
VALID_IDS = [3, 4, 8]
TEST_IDS = [2, 7]


def write_official(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "train_captions.csv").write_text(TRAIN_CAPTIONS, encoding="utf-8")
    (root / "train_concepts.csv").write_text(TRAIN_CONCEPTS, encoding="utf-8")
    (root / "train_concepts_manual.csv").write_text(TRAIN_MANUAL, encoding="utf-8")
    (root / "cui_mapping.csv").write_text(CUI_MAPPING, encoding="utf-8")
    nested = root / "train_images" / "train"  # the zip's nested layout
    nested.mkdir(parents=True)
    for number in (1, 2, 5, 9, 10, 15, 17):  # 14 has no image; 9 has an empty caption; 15 is a bad row
        (nested / f"ROCOv2_2023_train_{number:06d}.jpg").write_bytes(encode(number, "JPEG"))
    (nested / "ROCOv2_2023_train_000020.png").write_bytes(encode(20, "PNG"))
    from pydicom.data import get_testdata_file

    shutil.copyfile(get_testdata_file("CT_small.dcm", download=False), nested / "ROCOv2_2023_train_000023.dcm")
    (nested / "notes.txt").write_text("not an image")

    flat = root / "valid"  # a flattened copy
    flat.mkdir()
    rows = ["ID,Caption"] + [f"ROCOv2_2023_valid_{n:06d},Valid caption {n}." for n in VALID_IDS]
    (root / "valid_captions.csv").write_text("\n".join(rows) + "\n")
    (root / "valid_concepts.csv").write_text("ID,CUIs\n" + "".join(f"ROCOv2_2023_valid_{n:06d},{CT}\n"
                                                                      for n in VALID_IDS))
    (root / "valid_concepts_manual.csv").write_text("ID,CUIs\n" + "".join(f"ROCOv2_2023_valid_{n:06d},{CT}\n"
                                                                             for n in VALID_IDS))
    for n in VALID_IDS:
        (flat / f"ROCOv2_2023_valid_{n:06d}.jpg").write_bytes(encode(n, "JPEG"))

    rows = ["ID,Caption"] + [f"ROCOv2_2023_test_{n:06d},Test caption {n}." for n in TEST_IDS]
    (root / "test_captions.csv").write_text("\r\n".join(rows) + "\r\n")  # CRLF line ends too
    (root / "test_concepts.csv").write_text(f"ID,CUIs\nROCOv2_2023_test_000002,{MRI}\nROCOv2_2023_test_000007,\n")
    (root / "test_concepts_manual.csv").write_text(f"ID,CUIs\nROCOv2_2023_test_000002,{MRI}\n")
    test_dir = root / "test_images" / "test"
    test_dir.mkdir(parents=True)
    for n in TEST_IDS:
        (test_dir / f"ROCOv2_2023_test_{n:06d}.jpg").write_bytes(encode(n, "JPEG"))
    return root


@pytest.fixture
def official(tmp_path) -> Path:
    return write_official(tmp_path / "ROCOv2_data")


def test_official_train_counts_captions_concepts(official):
    source = get_adapter("rocov2")(path=str(official), split="train")
    assert isinstance(source, RocoV2Source) and isinstance(source, SampleSource)
    assert source.layout == "official"
    assert source.image_ids == [f"ROCOv2_2023_train_{n:06d}" for n in (1, 2, 5, 10, 17, 20, 23)]
    assert dict(source.skipped) == {"empty caption": 1, "missing image": 1, "bad csv row": 1, "duplicate id": 1}
    captions = {s.id: s.target.text for s in (source[i] for i in range(len(source)))}
    assert captions["ROCOv2_2023_train_000001"] == "Axial CT of the chest, showing a nodule."
    assert captions["ROCOv2_2023_train_000002"] == "Chest X-ray with the \u201ctarget\u201d sign \u2013 PA view."
    assert captions["ROCOv2_2023_train_000005"] == "MRI of the brain with a second line"
    assert captions["ROCOv2_2023_train_000017"] == 'He said "quoted" words, twice.'

    second = source[1]
    assert second.meta["concepts"] == [XRAY, CHEST, PA, "C0034079"]
    assert second.meta["concepts_manual"] == [XRAY, CHEST, PA]
    assert second.meta["concept_names"] == ["Plain x-ray", "Chest", "Postero-Anterior", "Lung nodule"]
    assert second.meta["modality"] == "X-ray" and second.meta["split"] == "train"
    assert second.meta["image_id"] == second.id == "ROCOv2_2023_train_000002"
    assert source.cui_names["C0023884"] == "Liver, NOS"  # a quoted name with a comma
    assert source.concepts(3) == [US, "C0023884"] and source.manual_concepts(3) == [US]
    assert source[4].meta["concepts"] == [] and source[4].meta["modality"] is None  # empty concepts row
    assert source.modality_labels() == ["CT", "X-ray", "MRI", "ultrasound", None, "angiography", "CT"]
    assert source.groups() == [[i] for i in range(len(source))]


def test_official_images_belong_to_their_captions(official):
    source = rocov2(official, "train")
    for i in range(len(source)):
        sample = source[i]
        assert sample.query.text is None and sample.target.image is None
        assert isinstance(sample.query.image, str) and Path(sample.query.image).stem == sample.id
        if sample.query.image.endswith(".dcm"):
            continue
        assert decode_id(sample.query.image) == number_of(sample.id)
    assert source[5].query.image.endswith(".png") and source[6].query.image.endswith(".dcm")


def test_official_flattened_folder_and_validation_alias(official):
    for name in ("valid", "validation"):
        source = rocov2(official, name)
        assert source.split == "valid" and len(source) == len(VALID_IDS)
        for i, n in enumerate(VALID_IDS):
            assert source[i].target.text == f"Valid caption {n}."
            assert Path(source[i].query.image).parent == official / "valid"
            assert decode_id(source[i].query.image) == n
        assert source.modality_labels() == ["CT"] * 3


def test_official_test_split_crlf_and_missing_manual_row(official):
    source = rocov2(official, "test")
    assert [s.target.text for s in (source[0], source[1])] == ["Test caption 2.", "Test caption 7."]
    assert source.modality_labels() == ["MRI", None]
    assert source[1].meta["concepts"] == [] and source[1].meta["concepts_manual"] == []


def test_limit_is_first_n_after_filtering(official):
    source = rocov2(official, "train", limit=3)
    assert source.image_ids == ["ROCOv2_2023_train_000001", "ROCOv2_2023_train_000002", "ROCOv2_2023_train_000005"]
    assert len(source.modality_labels()) == 3
    with pytest.raises(IndexError):
        source[3]
    assert source[-1].id == "ROCOv2_2023_train_000005"


def test_caption_to_image_pairs(official):
    source = rocov2(official, "train", pair_mode="caption_to_image")
    sample = source[0]
    assert sample.query.image is None and sample.target.text is None
    assert sample.query.text == "Axial CT of the chest, showing a nodule."
    assert decode_id(sample.target.image) == 1
    with pytest.raises(ValueError, match="pair_mode"):
        rocov2(official, "train", pair_mode="image_to_image")


def test_strict_names_file_and_line(official):
    with pytest.raises(BadRowError) as info:
        rocov2(official, "train", strict=True)
    message = str(info.value)
    assert "train_captions.csv" in message and "line 6" in message and "empty caption" in message
    assert info.value.reason == "empty caption"


def test_missing_path_says_how_to_get_rocov2(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        rocov2(tmp_path / "nowhere", "train")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, DatasetEmptyError)
    assert "data_tools/download_rocov2.py" in str(info.value) and "--set data.train.path=" in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="train_captions.csv"):
        rocov2(tmp_path / "empty", "train")
    with pytest.raises(ValueError, match="split"):
        rocov2(tmp_path, "dev")


def test_zip_not_unzipped_says_so(official):
    shutil.rmtree(official / "train_images")
    (official / "train_images.zip").write_bytes(b"PK")
    with pytest.raises(DatasetNotFoundError, match="unzip"):
        rocov2(official, "train")


def test_all_rows_bad_is_empty_error(official):
    (official / "test_captions.csv").write_text("ID,Caption\nROCOv2_2023_test_000099,No image.\n")
    with pytest.raises(DatasetEmptyError, match="no usable sample") as info:
        rocov2(official, "test")
    assert str(official) in str(info.value) and not isinstance(info.value, FileNotFoundError)


def test_non_utf8_caption_is_skipped(official):
    data = "ID,Caption\nROCOv2_2023_test_000002,caf\xe9 latte\nROCOv2_2023_test_000007,fine.\n".encode("latin-1")
    (official / "test_captions.csv").write_bytes(data)
    source = rocov2(official, "test")
    assert source.image_ids == ["ROCOv2_2023_test_000007"] and source.skipped["non-utf8 text"] == 1


# ------------------------------------------------------------------------------------------- HF mirror


def write_hf(root: Path) -> Path:
    """Parquet shards as the mirror publishes them: data/{split}-000NN-of-000MM.parquet."""
    from datasets import Dataset, Features, Image as HFImage, Value

    try:
        from datasets import List as StringList  # datasets >= 4
    except ImportError:
        from datasets import Sequence as StringList
    features = Features({"image": HFImage(), "image_id": Value("string"), "caption": Value("string"),
                         "cui": StringList(Value("string"))})

    def shard(rows, path):
        columns = {
            "image": [{"bytes": encode(number_of(r[0]), "PNG"), "path": None} for r in rows],
            "image_id": [r[0] for r in rows], "caption": [r[1] for r in rows], "cui": [r[2] for r in rows],
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        Dataset.from_dict(columns, features=features).to_parquet(str(path))

    train = [
        ("ROCOv2_2023_train_000001", "CT caption one.", [CT]),
        ("ROCOv2_2023_train_000004", " X-ray caption,\nwith a newline. ", [XRAY, CHEST, PA]),
        ("ROCOv2_2023_train_000006", "No manual concepts.", ["nan"]),
        ("ROCOv2_2023_train_000004", " X-ray caption,\nwith a newline. ", [XRAY, CHEST, PA]),  # duplicate row
    ]
    train2 = [
        ("ROCOv2_2023_train_000009", "", [MRI]),  # empty caption
        ("ROCOv2_2023_train_000011", "Ultrasound caption.", [US]),
        ("ROCOv2_2023_train_000001", "CT caption one.", [CT]),  # duplicate across shards
    ]
    shard(train, root / "data" / "train-00000-of-00002.parquet")
    shard(train2, root / "data" / "train-00001-of-00002.parquet")
    shard([("ROCOv2_2023_valid_000002", "Valid caption.", [MRI])],
          root / "data" / "validation-00000-of-00001.parquet")
    shard([("ROCOv2_2023_test_000003", "Test caption.", [CT]), ("ROCOv2_2023_test_000005", "Test two.", [US])],
          root / "data" / "test-00000-of-00001.parquet")
    return root


@pytest.fixture
def hf(tmp_path) -> Path:
    return write_hf(tmp_path / "ROCOv2-radiology")


def test_hf_train_dedup_captions_concepts(hf, tmp_path):
    source = rocov2(hf, "train", cache_dir=str(tmp_path / "hf_cache"))
    assert source.layout == "hf"
    assert source.image_ids == ["ROCOv2_2023_train_000001", "ROCOv2_2023_train_000004", "ROCOv2_2023_train_000006",
                                "ROCOv2_2023_train_000011"]
    assert dict(source.skipped) == {"duplicate id": 2, "empty caption": 1}
    assert source[1].target.text == "X-ray caption, with a newline."
    assert source[1].meta["concepts"] == [XRAY, CHEST, PA] == source[1].meta["concepts_manual"]
    assert source[1].meta["concept_names"] == ["Plain x-ray", "Chest", "Postero-Anterior"]
    assert source[2].meta["concepts"] == [] and source[2].meta["modality"] is None  # ["nan"]
    assert source.modality_labels() == ["CT", "X-ray", None, "ultrasound"]
    assert source.cui_names == ROCOV2_MANUAL_CUI_NAMES
    for i in range(len(source)):
        image = source[i].query.image
        assert isinstance(image, bytes) and image.startswith(b"\x89PNG")
        assert decode_id(image) == number_of(source[i].id)


def test_hf_validation_alias_limit_and_pickle(hf, tmp_path):
    cache = str(tmp_path / "hf_cache")
    valid = rocov2(hf, "valid", cache_dir=cache)
    assert valid.image_ids == ["ROCOv2_2023_valid_000002"] and valid.modality_labels() == ["MRI"]
    test = rocov2(hf, "test", limit=1, cache_dir=cache)
    assert len(test) == 1 and decode_id(test[0].query.image) == 3
    clone = pickle.loads(pickle.dumps(test))  # DataLoader workers receive the source pickled
    assert clone[0].id == test[0].id and clone[0].query.image == test[0].query.image


def test_hf_strict_names_row(hf, tmp_path):
    with pytest.raises(BadRowError, match=r"row 3: duplicate id"):
        rocov2(hf, "train", strict=True, cache_dir=str(tmp_path / "hf_cache"))


def test_hub_id_calls_datasets_with_the_split(monkeypatch, hf, tmp_path):
    import datasets

    real_load = datasets.load_dataset
    calls = []

    def fake_load(path, *args, **kwargs):
        calls.append((path, args, kwargs))
        if path == "eltorio/ROCOv2-radiology":  # serve the local shards instead of the network
            files = [str(f) for f in sorted((hf / "data").glob(f"{kwargs['split']}-*.parquet"))]
            return real_load("parquet", data_files={kwargs["split"]: files}, split=kwargs["split"],
                             cache_dir=str(tmp_path / "hf_cache"))
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    source = rocov2("eltorio/ROCOv2-radiology", "valid", revision="main")
    assert calls == [("eltorio/ROCOv2-radiology", (), {"split": "validation", "revision": "main"})]
    assert source.layout == "hf" and source.image_ids == ["ROCOv2_2023_valid_000002"]
    assert source.cui_names == ROCOV2_MANUAL_CUI_NAMES

    with pytest.raises(DatasetNotFoundError, match="download_rocov2.py") as info:
        rocov2("hf://datasets/someone/not-there", "test")
    assert calls[-1][0] == "someone/not-there" and isinstance(info.value.__cause__, ConnectionError)


def test_hf_missing_columns(tmp_path):
    from datasets import Dataset

    root = tmp_path / "other"
    (root / "data").mkdir(parents=True)
    Dataset.from_dict({"text": ["a"]}).to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    with pytest.raises(DatasetEmptyError, match="image_id"):
        rocov2(root, "train", cache_dir=str(tmp_path / "hf_cache"))


# -------------------------------------------------------------------------------------- registry, lists


def test_registry():
    names = available_adapters()
    assert {"rocov2", "folder", "csv"} <= set(names)
    assert get_adapter("rocov2") is rocov2
    with pytest.raises(KeyError, match="rocov2"):
        get_adapter("no-such-adapter")
    with pytest.raises(ValueError, match="already registered"):
        register_adapter("rocov2")(lambda path, split: None)


def test_modality_table():
    assert ROCOV2_MODALITIES == {CT: "CT", MRI: "MRI", XRAY: "X-ray", US: "ultrasound", "C0002978": "angiography",
                                 "C0032743": "PET"}


def test_list_source_groups():
    samples = [Sample(id=str(i), source="s", query=SampleSide(text=f"q{i}"), group=g)
               for i, g in enumerate(["a", None, "a", "b", None])]
    source = ListSource(samples, name="mine")
    assert isinstance(source, SampleSource) and len(source) == 5 and source[2].id == "2"
    assert source.groups() == [[0, 2], [1], [3], [4]]


def test_official_names_every_skipped_row(official):
    source = rocov2(official, "train")
    captions = official / "train_captions.csv"
    assert [(e.id, e.source, e.reason) for e in source.skipped.entries] == [
        ("ROCOv2_2023_train_000009", f"{captions}, line 6", "empty caption"),
        ("ROCOv2_2023_train_000014", f"{captions}, line 8", "missing image"),
        ("ROCOv2_2023_train_000015", f"{captions}, line 9", "bad csv row"),
        ("ROCOv2_2023_train_000001", f"{captions}, line 10", "duplicate id"),
    ]
    assert "no ROCOv2_2023_train_000014.jpg" in source.skipped.entries[1].detail


def test_hf_names_every_skipped_row_with_its_shard(hf, tmp_path):
    from datasets import Dataset, Features, Image as HFImage, Value

    features = Features({"image": HFImage(), "image_id": Value("string"), "caption": Value("string")})
    test_shard = hf / "data" / "test-00000-of-00001.parquet"
    Dataset.from_dict({"image": [{"bytes": encode(3, "PNG"), "path": None}, None],
                       "image_id": ["ROCOv2_2023_test_000003", "ROCOv2_2023_test_000004"],
                       "caption": ["Test caption.", "No image in this row."]},
                      features=features).to_parquet(str(test_shard))
    test = rocov2(hf, "test", cache_dir=str(tmp_path / "hf_cache"))
    assert test.image_ids == ["ROCOv2_2023_test_000003"]
    assert [(e.id, e.source, e.reason) for e in test.skipped.entries] == [
        ("ROCOv2_2023_test_000004", f"{test_shard}, row 1", "null image")]

    train = rocov2(hf, "train", cache_dir=str(tmp_path / "hf_cache"))
    first, second = (hf / "data" / f"train-0000{i}-of-00002.parquet" for i in (0, 1))
    assert [(e.id, e.source, e.reason, e.detail) for e in train.skipped.entries] == [
        ("ROCOv2_2023_train_000004", f"{first}, row 3", "duplicate id", f"first at {first}, row 1"),
        ("ROCOv2_2023_train_000009", f"{second}, row 0", "empty caption", "ROCOv2_2023_train_000009"),
        ("ROCOv2_2023_train_000001", f"{second}, row 2", "duplicate id", f"first at {first}, row 0"),  # across shards
    ]


def test_missing_path_advice_names_an_option_of_the_command(tmp_path):
    from fuselip_med.option_names import command_line_style

    with command_line_style(), pytest.raises(DatasetNotFoundError) as info:
        rocov2(tmp_path / "absent", "test")
    assert "--data rocov2=ROCOv2_data" in str(info.value) and "--set" not in str(info.value)


@pytest.mark.parametrize(("column", "values", "named"), [
    ("image_id", [1, 2], "image_id is int64"),  # a re-export that turned IDs into numbers
    ("caption", [1.5, None], "caption is double"),
    ("cui", ["C0040405", "C0024485"], "cui is string"),  # one string, not a list: would be split into letters
])
def test_hf_wrong_column_types_are_one_user_error(tmp_path, column, values, named):
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {"image": pa.array([{"bytes": encode(1, "PNG"), "path": None}] * 2,
                                 pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
               "image_id": pa.array(["ROCOv2_2023_train_000001", "ROCOv2_2023_train_000002"]),
               "caption": pa.array(["one", "two"]), "cui": pa.array([[CT], [MRI]])}
    columns[column] = pa.array(values)
    (tmp_path / "mirror" / "data").mkdir(parents=True)
    pq.write_table(pa.table(columns), tmp_path / "mirror" / "data" / "train-00000-of-00001.parquet")
    with pytest.raises(DatasetEmptyError, match=named):
        rocov2(tmp_path / "mirror", "train", cache_dir=str(tmp_path / "hf_cache"))


def test_hf_path_only_image_cells_stay_inside_the_data_folder(tmp_path):
    """A parquet image cell holding only a path (no bytes) may name a file in the data folder; one naming a file
    outside it (absolute, ``..``, or a symlink out) is skipped as ``outside image root``, never read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "mirror"
    (root / "data").mkdir(parents=True)
    (root / "images").mkdir()
    (root / "images" / "inside.png").write_bytes(encode(1, "PNG"))
    secret = tmp_path / "secret.png"
    secret.write_bytes(encode(2, "PNG"))
    (root / "images" / "link.png").symlink_to(secret)
    paths = ["images/inside.png", str(secret), "../secret.png", "images/link.png"]
    ids = [f"ROCOv2_2023_train_00000{k}" for k in range(1, 5)]
    pq.write_table(pa.table({
        "image": pa.array([{"bytes": None, "path": p} for p in paths],
                          pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        "image_id": ids, "caption": ["a", "b", "c", "d"]}), root / "data" / "train-00000-of-00001.parquet")
    source = rocov2(root, "train", cache_dir=str(tmp_path / "hf_cache"))
    assert source.image_ids == ids[:1]
    assert Path(source[0].query.image).resolve() == (root / "images" / "inside.png").resolve()
    assert [e.reason for e in source.skipped.entries] == ["outside image root"] * 3


def test_hf_damaged_parquet_shard_is_one_user_error(hf, tmp_path):
    shard = hf / "data" / "train-00001-of-00002.parquet"
    shard.write_bytes(shard.read_bytes()[:200])  # a download cut short: no footer
    with pytest.raises(DatasetEmptyError, match="train-00001-of-00002.parquet is not a readable parquet file"):
        rocov2(hf, "train", cache_dir=str(tmp_path / "hf_cache"))
