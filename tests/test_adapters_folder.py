"""The folder/csv adapter: a user's own table of path,caption (+ labels) or a folder with sidecar captions."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fuselip_med.data.adapters import BadRowError, DatasetEmptyError, DatasetNotFoundError, SampleSource, get_adapter
from fuselip_med.data.adapters.folder import FolderSource, folder, normalize_modality


def write_image(path: Path, value: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(path)
    return path


def pixel(image: str) -> int:
    return int(np.asarray(Image.open(image))[4, 4])


@pytest.fixture
def table(tmp_path) -> Path:
    root = tmp_path / "mydata"
    write_image(root / "images" / "a.png", 10)
    write_image(root / "images" / "b.png", 20)
    elsewhere = write_image(tmp_path / "elsewhere" / "c.png", 30)
    write_image(root / "d.png", 40)
    (root / "train.csv").write_text(
        "path,caption,label,labels,modality\n"
        'images/a.png,"CT of the chest, axial.",nodule,nodule;mass,ct\n'
        f"{elsewhere},Absolute path caption.,,effusion,MR\n"
        "images/missing.png,No such image.,,,\n"
        "images/b.png,,,,\n"
        "images/b.png,Too,many,fields,here,x\n"
        "d.png,\"Line one\nline two\",fracture,,Radiograph\n"
        "images/a.png,A second caption of image a.,,,ultrasound\n",
        encoding="utf-8")
    return root


def test_csv_relative_absolute_labels_and_skips(table, tmp_path):
    refused = get_adapter("csv")(path=str(table / "train.csv"), split="train")
    assert len(refused) == 3 and refused.skipped["outside image root"] == 1  # absolute, outside the table's folder
    source = get_adapter("csv")(path=str(table / "train.csv"), split="train", image_root=str(tmp_path / "elsewhere"))
    assert isinstance(source, FolderSource) and isinstance(source, SampleSource)
    assert len(source) == 4
    assert dict(source.skipped) == {"missing image": 1, "empty caption": 1, "bad csv row": 1}
    first, second, third, fourth = (source[i] for i in range(4))
    assert first.target.text == "CT of the chest, axial." and pixel(first.query.image) == 10
    assert Path(first.query.image) == table / "images" / "a.png"
    assert first.meta["labels"] == ["nodule", "mass"] and first.meta["label"] == "nodule"
    assert first.meta["modality"] == "CT" and first.meta["split"] == "train"
    assert second.query.image == str(tmp_path / "elsewhere" / "c.png") and pixel(second.query.image) == 30
    assert second.meta["labels"] == ["effusion"] and second.meta["label"] is None
    assert third.target.text == "Line one line two" and pixel(third.query.image) == 40
    assert third.meta["labels"] == ["fracture"]
    assert source.modality_labels() == ["CT", "MRI", "X-ray", "ultrasound"]
    assert [s.id for s in (first, second, third, fourth)] == [
        "images/a.png", str(tmp_path / "elsewhere" / "c.png"), "d.png", "images/a.png#2"]
    assert source.groups() == [[0], [1], [2], [3]]
    assert source.labels(0) == ["nodule", "mass"]


def test_folder_with_split_table_and_limit(table):
    source = folder(table, "train", limit=2, image_root=str(table.parent / "elsewhere"))
    assert len(source) == 2 and source[1].target.text == "Absolute path caption."
    with pytest.raises(IndexError):
        source[2]


def test_csv_strict_names_file_and_line(table):
    with pytest.raises(BadRowError, match=r"train\.csv, line 4: missing image"):
        folder(table / "train.csv", strict=True, image_root=str(table.parent / "elsewhere"))


def test_check_files_off_keeps_missing_rows(table):
    source = folder(table / "train.csv", check_files=False)
    assert len(source) == 5 and "missing image" not in source.skipped


def test_tsv_with_id_group_and_image_root(tmp_path):
    root = tmp_path / "imgs"
    write_image(root / "x.png", 1)
    write_image(root / "y.png", 2)
    tsv = tmp_path / "tables" / "pairs.tsv"
    tsv.parent.mkdir()
    tsv.write_text("id\tpath\tcaption\tgroup\n"
                   "s1\tx.png\tfirst, with comma\tg\n"
                   "s2\ty.png\tsecond\tg\n"
                   "s3\tx.png\tthird\t\n")
    source = folder(tsv, image_root=str(root), pair_mode="caption_to_image")
    assert [source[i].id for i in range(3)] == ["s1", "s2", "s3"]
    assert source[0].query.text == "first, with comma" and pixel(source[0].target.image) == 1
    assert source[0].group == source[1].group == "g" and source[2].group is None
    assert source.groups() == [[0, 1], [2]]


def test_custom_column_names(tmp_path):
    write_image(tmp_path / "p.png", 5)
    (tmp_path / "t.csv").write_text("filepath,title\np.png,A title.\n")
    with pytest.raises(DatasetEmptyError, match="path_column"):
        folder(tmp_path / "t.csv")
    source = folder(tmp_path / "t.csv", path_column="filepath", caption_column="title")
    assert source[0].target.text == "A title."


def test_sidecar_folder(tmp_path):
    root = tmp_path / "scans"
    write_image(root / "a.jpg", 11)
    (root / "a.txt").write_text("  Caption of a.\n")
    write_image(root / "b.png", 22)
    (root / "b.png.txt").write_text("Caption of b (the fork's naming).")
    write_image(root / "sub" / "c.png", 33)
    (root / "sub" / "c.txt").write_text("Caption\nof c.")
    write_image(root / "d.png", 44)  # no caption
    write_image(root / "e.png", 55)
    (root / "e.txt").write_text("   \n")
    (root / "readme.md").write_text("ignored")
    source = get_adapter("folder")(path=str(root), split="train")
    assert [source[i].id for i in range(len(source))] == ["a.jpg", "b.png", "sub/c.png"]
    assert [source[i].target.text for i in range(3)] == ["Caption of a.", "Caption of b (the fork's naming).",
                                                         "Caption of c."]
    assert [pixel(source[i].query.image) for i in range(3)] == [11, 22, 33]
    assert dict(source.skipped) == {"missing caption": 1, "empty caption": 1, "not an image": 1}
    assert [e.id for e in source.skipped.entries if e.reason == "not an image"] == ["readme.md"]
    assert source.modality_labels() == [None, None, None]
    with pytest.raises(BadRowError, match="d.png"):
        folder(root, strict=True)


def test_split_subfolder(tmp_path):
    write_image(tmp_path / "train" / "t.png", 1)
    (tmp_path / "train" / "t.txt").write_text("train image")
    write_image(tmp_path / "valid" / "v.png", 2)
    (tmp_path / "valid" / "v.txt").write_text("valid image")
    assert folder(tmp_path, "valid")[0].target.text == "valid image"
    assert folder(tmp_path, "train")[0].target.text == "train image"


def test_missing_and_empty(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="path,caption"):
        folder(tmp_path / "absent.csv")
    (tmp_path / "empty.csv").write_text("path,caption\n")
    with pytest.raises(DatasetEmptyError, match="no usable sample"):
        folder(tmp_path / "empty.csv")


def test_non_utf8_row_skipped(tmp_path):
    write_image(tmp_path / "a.png", 1)
    (tmp_path / "t.csv").write_bytes("path,caption\na.png,caf\xe9\na.png,ok\n".encode("latin-1"))
    source = folder(tmp_path / "t.csv")
    assert len(source) == 1 and source.skipped["non-utf8 text"] == 1


def test_normalize_modality():
    assert [normalize_modality(v) for v in ("CT", " mr ", "X-Ray", "US", "Angiogram", "PET", "", None, "Fundus")] == [
        "CT", "MRI", "X-ray", "ultrasound", "angiography", "PET", None, None, "Fundus"]


def test_symlink_loops_fifos_directories_and_unreadable_files_are_named(tmp_path, monkeypatch):
    root = tmp_path / "data"
    write_image(root / "good.png", 7)
    write_image(root / "locked.png", 8)
    os.symlink(root / "loop_b.png", root / "loop_a.png")
    os.symlink(root / "loop_a.png", root / "loop_b.png")
    os.mkfifo(root / "pipe.png")  # opening it would block: it must never be opened
    (root / "folder.png").mkdir()
    real_access = os.access
    monkeypatch.setattr("fuselip_med.data.adapters.folder.os.access",
                        lambda p, mode: not str(p).endswith("locked.png") and real_access(p, mode))
    os.symlink(tmp_path, root / "linked_dir")  # a folder link (here: a loop back up) is named, not walked
    (root / "t.csv").write_text("path\ngood.png\nloop_a.png\npipe.png\nfolder.png\nlocked.png\n")
    source = folder(root / "t.csv", require_caption=False)
    assert [source[i].id for i in range(len(source))] == ["good.png"] and source[0].target.text is None
    assert [(e.id, e.reason) for e in source.skipped.entries] == [
        ("loop_a.png", "symlink loop"), ("pipe.png", "not a file"), ("folder.png", "not a file"),
        ("locked.png", "unreadable file")]
    listing = folder(root, require_caption=False)  # the same files met by listing the folder
    assert [listing[i].id for i in range(len(listing))] == ["good.png"]
    assert sorted((e.id, e.reason) for e in listing.skipped.entries) == [
        ("linked_dir", "symlinked folder"), ("locked.png", "unreadable file"), ("loop_a.png", "symlink loop"),
        ("loop_b.png", "symlink loop"), ("pipe.png", "not a file"), ("t.csv", "not an image")]


def test_bom_separator_detection_and_encoding_option(tmp_path):
    write_image(tmp_path / "a.png", 1)
    (tmp_path / "bom.csv").write_bytes("\ufeffid,path,caption\nx,a.png,caf\u00e9 au lait\n".encode("utf-8"))
    source = folder(tmp_path / "bom.csv")
    assert source[0].id == "x" and source[0].target.text == "caf\u00e9 au lait"
    (tmp_path / "tabs.txt.tsv").write_text("path\tcaption\na.png\tcomma, inside\n")
    assert folder(tmp_path / "tabs.txt.tsv")[0].target.text == "comma, inside"
    (tmp_path / "latin.csv").write_bytes("path,caption\na.png,\u00e9t\u00e9\n".encode("latin-1"))
    broken = folder(tmp_path / "latin.csv", require_caption=False)
    assert broken[0].target.text is None and not broken.skipped  # an image-only read keeps the row
    with pytest.raises(DatasetEmptyError, match=r"they look like cp1252: try encoding=cp1252"):
        folder(tmp_path / "latin.csv")
    assert folder(tmp_path / "latin.csv", encoding="latin-1")[0].target.text == "\u00e9t\u00e9"
    with pytest.raises(LookupError, match="unknown text encoding 'klingon'"):
        folder(tmp_path / "latin.csv", encoding="klingon")
    with pytest.raises(ValueError, match="sep"):
        folder(tmp_path / "latin.csv", sep="::")


def test_semicolon_csv_from_a_spreadsheet_is_detected(tmp_path):
    """Excel/LibreOffice in comma-decimal locales save CSV with ';', a BOM and CRLF; its quoted caption may
    hold a comma and a line break."""
    write_image(tmp_path / "a.png", 1)
    write_image(tmp_path / "b.png", 2)
    (tmp_path / "excel.csv").write_bytes(
        b'\xef\xbb\xbfpath;caption\r\na.png;size 1,5 cm\r\nb.png;"two\r\nlines"\r\n')
    source = folder(tmp_path / "excel.csv")
    assert [(s.id, s.target.text) for s in source] == [("a.png", "size 1,5 cm"), ("b.png", "two lines")]
    assert not source.skipped


def test_captions_optional_for_image_only_folders(tmp_path):
    write_image(tmp_path / "a.png", 1)
    write_image(tmp_path / "b.png", 2)
    (tmp_path / "b.txt").write_bytes("r\u00f6ntgen".encode("latin-1"))
    images = folder(tmp_path, require_caption=False)
    assert [(images[i].id, images[i].target.text) for i in range(2)] == [("a.png", None), ("b.png", None)]
    assert not images.skipped
    with pytest.raises(DatasetEmptyError, match=r"1 missing caption \(e.g. a.png\); 1 non-utf8 text \(e.g. b.png\)"):
        folder(tmp_path)
