"""`fuselip-med index build` and `search` end to end through the CLI with a tiny FuseLIP saved in the test."""
from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from fuselip_med.cli import app
from fuselip_med.core.fuselip import FuseLIP, FuseLIPConfig
from fuselip_med.core.pretrained import save_pretrained
from fuselip_med.search.index import open_index
from tests.search_helpers import make_folder

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
runner = CliRunner()


def tiny_model(path, seed: int):
    import torch

    torch.manual_seed(seed)
    return save_pretrained(FuseLIP(FuseLIPConfig.from_size("tiny")).eval(), path)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("search_cli")
    folder, model = make_folder(root / "images", patterned=True), tiny_model(root / "model", 0)
    result = runner.invoke(app, ["index", "build", "--model", str(model), "--input", str(folder),
                                 "--out", str(root / "index"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return root, folder, model


def run_search(root, *args):
    return runner.invoke(app, ["search", "--index", str(root / "index"), *args])


def test_build_reports_and_writes_the_index(built):
    root, folder, model = built
    index = open_index(root / "index")
    assert len(index) == 5 and index.model.name == str(model) and index.dim == 64
    assert sorted(index.meta["id"][index.meta["source"] != "dicom"]) == ["blue.png", "green.png", "red.png",
                                                                         "yellow.png"]
    sc_row = int(index.meta.index[index.meta["source"] == "dicom"][0])
    assert index.row_thumbnail_path(sc_row) is None  # secondary capture: burned-in risk, no thumbnail


def test_search_by_image_finds_the_same_image_first(built):
    root, folder, _ = built
    meta = open_index(root / "index").meta
    for name in ("ct.dcm", "green.png", "yellow.png"):
        result = run_search(root, "--image", str(folder / name), "-k", "3", "--json")
        assert result.exit_code == 0, result.output
        hits = json.loads(result.output)
        expected = meta["id"][meta["source"] == "dicom"].iloc[0] if name == "ct.dcm" else name  # DICOM: its key
        assert len(hits) == 3 and hits[0]["id"] == expected and hits[0]["score"] == pytest.approx(1.0, abs=2e-3)


def test_search_by_text_and_by_image_with_instruction(built):
    root, folder, _ = built
    text = run_search(root, "--text", "a grey ct slice", "-k", "5", "--json")
    assert text.exit_code == 0, text.output
    assert sorted(h["id"] for h in json.loads(text.output)) == sorted(open_index(root / "index").meta["id"])
    fused = run_search(root, "--image", str(folder / "red.png"), "--text", "the same, but green", "--json")
    image_only = run_search(root, "--image", str(folder / "red.png"), "--json")
    scores = [json.loads(r.output)[0]["score"] for r in (fused, image_only)]
    assert scores[0] != pytest.approx(scores[1], abs=1e-4)  # the instruction changes the query
    table = run_search(root, "--text", "red", "-k", "2")
    assert table.exit_code == 0 and "rank" in table.output and "caption" in table.output


def test_search_with_another_model_is_refused(built, tmp_path):
    root, folder, _ = built
    other = tiny_model(tmp_path / "other", 1)
    result = run_search(root, "--text", "red", "--model", str(other))
    assert result.exit_code == 1
    message = " ".join(result.output.split())  # the console wraps long lines
    assert message.startswith("error:") and "was built with model" in message
    rebuild = runner.invoke(app, ["index", "build", "--model", str(other), "--input", str(folder), "--out",
                                  str(root / "index"), "--device", "cpu"])
    assert rebuild.exit_code == 1 and "--rebuild" in " ".join(rebuild.output.split())


def test_search_needs_a_query_and_an_index(built, tmp_path):
    root, _, _ = built
    assert run_search(root).exit_code == 2
    missing = runner.invoke(app, ["search", "--index", str(tmp_path), "--text", "x"])
    assert missing.exit_code == 1 and "not a search index" in " ".join(missing.output.split())


@pytest.mark.slow
def test_accelerate_launch_two_processes_builds_the_single_process_index(built, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root, folder, model = built
    repo = Path(__file__).parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    (tmp_path / "two" / ".work").mkdir(parents=True)  # the single index's salt: the same DICOM instance keys
    (tmp_path / "two" / ".work" / "salt").write_text(open_index(root / "index").manifest["salt"])
    completed = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
         "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "fuselip_med.cli", "index", "build", "-m",
         str(model), "-i", str(folder), "-o", str(tmp_path / "two"), "--chunk-size", "2"],
        cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    message = " ".join(completed.stdout.split())
    assert "embedded 3 images (+2 by other processes" in message  # chunks 0, 2 here; chunk 1 on process 1
    single = open_index(root / "index")
    two = open_index(tmp_path / "two")
    assert two.manifest["generation"] == single.manifest["generation"]
    assert two.meta.drop(columns="mtime_ns").equals(single.meta.drop(columns="mtime_ns"))


PATIENT = "Doe_Jane_QZXPATIENT"


@pytest.fixture(scope="module")
def pacs(tmp_path_factory, built):
    """A folder whose DICOM file sits in a patient-named folder (with a stray note that is no image) and whose
    PNGs sit elsewhere; embedded with the tiny model of ``built``."""
    from tests.search_helpers import write_png
    from tests.study_helpers import ct_series

    root = tmp_path_factory.mktemp("pacs_image_unit")
    patient = root / "export" / PATIENT
    ct = ct_series(patient, n=1)["files"][0.0]  # CT Image Storage: no burned-in risk, so a thumbnail
    (patient / "notes.rtf").write_text("no image")
    (root / "export" / "pngs").mkdir()
    write_png(root / "export" / "pngs" / "red.png", (220, 20, 20))
    return root, ct, built[2]


def _written_with_patient(root) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and PATIENT.encode() in p.read_bytes()]


def test_index_build_image_unit_keys_dicom_rows_and_matches_them_by_content(pacs):
    from fuselip_med.data.phi import is_instance_key

    root, ct, model = pacs
    build = ["index", "build", "-m", str(model), "-i", str(root / "export"), "-o", str(root / "index"),
             "--device", "cpu"]
    first = runner.invoke(app, build)
    assert first.exit_code == 0, first.output
    index = open_index(root / "index")
    dicom = index.meta[index.meta["source"] == "dicom"]
    assert len(dicom) == 1 and is_instance_key(dicom.iloc[0]["id"]) and dicom.iloc[0]["path"] is None
    assert index.row_thumbnail_path(int(dicom.index[0])).is_file()  # the index's own thumbnail
    png = index.meta[index.meta["id"] == "pngs/red.png"].iloc[0]  # PNG rows keep their paths
    assert png["path"] == str(root / "export" / "pngs" / "red.png")
    assert index.manifest["salt"] and index.manifest["privacy"]["keep_paths"] is False
    found = runner.invoke(app, ["search", "--index", str(root / "index"), "--image", str(ct), "--json"])
    assert found.exit_code == 0, found.output
    hit = json.loads(found.output)[0]
    assert hit["id"] == dicom.iloc[0]["id"] and hit["path"] is None and PATIENT not in found.output
    assert PATIENT not in first.output and _written_with_patient(root / "index") == []
    again = runner.invoke(app, build)  # no path stored: the rebuild matches the file by its content hash
    assert again.exit_code == 0 and "embedded 0 images" in " ".join(again.output.split()), again.output
    assert sorted(open_index(root / "index").meta["id"]) == sorted(index.meta["id"])


def test_index_build_keep_paths_stores_them_and_the_page_shows_keys(pacs):
    from fuselip_med.search.app import public_record
    from fuselip_med.search.query import hits

    root, ct, model = pacs
    result = runner.invoke(app, ["index", "build", "-m", str(model), "-i", str(root / "export"), "-o",
                                 str(root / "kept"), "--device", "cpu", "--keep-paths"])
    assert result.exit_code == 0, result.output
    index = open_index(root / "kept")
    row = int(index.meta.index[index.meta["source"] == "dicom"][0])
    assert index.meta.iloc[row]["path"] == str(ct)
    hit = hits(index, [1.0], [row])[0]
    assert public_record(hit, show_paths=False)["path"] is None
    assert public_record(hit, show_paths=True)["path"] == str(ct)


def test_embed_image_unit_keys_dicom_rows_and_keeps_the_salt(pacs):
    import pyarrow.parquet as pq

    from fuselip_med.data.phi import is_instance_key

    root, ct, model = pacs
    out = root / "embed" / "images.npy"
    runs, written = [], []
    for _ in range(2):
        runs.append(runner.invoke(app, ["embed", "-m", str(model), "-i", str(root / "export"), "-o", str(out),
                                        "--device", "cpu", "--num-workers", "0"]))
        assert runs[-1].exit_code == 0, runs[-1].output
        written.append(json.loads(out.with_suffix(".ids.json").read_text()))
    assert written[0]["ids"] == written[1]["ids"]  # the re-run reused the salt kept in .ids.json: same keys
    ids = written[1]
    keyed = [i for i in ids["ids"] if i != "pngs/red.png"]
    assert len(ids["ids"]) == 2 and len(keyed) == 1 and is_instance_key(keyed[0]) and ids["salt"]
    skipped = out.with_name("images.skipped.csv").read_text()
    assert "not an image" in skipped and "file-" in skipped  # the stray note named by a key
    parquet = root / "embed" / "images.parquet"
    kept = root / "embed" / "kept.parquet"
    for target, extra in ((parquet, []), (kept, ["--keep-paths"])):
        result = runner.invoke(app, ["embed", "-m", str(model), "-i", str(root / "export"), "-o", str(target),
                                     "--device", "cpu", "--num-workers", "0", *extra])
        assert result.exit_code == 0, result.output
    table = pq.read_table(parquet).to_pydict()
    assert table["id"] != ids["ids"] and "pngs/red.png" in table["id"]  # one salt per output
    assert [image for name, image in zip(table["id"], table["image"]) if name != "pngs/red.png"] == [None]
    assert str(ct) in pq.read_table(kept).to_pydict()["image"]
    assert all(PATIENT not in r.output for r in runs) and sorted(_written_with_patient(root / "embed")) == [
        str(kept), str(kept.with_name("kept.skipped.csv"))]  # only the --keep-paths output names paths


def test_build_summarises_skips_in_one_line_and_names_every_one_in_skipped_csv(built, tmp_path):
    """An archive with many undecodable files: the console gets one summary line (reasons, counts, a few
    examples), not a line per file; ``<index>/skipped.csv`` names every one (before: one console line each and no
    file), and a later clean build leaves an empty list, not the old one."""
    import csv
    import shutil

    root, folder, model = built
    images = tmp_path / "images"
    shutil.copytree(folder, images)
    for number in range(12):
        (images / f"broken{number:02d}.png").write_bytes(b"not a png")
    result = runner.invoke(app, ["index", "build", "--model", str(model), "--input", str(images), "--out",
                                 str(tmp_path / "index"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "skipped 12 of 17 images" in output and "skipped.csv" in output
    assert output.count("broken") == 3  # three examples on the summary line, not one line per file
    rows = list(csv.DictReader(open(tmp_path / "index" / "skipped.csv", encoding="utf-8")))
    assert sorted(row["id"] for row in rows) == [f"broken{number:02d}.png" for number in range(12)]
    assert all(row["reason"] for row in rows)
    for number in range(12):
        (images / f"broken{number:02d}.png").unlink()
    again = runner.invoke(app, ["index", "build", "--model", str(model), "--input", str(images), "--out",
                                str(tmp_path / "index"), "--device", "cpu"])
    assert again.exit_code == 0 and "skipped" not in again.output.lower().replace("skipped.csv", "")
    assert (tmp_path / "index" / "skipped.csv").read_text().splitlines() == ["id,source,reason,detail"]


def test_a_file_name_that_is_not_utf8_is_one_named_skip_in_index_build_and_embed(built, tmp_path):
    """POSIX file names are bytes: ``b'\\xe9t\\xe9.png'`` cannot be stored as UTF-8 text (parquet, JSON). Both
    commands skip it as "file name is not valid UTF-8", named with its bytes escaped (before: index build ended in a
    UnicodeEncodeError traceback, embed wrote the lone surrogates into ids.json)."""
    import csv

    from tests.search_helpers import write_png

    root, _, model = built
    images = tmp_path / "images"
    images.mkdir()
    write_png(images / "ok.png", (200, 10, 10))
    write_png(images / "other.png", (10, 200, 10))
    write_png(images / os.fsdecode(b"\xe9t\xe9.png"), (10, 10, 200))
    built_index = runner.invoke(app, ["index", "build", "--model", str(model), "--input", str(images), "--out",
                                      str(tmp_path / "index"), "--device", "cpu"])
    assert built_index.exit_code == 0 and built_index.exception is None, built_index.output
    assert sorted(open_index(tmp_path / "index").meta["id"]) == ["ok.png", "other.png"]
    assert not (tmp_path / "index" / ".work").exists()
    embedded = runner.invoke(app, ["embed", "--model", str(model), "--input", str(images), "--out",
                                   str(tmp_path / "e.npy"), "--device", "cpu"])
    assert embedded.exit_code == 0 and embedded.exception is None, embedded.output
    assert json.loads((tmp_path / "e.ids.json").read_text(encoding="utf-8"))["ids"] == ["ok.png", "other.png"]
    for listed in (tmp_path / "index" / "skipped.csv", tmp_path / "e.skipped.csv"):
        rows = list(csv.DictReader(open(listed, encoding="utf-8")))
        assert [(row["id"], row["reason"]) for row in rows] == [("\\xe9t\\xe9.png", "file name is not valid UTF-8")]


def test_hits_without_a_caption_print_and_give_strict_json(built, tmp_path):
    """An indexed image without a caption made the README's own `search --text` fail (rich could not render NaN)
    and `--json` print `NaN` (not JSON); a blank query was a traceback."""
    import shutil

    root, folder, model = built
    images = tmp_path / "images"
    shutil.copytree(folder, images)
    (images / "red.png.txt").unlink()  # red.png now has no caption
    assert runner.invoke(app, ["index", "build", "--model", str(model), "--input", str(images), "--out",
                               str(tmp_path / "index"), "--device", "cpu"]).exit_code == 0
    table = runner.invoke(app, ["search", "--index", str(tmp_path / "index"), "--text", "red", "-k", "5"])
    assert table.exit_code == 0, table.output
    as_json = runner.invoke(app, ["search", "--index", str(tmp_path / "index"), "--text", "red", "-k", "5", "--json"])
    hits = json.loads(as_json.stdout, parse_constant=lambda name: pytest.fail(f"non-standard JSON {name}"))
    assert [h["caption"] for h in hits if h["id"] == "red.png"] == [None]
    blank = runner.invoke(app, ["search", "--index", str(tmp_path / "index"), "--text", "   "])
    assert blank.exit_code == 2 and blank.output.startswith("error:") and "Traceback" not in blank.output


def test_an_image_file_given_as_input_is_one_line_that_quotes_none_of_its_header(built, tmp_path):
    """`-i scan.dcm` was read as a CSV, and the error quoted its 'columns': binary header text with the SOP
    Instance UID. Now one line says to give the folder (index build and embed alike)."""
    import pydicom

    root, folder, model = built
    uid = pydicom.dcmread(folder / "ct.dcm").SOPInstanceUID
    for command in (["index", "build", "--model", str(model), "--input", str(folder / "ct.dcm"), "--out",
                     str(tmp_path / "index")],
                    ["embed", "--model", str(model), "--input", str(folder / "ct.dcm"), "--out",
                     str(tmp_path / "e.npy")]):
        result = runner.invoke(app, [*command, "--device", "cpu"])
        message = " ".join(result.output.split())
        assert result.exit_code == 1 and message.startswith("error:") and "not a table" in message
        assert uid not in result.output
