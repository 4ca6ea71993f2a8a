"""data_tools/: ROCOv2 download (offline, from parquet shards in the HF mirror's schema), including interrupted
and resumed runs; CC webdataset shards -> CSV; DICOM tree -> PNG. Fixtures are built here in the published
formats (data-formats.md)."""
from __future__ import annotations

import csv
import io
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pydicom
import pytest
from PIL import Image

from data_tools import cc_wds_to_csv, dicom_to_png, download_rocov2

REPO = Path(__file__).resolve().parent.parent


def png_bytes(seed: int, size=(12, 9), mode="RGB") -> bytes:
    image = Image.new(mode, size, (seed * 20 % 256, 40, 200) if mode == "RGB" else seed * 20 % 256)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(seed: int, size=(16, 12)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (seed * 30 % 256, 90, 10)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------- ROCOv2 mirror
CAPTIONS = [
    "CT of the chest, axial view.",
    'Axial MRI showing a "target" sign',
    " Leading space and a curly “quote” – en dash ",
    "Two lines\nof caption, with a comma",
    "Plain x-ray of the pelvis",
    "Ultrasound; semicolon",
    "PET-CT fusion",
]
CUIS = [["C0040405"], ["C0024485", "C0817096"], ["nan"], ["C1306645", "C0030797", "C1996865"], [], ["C0041618"],
        ["C0032743"]]


def mirror_rows(split: str, n: int) -> list[dict]:
    return [
        {
            "image": {"bytes": png_bytes(i, mode="L" if i % 2 else "RGB"), "path": None},
            "image_id": f"ROCOv2_2023_{split}_{i + 1:06d}",
            "caption": CAPTIONS[i % len(CAPTIONS)],
            "cui": CUIS[i % len(CUIS)],
        }
        for i in range(n)
    ]


def write_mirror(root: Path, splits: dict[str, list[dict]], shards: dict[str, int] | None = None) -> Path:
    """Parquet shards data/{split}-000NN-of-000MM.parquet with the mirror's features."""
    import datasets

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "image_id": datasets.Value("string"),
            "caption": datasets.Value("string"),
            "cui": datasets.Sequence(datasets.Value("string")),
        }
    )
    (root / "data").mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        count = (shards or {}).get(split, 1)
        per = -(-len(rows) // count)
        for index in range(count):
            part = datasets.Dataset.from_list(rows[index * per : (index + 1) * per], features=features)
            part.to_parquet(str(root / "data" / f"{split}-{index:05d}-of-{count:05d}.parquet"))
    return root


@pytest.fixture
def mirror(tmp_path: Path) -> Path:
    train = mirror_rows("train", 9)
    train.append(dict(train[3]))  # the mirror's train split repeats some image_ids
    return write_mirror(
        tmp_path / "mirror",
        {"train": train, "validation": mirror_rows("valid", 4), "test": mirror_rows("test", 3)},
        shards={"train": 3},
    )


def run_download(source: Path, out: Path, *extra: str) -> int:
    return download_rocov2.main(["--source", str(source), "--out", str(out), "--no-progress", *extra])


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def snapshot(out: Path) -> dict[str, bytes]:
    """Every file the tool wrote, except its journal."""
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and download_rocov2.STATE_DIR not in p.parts
    }


