"""`embed` on a user's own folders and tables (issue 12): captions only where needed, column/format options,
DICOM by content, encodings, path containment, and every skipped row named in `<out stem>.skipped.csv`.
The model is a fake (hash of pixels/text) so that these tests check the data path, fast."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fuselip_med.cli import app
from tests.test_dicom_semantics import ct_dataset, padded_ct_hu, write
from tests.test_eval_fakes import HashModel

runner = CliRunner()


@pytest.fixture
def fake_model(monkeypatch):
    model = HashModel()
    monkeypatch.setattr("fuselip_med.cli.common.load_inference_model",
                        lambda name, device, base=None: (model, None, None))
    monkeypatch.setattr("fuselip_med.export.runtime.load_for_runtime",  # embed's loader since the ONNX runtime
                        lambda name, runtime="pytorch", device=None, base=None: (model, None))
    return model


def png(path: Path, value: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(path)
    return path


def embed(*args: str):
    result = runner.invoke(app, ["embed", "--model", "fake", "--num-workers", "0", *args])
    return result, " ".join(result.output.split())


def skipped_rows(out: Path) -> list[dict]:
    with open(out.with_name(f"{out.stem}.skipped.csv"), newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def ids_of(out: Path) -> list[str]:
    return json.loads(out.with_suffix(".ids.json").read_text())["ids"]


def test_uncaptioned_folder_with_scanner_dicom_names_embeds_every_image(tmp_path, fake_model):
    folder = tmp_path / "export"
    for i in range(3):
        png(folder / f"photo{i}.png", 40 * i)
    for name in ("IM000001", "slice.IMA", "scan.dicom", "ok.dcm"):
        write(ct_dataset(padded_ct_hu()), folder / name)
    (folder / "README.txt").write_text("Exported from the PACS.\n")
    out = tmp_path / "emb.npy"
    result, text = embed("--input", str(folder), "--out", str(out), "--kind", "image")
    assert result.exit_code == 0, result.output
    assert np.load(out).shape == (7, 16)
    from fuselip_med.data.phi import is_instance_key

    ids = ids_of(out)  # DICOM files (found by content, whatever their names) under salted instance keys
    assert sorted(i for i in ids if not is_instance_key(i)) == ["photo0.png", "photo1.png", "photo2.png"]
    assert sum(map(is_instance_key, ids)) == 4
    skipped = [(r["id"][:5], r["source"], r["reason"]) for r in skipped_rows(out)]
    assert skipped == [("file-", "input", "not an image")]  # beside DICOM: named by a key, not its path
    assert "1 not an image (e.g. file-" in text

    result, text = embed("--input", str(folder), "--out", str(tmp_path / "pairs.npy"), "--kind", "pair")
    assert result.exit_code == 1 and "error:" in text and "7 missing caption" in text  # names the rows lacking one


def test_open_clip_tsv_and_path_only_csv(tmp_path, fake_model):
    for i in range(3):
        png(tmp_path / "img" / f"{i}.png", 10 * i)
    tsv = tmp_path / "train.tsv"
    tsv.write_text("filepath\ttitle\n" + "".join(f"img/{i}.png\ta scan, number {i}\n" for i in range(3)))
    out = tmp_path / "tsv.npy"
    result, text = embed("--input", str(tsv), "--out", str(out), "--kind", "pair")
    assert result.exit_code == 1 and "--path-column NAME" in text  # an option this command has
    result, text = embed("--input", str(tsv), "--out", str(out), "--kind", "pair", "--path-column", "filepath",
                         "--caption-column", "title")
    assert result.exit_code == 0, result.output
    assert ids_of(out) == ["img/0.png", "img/1.png", "img/2.png"] and np.load(out).shape == (3, 16)
    assert sorted(t for _, t in fake_model.seen) == ["a scan, number 0", "a scan, number 1", "a scan, number 2"]

    only_path = tmp_path / "paths.csv"
    only_path.write_text("path\n" + "".join(f"img/{i}.png\n" for i in range(3)))
    out = tmp_path / "paths.npy"
    result, _ = embed("--input", str(only_path), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert ids_of(out) == ["img/0.png", "img/1.png", "img/2.png"] and skipped_rows(out) == []

    semicolons = tmp_path / "semi.csv"
    semicolons.write_text("id;path\nfirst;img/0.png\nsecond;img/2.png\n")
    out = tmp_path / "semi.npy"
    result, _ = embed("--input", str(semicolons), "--out", str(out), "--sep", ";", "--id-column", "id")
    assert result.exit_code == 0, result.output
    assert ids_of(out) == ["first", "second"]


def cp1252_table(folder: Path) -> Path:
    for i in range(6):
        png(folder / f"{i}.png", 30 * i)
    captions = ["Plain chest film.", "Épanchement pleural.", "Normal study.", "Fracture du fémur.",
                "Knee MRI.", "Cœur élargi."]
    table = folder / "captions.csv"
    table.write_bytes(("path,caption\r\n" + "".join(f"{i}.png,{c}\r\n" for i, c in enumerate(captions)))
                      .encode("cp1252"))
    return table


def test_cp1252_captions(tmp_path, fake_model):
    table = cp1252_table(tmp_path)
    out = tmp_path / "images.npy"
    result, _ = embed("--input", str(table), "--out", str(out), "--kind", "image")
    assert result.exit_code == 0, result.output
    assert len(ids_of(out)) == 6  # undecodable captions never drop an image-only row

    out = tmp_path / "pairs.npy"
    result, text = embed("--input", str(table), "--out", str(out), "--kind", "pair")
    assert result.exit_code == 0, result.output
    assert ids_of(out) == ["0.png", "2.png", "4.png"]
    assert [(r["id"], r["reason"]) for r in skipped_rows(out)] == [
        ("1.png", "non-utf8 text"), ("3.png", "non-utf8 text"), ("5.png", "non-utf8 text")]
    assert "3 non-utf8 text (e.g. 1.png, 3.png, 5.png)" in text
    assert "they look like cp1252: try --encoding cp1252" in text

    result, _ = embed("--input", str(table), "--out", str(out), "--kind", "pair", "--encoding", "cp1252")
    assert result.exit_code == 0, result.output
    assert len(ids_of(out)) == 6 and skipped_rows(out) == []
    assert "Cœur élargi." in {t for _, t in fake_model.seen}


def test_paths_outside_the_table_folder_are_refused_unless_image_root(tmp_path, fake_model):
    table_dir, elsewhere = tmp_path / "tables", tmp_path / "elsewhere"
    png(table_dir / "inside.png", 5)
    png(elsewhere / "x.png", 50)
    png(elsewhere / "y.png", 60)
    os.symlink(elsewhere / "y.png", table_dir / "link.png")
    table = table_dir / "rows.csv"
    table.write_text(f"path\ninside.png\n../elsewhere/x.png\nlink.png\n{elsewhere / 'y.png'}\n")
    out = tmp_path / "contained.npy"
    result, text = embed("--input", str(table), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert ids_of(out) == ["inside.png"]
    assert [(r["id"], r["reason"]) for r in skipped_rows(out)] == [
        ("../elsewhere/x.png", "outside image root"), ("link.png", "outside image root"),
        (str(elsewhere / "y.png"), "outside image root")]
    assert "--image-root DIR" in skipped_rows(out)[0]["source"] + skipped_rows(out)[0]["detail"]

    result, _ = embed("--input", str(table), "--out", str(out), "--image-root", str(elsewhere))
    assert result.exit_code == 0, result.output
    assert ids_of(out) == ["inside.png", "../elsewhere/x.png", "link.png", str(elsewhere / "y.png")]


def official_split(root: Path, n_ids: int, with_image: set[int]) -> Path:
    """A ROCOv2 official-layout test split: test_captions.csv with ``n_ids`` IDs, images only for ``with_image``."""
    ids = [f"ROCOv2_2023_test_{n:06d}" for n in range(1, n_ids + 1)]
    root.mkdir(parents=True)
    (root / "test_captions.csv").write_text("ID,Caption\n" + "".join(f"{i},Caption of case {i}.\n" for i in ids))
    for n in with_image:
        png(root / "test_images" / "test" / f"{ids[n - 1]}.jpg", 20 * n)
    return root


def evaluate(tmp_path: Path, *args: str):
    result = runner.invoke(app, ["eval", "--model", "fake", "--num-workers", "0", "--tasks", "rocov2-retrieval",
                                 "--out", str(tmp_path / "eval"), *args])
    return result, " ".join(result.output.split())


def test_eval_refuses_mostly_missing_images_unless_allow_partial(tmp_path, fake_model):
    data = official_split(tmp_path / "ROCOv2_data", 5, {1})
    result, text = evaluate(tmp_path, "--data", f"rocov2={data}")
    assert result.exit_code == 1 and "error: only 1 of the 5 rows listed by rocov2/test can be evaluated" in text
    assert "4 missing image (e.g. ROCOv2_2023_test_000002, ROCOv2_2023_test_000003, ROCOv2_2023_test_000004)" in text
    assert "--allow-partial" in text and not (tmp_path / "eval" / "metrics.json").exists()

    result, text = evaluate(tmp_path, "--data", f"rocov2={data}", "--allow-partial")
    assert result.exit_code == 0, result.output
    task = json.loads((tmp_path / "eval" / "metrics.json").read_text())["tasks"]["rocov2-retrieval"]
    assert (task["n_listed"], task["n_evaluated"], task["skipped"]) == (5, 1, {"missing image": 4})
    assert task["metrics"]["image_to_text_R@1"] == 1.0  # one row: but never without saying that 4 were dropped
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "rows listed: 5, evaluated: 1" in report and "missing image x4" in report
    named = list(csv.DictReader(open(tmp_path / "eval" / "skipped.csv", encoding="utf-8")))
    assert [(r["id"], r["reason"]) for r in named] == [(f"ROCOv2_2023_test_{n:06d}", "missing image")
                                                       for n in (2, 3, 4, 5)]
    assert "1 of 5 rows evaluated; skipped 4 missing image (e.g. ROCOv2_2023_test_000002," in text


def test_eval_reads_an_open_clip_tsv_with_column_options(tmp_path, fake_model):
    for i in range(4):
        png(tmp_path / "img" / f"{i}.png", 50 * i)
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("filepath\ttitle\n" + "".join(f"img/{i}.png\tcase {i}\n" for i in range(4)) + "img/9.png\tgone\n")
    result, text = evaluate(tmp_path, "--data", f"rocov2_test={tsv}")
    assert result.exit_code == 1 and "--path-column NAME" in text
    result, text = evaluate(tmp_path, "--data", f"rocov2_test={tsv}", "--path-column", "filepath",
                            "--caption-column", "title", "--pool-size", "4")
    assert result.exit_code == 0, result.output
    task = json.loads((tmp_path / "eval" / "metrics.json").read_text())["tasks"]["rocov2-retrieval"]
    assert (task["n_listed"], task["n_evaluated"], task["skipped"]) == (5, 4, {"missing image": 1})
    assert task["skip_examples"] == {"missing image": ["img/9.png"]}


def test_eval_counts_images_that_fail_to_decode_against_the_listed_rows(tmp_path, fake_model):
    data = official_split(tmp_path / "ROCOv2_data", 4, {1, 2, 3, 4})
    for n in (2, 3, 4):  # files that exist but are not images
        (data / "test_images" / "test" / f"ROCOv2_2023_test_{n:06d}.jpg").write_bytes(b"not a jpeg")
    result, text = evaluate(tmp_path, "--data", f"rocov2={data}")
    assert result.exit_code == 1, result.output
    assert "only 1 of the 4 rows listed by rocov2/test can be evaluated (skipped 3 of 4 rows: 3 corrupt image" in text


def test_eval_on_an_uncaptioned_folder_names_the_rows_lacking_a_caption(tmp_path, fake_model):
    for i in range(2):
        png(tmp_path / "scans" / f"{i}.png", 9 * i)
    (tmp_path / "scans" / "0.txt").write_text("The only caption.")
    result, text = evaluate(tmp_path, "--data", f"rocov2_test={tmp_path / 'scans'}")
    assert result.exit_code == 0, result.output  # 1 of 2 rows is half: evaluated, and the other one named
    assert "1 of 2 rows evaluated; skipped 1 missing caption (e.g. 1.png)" in text
    task = json.loads((tmp_path / "eval" / "metrics.json").read_text())["tasks"]["rocov2-retrieval"]
    assert (task["n_listed"], task["n_evaluated"], task["skip_examples"]) == (2, 1, {"missing caption": ["1.png"]})
    data = official_split(tmp_path / "ROCOv2_data", 2, {1, 2})
    result, text = evaluate(tmp_path, "--data", f"rocov2={data}", "--encoding", "cp1252")
    assert result.exit_code == 1 and "--encoding ... apply to your own tables and folders" in text