def test_download_writes_the_official_layout(mirror: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "ROCOv2_data"
    assert run_download(mirror, out) == 0

    for split, n in (("train", 9), ("valid", 4), ("test", 3)):
        captions = read_csv(out / f"{split}_captions.csv")
        concepts = read_csv(out / f"{split}_concepts_manual.csv")
        source = mirror_rows(split, n)
        assert [r["ID"] for r in captions] == [r["image_id"] for r in source]  # unique, in mirror order
        assert [r["Caption"] for r in captions] == [r["caption"] for r in source]  # verbatim through RFC 4180
        assert [r["ID"] for r in concepts] == [r["image_id"] for r in source]
        expected_cuis = [";".join(c for c in r["cui"] if c != "nan") for r in source]
        assert [r["CUIs"] for r in concepts] == expected_cuis
        for row in source:
            path = out / f"{split}_images" / split / f"{row['image_id']}.png"
            assert path.read_bytes() == row["image"]["bytes"]  # the mirror's bytes, untouched
        assert len(list((out / f"{split}_images" / split).iterdir())) == n
    assert read_csv(out / "train_concepts_manual.csv")[2]["CUIs"] == ""  # ["nan"] -> empty
    assert (out / "train_captions.csv").read_text(encoding="utf-8").splitlines()[0] == "ID,Caption"
    assert (out / "valid_concepts_manual.csv").read_text(encoding="utf-8").splitlines()[0] == "ID,CUIs"

    table = capsys.readouterr().out
    assert "train" in table and "ok" in table and "valid" in table
    # a second run finds everything done and changes nothing
    before = snapshot(out)
    assert run_download(mirror, out) == 0
    assert snapshot(out) == before


def test_download_output_reads_with_the_rocov2_adapter(mirror: Path, tmp_path: Path) -> None:
    """The contract between the two: what the tool writes is what the package's adapter reads."""
    pytest.importorskip("fuselip_med.data.adapters.rocov2")
    from fuselip_med.data.adapters import get_adapter

    out = tmp_path / "out"
    assert run_download(mirror, out) == 0
    source = get_adapter("rocov2")(path=str(out), split="valid")
    rows = mirror_rows("valid", 4)
    assert len(source) == 4 and not sum(source.skipped.values())
    for index, row in enumerate(rows):
        sample = source[index]
        assert sample.meta["image_id"] == row["image_id"]
        assert Path(sample.query.image).read_bytes() == row["image"]["bytes"]
        assert sample.meta["concepts_manual"] == [c for c in row["cui"] if c != "nan"]


def test_download_counts_duplicates_in_the_summary(mirror: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = download_rocov2.parse_args(["--source", str(mirror), "--out", str(out), "--no-progress"])
    (out / download_rocov2.STATE_DIR).mkdir(parents=True)
    download_rocov2.settle_options(out / download_rocov2.STATE_DIR, args)
    result = download_rocov2.process_split(args, "train", out / download_rocov2.STATE_DIR)
    assert (result.rows, result.duplicates, result.bad, result.images, result.expected) == (10, 1, 0, 9, 9)
    assert result.problems == []


@pytest.mark.parametrize("checkpoint_every", [1, 3, 100])
def test_interrupted_download_resumes_to_the_same_files(
    mirror: Path, tmp_path: Path, monkeypatch, checkpoint_every: int
) -> None:
    reference = tmp_path / "reference"
    assert run_download(mirror, reference) == 0

    out = tmp_path / "out"
    real_write = download_rocov2._write_image
    calls = {"n": 0}

    def dying_write(path: Path, data: bytes) -> None:
        calls["n"] += 1
        if calls["n"] == 5:  # killed in the middle of writing the 5th image: a half-written temp file stays
            path.with_name(f"{path.name}.tmp-424242").write_bytes(data[: len(data) // 2])
            raise RuntimeError("killed")
        real_write(path, data)

    monkeypatch.setattr(download_rocov2, "_write_image", dying_write)
    with pytest.raises(RuntimeError, match="killed"):
        run_download(mirror, out, "--checkpoint-every", str(checkpoint_every))
    assert not (out / "train_captions.csv").exists()  # CSVs only appear complete
    journal = out / download_rocov2.STATE_DIR / "train.jsonl"
    with open(journal, "a", encoding="utf-8") as handle:  # and the journal's last line was cut short
        handle.write('{"pos": 4, "id": "ROCOv2_2023_tr')

    monkeypatch.setattr(download_rocov2, "_write_image", real_write)
    assert run_download(mirror, out, "--checkpoint-every", str(checkpoint_every)) == 0
    assert snapshot(out) == snapshot(reference)
    assert not list(out.rglob("*.tmp-*"))
    for path in out.rglob("*.png"):
        with Image.open(path) as image:
            image.load()
    ids = [r["ID"] for r in read_csv(out / "train_captions.csv")]
    assert len(ids) == len(set(ids)) == 9


def test_keyboard_interrupt_says_how_to_resume(mirror: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    def interrupt(path, data):
        raise KeyboardInterrupt

    monkeypatch.setattr(download_rocov2, "_write_image", interrupt)
    assert run_download(mirror, tmp_path / "out") == 130
    assert "rerun the same command" in capsys.readouterr().err


def test_limit_then_full_run(mirror: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run_download(mirror, out, "--limit", "2") == 0
    assert len(read_csv(out / "train_captions.csv")) == 2
    assert len(read_csv(out / "test_concepts_manual.csv")) == 2
    assert run_download(mirror, out) == 0  # continues from where the limited run stopped
    reference = tmp_path / "reference"
    assert run_download(mirror, reference) == 0
    assert snapshot(out) == snapshot(reference)
    assert run_download(mirror, out, "--limit", "1") == 0  # a smaller limit: CSVs cut to it
    assert len(read_csv(out / "valid_captions.csv")) == 1


def test_jpeg_option_reencodes(mirror: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run_download(mirror, out, "--splits", "test", "--image-format", "jpeg", "--jpeg-quality", "90") == 0
    files = sorted((out / "test_images" / "test").iterdir())
    assert [f.suffix for f in files] == [".jpg"] * 3
    for file in files:
        with Image.open(file) as image:
            assert image.format == "JPEG"
    assert not (out / "train_captions.csv").exists()
    # the folder remembers its options: another format would mix files
    assert run_download(mirror, out, "--splits", "test") == 1


def test_bad_rows_are_skipped_and_fail_verification(tmp_path: Path, capsys) -> None:
    rows = mirror_rows("test", 3)
    rows[1]["image"] = {"bytes": b"\x89PNG\r\n\x1a\n not really a png", "path": None}
    mirror = write_mirror(tmp_path / "mirror", {"test": rows})
    out = tmp_path / "out"
    assert run_download(mirror, out, "--splits", "test") == 1
    assert [r["ID"] for r in read_csv(out / "test_captions.csv")] == [rows[0]["image_id"], rows[2]["image_id"]]
    captured = capsys.readouterr()
    assert "2 images, expected 3" in captured.out
    assert "verification failed for test" in captured.err


def test_missing_split_is_a_clear_error(tmp_path: Path, capsys) -> None:
    mirror = write_mirror(tmp_path / "mirror", {"test": mirror_rows("test", 1)})
    assert run_download(mirror, tmp_path / "out", "--splits", "valid") == 1
    assert "no parquet files for split 'validation'" in capsys.readouterr().err


def test_unreachable_hub_is_one_clear_error(tmp_path: Path, capsys) -> None:
    # conftest sets HF_HUB_OFFLINE=1: the hub cannot be asked for the commit to pin
    assert download_rocov2.main(["--out", str(tmp_path / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "cannot reach the dataset eltorio/ROCOv2-radiology" in err and "--source" in err


def test_download_in_docker_refuses_an_unmounted_folder(mirror: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text("22 1 0:21 / / rw,relatime - overlay overlay rw\n")
    monkeypatch.setattr(download_rocov2, "MOUNTINFO", mountinfo)
    monkeypatch.setenv("FUSELIP_MED_REQUIRE_MOUNT", "1")
    out = tmp_path / "ROCOv2 data"
    assert run_download(mirror, out, "--splits", "test") == 1
    assert "docker run --rm" in capsys.readouterr().err
    escaped = str(out).replace(" ", "\\040")
    mountinfo.write_text(mountinfo.read_text() + f"40 22 8:1 /home/u/data {escaped} rw - ext4 /dev/sda1 rw\n")
    assert run_download(mirror, out, "--splits", "test") == 0


def test_download_script_runs_without_the_package() -> None:
    """The download image has datasets & co but neither fuselip_med nor torch: the script must not need them."""
    script = REPO / "data_tools" / "download_rocov2.py"
    blocker = (
        "import runpy, sys; sys.modules['fuselip_med'] = None; sys.modules['torch'] = None; "
        f"sys.argv = [{str(script)!r}, '--help']; runpy.run_path({str(script)!r}, run_name='__main__')"
    )
    done = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, cwd="/")
    assert done.returncode == 0, done.stderr
    assert "--source" in done.stdout and "--limit" in done.stdout


# --------------------------------------------------------------------------------------------- CC webdataset
def write_shard(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def sample(key: str, image: bytes | None, caption: bytes | None, ext: str = "jpg") -> list[tuple[str, bytes]]:
    members = []
    if image is not None:
        members.append((f"{key}.{ext}", image))
    if caption is not None:
        members.append((f"{key}.txt", caption))
    members.append((f"{key}.json", b'{"key": "%s", "caption": "x"}' % key.encode()))
    return members


@pytest.fixture
def cc_shards(tmp_path: Path) -> Path:
    folder = tmp_path / "cc3m"
    folder.mkdir()
    write_shard(
        folder / "cc3m-train-0000.tar",
        sample("000000000", jpeg_bytes(0), b"a dog, running on the beach")
        + sample("000000001", jpeg_bytes(1)[:40], b"corrupt: cut short")
        + sample("000000002", b"", b"empty image")
        + sample("000000003", jpeg_bytes(3), None)
        + sample("000000004", png_bytes(4), b'caption with "quotes"\nand a newline ', ext="png"),
    )
    write_shard(
        folder / "cc3m-train-0001.tar",
        sample("000010000", jpeg_bytes(5), b"a cat")
        + sample("000010001", b"not an image at all", b"garbage")
        + sample("000010002", jpeg_bytes(7), "caf\u00e9 au lait".encode()),
    )
    return folder


def run_cc(pattern: str, images: Path, csv_path: Path, *extra: str) -> int:
    return cc_wds_to_csv.main([pattern, "--images-dir", str(images), "--csv", str(csv_path), "--no-progress", *extra])


def test_cc_wds_to_csv_extracts_valid_samples(cc_shards: Path, tmp_path: Path, capsys) -> None:
    images, out_csv = tmp_path / "images", tmp_path / "cc3m_train.csv"
    assert run_cc(str(cc_shards / "cc3m-train-{0000..0001}.tar"), images, out_csv) == 0
    rows = read_csv(out_csv)
    assert list(rows[0]) == ["path", "caption"]
    assert [r["caption"] for r in rows] == [
        "a dog, running on the beach",
        'caption with "quotes"\nand a newline ',
        "a cat",
        "caf\u00e9 au lait",
    ]
    for row in rows:
        path = Path(row["path"])
        assert path.is_absolute() and path.is_relative_to(images.resolve())
        with Image.open(path) as image:
            image.load()
    assert Path(rows[0]["path"]).name == "000000000.jpg" and Path(rows[0]["path"]).parent.name == "cc3m-train-0000"
    assert Path(rows[1]["path"]).suffix == ".png"
    summary = capsys.readouterr().out
    assert "corrupt image: 2" in summary and "empty image: 1" in summary and "missing caption: 1" in summary
    assert not list(images.rglob("*.tmp-*"))

    # rerun: finished shards are skipped (nothing rewritten), the CSV comes out the same
    before, stamp = out_csv.read_bytes(), Path(rows[0]["path"]).stat().st_mtime_ns
    assert run_cc(str(cc_shards / "cc3m-train-{0000..0001}.tar"), images, out_csv) == 0
    assert out_csv.read_bytes() == before
    assert Path(rows[0]["path"]).stat().st_mtime_ns == stamp


def test_cc_wds_to_csv_resumes_an_unfinished_shard_and_uses_workers(cc_shards: Path, tmp_path: Path) -> None:
    reference_csv = tmp_path / "reference.csv"
    assert run_cc(str(cc_shards / "*.tar"), tmp_path / "reference", reference_csv) == 0
    images, out_csv = tmp_path / "images", tmp_path / "out.csv"
    assert run_cc(str(cc_shards / "cc3m-train-0000.tar"), images, tmp_path / "first.csv") == 0
    (images / cc_wds_to_csv.PARTS_DIR / "cc3m-train-0000.json").unlink()  # as if killed before the record
    assert run_cc(str(cc_shards / "cc3m-train-{0000,0001}.tar"), images, out_csv, "--workers", "2") == 0
    reference = [(Path(r["path"]).relative_to(tmp_path / "reference"), r["caption"]) for r in read_csv(reference_csv)]
    resumed = [(Path(r["path"]).relative_to(images), r["caption"]) for r in read_csv(out_csv)]
    assert resumed == reference


def test_cc_wds_to_csv_truncated_shard_keeps_what_it_read(cc_shards: Path, tmp_path: Path, capsys) -> None:
    whole = (cc_shards / "cc3m-train-0000.tar").read_bytes()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "cc3m-train-0007.tar").write_bytes(whole[: len(whole) // 2 + 100])
    assert run_cc(str(broken / "cc3m-train-0007.tar"), tmp_path / "images", tmp_path / "out.csv") == 0
    rows = read_csv(tmp_path / "out.csv")
    assert rows and rows[0]["caption"] == "a dog, running on the beach"
    assert "truncated or unreadable shard: 1" in capsys.readouterr().out


def test_cc_wds_to_csv_missing_shard_is_an_error(cc_shards: Path, tmp_path: Path, capsys) -> None:
    assert run_cc(str(cc_shards / "cc3m-train-{0000..0002}.tar"), tmp_path / "i", tmp_path / "o.csv") == 1
    assert "cc3m-train-0002.tar" in capsys.readouterr().err


def test_expand_braces() -> None:
    expand = cc_wds_to_csv.expand_braces
    assert expand("cc-{0000..0002}.tar") == ["cc-0000.tar", "cc-0001.tar", "cc-0002.tar"]
    assert expand("{train,validation}-{8..10}") == [
        "train-8", "train-9", "train-10", "validation-8", "validation-9", "validation-10"
    ]
    assert expand("plain.tar") == ["plain.tar"]
    assert expand("odd{name}.tar") == ["odd{name}.tar"]


# --------------------------------------------------------------------------------------------- DICOM -> PNG
def dicom_test_file(name: str) -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not installed")
    return Path(path)


@pytest.fixture
def dicom_tree(tmp_path: Path) -> Path:
    root = tmp_path / "study"
    (root / "ct" / "series1").mkdir(parents=True)
    (root / "mr").mkdir()
    ct = dicom_test_file("CT_small.dcm")
    shutil.copy(ct, root / "ct" / "series1" / "slice1.dcm")
    shutil.copy(ct, root / "ct" / "series1" / "IM0002")  # no extension, DICOM magic
    headless = pydicom.dcmread(ct)
    del headless.file_meta  # no preamble, no file meta: as some scanners and PACS export
    pydicom.dcmwrite(root / "ct" / "series1" / "IM0003", headless, enforce_file_format=False, implicit_vr=True,
                     little_endian=True)
    shutil.copy(dicom_test_file("MR_small.dcm"), root / "mr" / "mr.DCM")
    (root / "ct" / "corrupt.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00garbage" * 10)
    (root / "ct" / "empty.dcm").write_bytes(b"")
    (root / "ct" / "cut.dcm").write_bytes(ct.read_bytes()[: ct.stat().st_size // 2])
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_dicom_to_png_mirrors_the_tree_and_counts_bad_files(dicom_tree: Path, tmp_path: Path, capsys) -> None:
    from fuselip_med.data.images import DecodeOptions, load_image

    out = tmp_path / "png"
    assert dicom_to_png.main([str(dicom_tree), str(out), "--window", "lung", "--no-progress"]) == 0
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == ["ct/series1/IM0002.png", "ct/series1/IM0003.png", "ct/series1/slice1.png", "mr/mr.png"]
    with Image.open(out / "ct/series1/slice1.png") as image:
        expected = load_image(dicom_tree / "ct/series1/slice1.dcm", DecodeOptions(window="lung"))
        assert image.mode == expected.mode and image.size == expected.size == (128, 128)
        assert image.tobytes() == expected.tobytes()
    captured = capsys.readouterr()
    assert "corrupt.dcm" in captured.err and "empty.dcm" in captured.err and "cut.dcm" in captured.err
    assert "empty file: 1" in captured.out and "truncated image: 1" in captured.out
    assert "corrupt image: 1" in captured.out

    # rerun keeps what is there; --strict fails on the bad files
    assert dicom_to_png.main([str(dicom_tree), str(out), "--window", "400,40", "--no-progress", "--strict"]) == 1
    assert "already there" in capsys.readouterr().out
    with Image.open(out / "ct/series1/slice1.png") as image:  # not redone with the other window
        assert image.tobytes() == expected.tobytes()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_dicom_to_png_window_choices(dicom_tree: Path, tmp_path: Path) -> None:
    from fuselip_med.data.images import DecodeOptions, load_image

    assert dicom_to_png.parse_window("auto") is None
    assert dicom_to_png.parse_window("Soft-Tissue") == "soft_tissue"
    assert dicom_to_png.parse_window("400,40") == (400.0, 40.0)
    out = tmp_path / "png"
    argv = [str(dicom_tree), str(out), "--window", "80,40", "--no-progress", "--workers", "2", "--overwrite"]
    assert dicom_to_png.main(argv) == 0
    with Image.open(out / "mr/mr.png") as image:
        assert image.tobytes() == load_image(dicom_tree / "mr/mr.DCM", DecodeOptions(window=(80.0, 40.0))).tobytes()
    with pytest.raises(SystemExit) as exit_info:
        dicom_to_png.main([str(dicom_tree), str(out), "--window", "sideways"])
    assert exit_info.value.code == 2


def test_tools_have_help() -> None:
    for tool in ("cc_wds_to_csv.py", "dicom_to_png.py"):
        done = subprocess.run(
            [sys.executable, str(REPO / "data_tools" / tool), "--help"], capture_output=True, text=True, cwd="/"
        )
        assert done.returncode == 0, done.stderr
        assert "usage:" in done.stdout
