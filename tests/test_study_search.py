"""Series/study indexes: `index build --unit series` over a two-study export, then text and one-slice image
queries find the right series first with the right best slice; the JSON answer names study / series / slice
by salted keys only."""
from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
import torch
from typer.testing import CliRunner

from fuselip_med.cli import app
from fuselip_med.core.fuselip import FuseLIP, FuseLIPConfig
from fuselip_med.core.pretrained import save_pretrained
from fuselip_med.data.phi import PrivacyOptions, Pseudonyms
from fuselip_med.data.studies import find_series
from fuselip_med.inference.units import UnitOptions
from fuselip_med.search.index import ModelId, build_unit_index, open_index
from fuselip_med.search.query import search
from tests.study_helpers import ct_series

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class BrightnessEncoder:
    """Planted ``encode``: an image maps to (m, 1 - m, 0.1) with m its mean pixel value; the text "bright" to
    (1, 0, 0) and "dark" to (0, 1, 0). Unit vectors [B, 3]."""

    def encode(self, images=None, texts=None, image_ids=None):
        if images is not None:
            mean = images.mean(dim=(1, 2, 3))
            out = torch.stack([mean, 1 - mean, torch.full_like(mean, 0.1)], dim=1)
        else:
            out = torch.tensor([[1.0, 0.0, 0.0] if "bright" in t else [0.0, 1.0, 0.0] for t in texts])
        return torch.nn.functional.normalize(out, dim=-1)


def two_studies(root):
    """Study 1: a dark series (z 0..10 mm); study 2: a brighter series (z 15..25 mm) — brightness follows z."""
    dark = ct_series(root / "PAT_A" / "s1", n=5, spacing_mm=2.5, study_uid="1.5.1", series_uid="1.5.1.1")
    bright = ct_series(root / "PAT_B" / "s1", n=5, spacing_mm=2.5, z0=15.0, study_uid="1.5.2", series_uid="1.5.2.1")
    return dark, bright


def test_text_and_slice_queries_find_the_series_and_its_best_slice(tmp_path):
    dark, bright = two_studies(tmp_path / "export")
    keys = Pseudonyms.fresh()
    model = BrightnessEncoder()
    build_unit_index(tmp_path / "index", find_series(tmp_path / "export", keys), model, ModelId("planted", "p1"),
                     "series", keys.salt, UnitOptions(slices=5))
    index = open_index(tmp_path / "index")
    assert index.unit == "series" and len(index) == 2 and len(index.slices) == 10

    def slice_key(path):
        return keys.key(pydicom.dcmread(path).SOPInstanceUID, "sl-")

    [top, other] = search(index, model, text="bright", k=2)
    assert top.series == keys.key("1.5.2.1", "se-") and top.study == keys.key("1.5.2", "st-")
    assert top.best_slice == slice_key(bright["files"][25.0])  # the brightest slice
    [top, _] = search(index, model, text="dark", k=2)
    assert top.series == keys.key("1.5.1.1", "se-") and top.best_slice == slice_key(dark["files"][0.0])
    [top, _] = search(index, model, image=bright["files"][20.0], k=2)
    assert top.series == keys.key("1.5.2.1", "se-") and top.best_slice == slice_key(bright["files"][20.0])
    assert top.slice_score == pytest.approx(1.0, abs=1e-3)
    assert index.thumbnail_path(top.slice_row).is_file()


def test_burned_in_series_get_no_thumbnail_unless_allowed(tmp_path):
    ct_series(tmp_path / "export", n=3, burned_in="YES")
    keys = Pseudonyms.fresh()
    series = find_series(tmp_path / "export", keys)
    build_unit_index(tmp_path / "hidden", series, BrightnessEncoder(), ModelId("planted", "p1"), "series", keys.salt,
                     UnitOptions(slices=3))
    assert open_index(tmp_path / "hidden").slices["thumbnail"].isna().all()
    assert not list((tmp_path / "hidden").glob("thumbs/*.png"))
    build_unit_index(tmp_path / "shown", series, BrightnessEncoder(), ModelId("planted", "p1"), "series", keys.salt,
                     UnitOptions(slices=3), privacy=PrivacyOptions(allow_burned_in=True))
    assert len(list((tmp_path / "shown").glob("thumbs/*.png"))) == 3


def test_index_build_unit_series_cli_and_search_json(tmp_path):
    dark, bright = two_studies(tmp_path / "export")
    torch.manual_seed(0)
    save_pretrained(FuseLIP(FuseLIPConfig.from_size("tiny")).eval(), tmp_path / "tiny")
    runner = CliRunner()
    built = runner.invoke(app, ["index", "build", "-m", str(tmp_path / "tiny"), "-i", str(tmp_path / "export"),
                                "--unit", "series", "--slices", "3", "-o", str(tmp_path / "index"), "--device", "cpu"])
    assert built.exit_code == 0, built.output
    assert "2 series rows from 2 series, 6 slices; embedded 2 series" in " ".join(built.output.split())
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    keys = Pseudonyms(manifest["salt"])
    query = bright["files"][25.0]  # sampled: round(linspace(0, 4, 3)) = slices 0, 2, 4
    found = runner.invoke(app, ["search", "--index", str(tmp_path / "index"), "--image", str(query), "--json"])
    assert found.exit_code == 0, found.output
    hits = json.loads(found.stdout)
    assert [h["series"] for h in hits] == [keys.key("1.5.2.1", "se-"), keys.key("1.5.1.1", "se-")]
    assert hits[0]["best_slice"] == keys.key(pydicom.dcmread(query).SOPInstanceUID, "sl-")
    assert hits[0]["path"] is None and manifest["salt"] not in found.stdout
    text = runner.invoke(app, ["search", "--index", str(tmp_path / "index"), "--text", "chest CT"])
    assert text.exit_code == 0 and "best slice" in text.output
    again = runner.invoke(app, ["index", "build", "-m", str(tmp_path / "tiny"), "-i", str(tmp_path / "export"),
                                "--unit", "series", "--slices", "3", "-o", str(tmp_path / "index"), "--device", "cpu"])
    # same salt, same keys, same generation
    assert again.exit_code == 0 and "up to date" in " ".join(again.output.split())
    assert np.array_equal(open_index(tmp_path / "index").meta["id"], [h["id"] for h in sorted(hits,
                                                                                               key=lambda h: h["row"])])


def test_paths_are_stored_only_with_keep_paths(tmp_path):
    made = ct_series(tmp_path / "export" / "Doe_John", n=3)
    keys = Pseudonyms.fresh()
    series = find_series(tmp_path / "export", keys)
    build_unit_index(tmp_path / "plain", series, BrightnessEncoder(), ModelId("planted", "p1"), "series", keys.salt,
                     UnitOptions(slices=3))
    assert open_index(tmp_path / "plain").meta["path"].isna().all()
    assert not any(b"Doe_John" in p.read_bytes() for p in (tmp_path / "plain").rglob("*") if p.is_file())
    build_unit_index(tmp_path / "kept", series, BrightnessEncoder(), ModelId("planted", "p1"), "series", keys.salt,
                     UnitOptions(slices=3), privacy=PrivacyOptions(keep_paths=True))
    kept = open_index(tmp_path / "kept")
    assert kept.meta["path"].tolist() == [str(made["files"][0.0])] and not kept.privacy.show_paths
    with pytest.raises(ValueError, match="--show-paths needs --keep-paths"):
        PrivacyOptions(show_paths=True)


class CountingEncoder(BrightnessEncoder):
    """``BrightnessEncoder`` that counts the images it embeds."""

    def __init__(self):
        self.images = 0

    def encode(self, images=None, texts=None, image_ids=None):
        self.images += 0 if images is None else len(images)
        return super().encode(images=images, texts=texts, image_ids=image_ids)


def test_unit_index_rebuild_reuses_unchanged_series_and_drops_removed_ones(tmp_path):
    import shutil

    two_studies(tmp_path / "export")
    keys, model = Pseudonyms.fresh(), CountingEncoder()

    def build():
        model.images = 0
        return build_unit_index(tmp_path / "index", find_series(tmp_path / "export", keys), model,
                                ModelId("planted", "p1"), "series", keys.salt, UnitOptions(slices=3))

    first = build()
    assert (first.embedded_images, model.images, first.n_slices) == (2, 6, 6)
    before = open_index(tmp_path / "index")
    vectors = {i: np.asarray(before.image_vectors[r]).copy() for r, i in enumerate(before.meta["id"])}
    again = build()
    assert (again.embedded_images, again.reused_images, model.images, again.up_to_date) == (0, 2, 0, True)
    ct_series(tmp_path / "export" / "PAT_C" / "s1", n=4, z0=40.0, study_uid="1.5.3", series_uid="1.5.3.1")
    added = build()
    assert (added.embedded_images, added.reused_images, model.images, added.n_rows) == (1, 2, 3, 3)
    index = open_index(tmp_path / "index")
    for id, vector in vectors.items():  # reused as stored
        assert np.array_equal(np.asarray(index.image_vectors[index.row_of(id)]), vector)
    shutil.rmtree(tmp_path / "export" / "PAT_A")
    removed = build()
    assert (removed.embedded_images, removed.removed, removed.n_rows, model.images) == (0, 1, 2, 0)
    assert keys.key("1.5.1.1", "se-") not in set(open_index(tmp_path / "index").meta["id"])
    assert len(list((tmp_path / "index" / "thumbs").glob("*.png"))) == 6  # the removed series' thumbnails gone


@pytest.mark.slow  # several processes: seconds of start-up each (CI runs the slow tests)
def test_killed_unit_index_build_resumes_to_the_same_index(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    for number in range(10):
        ct_series(tmp_path / "export" / f"P{number}", n=3, z0=10.0 * number, study_uid=f"1.6.{number}",
                  series_uid=f"1.6.{number}.1")
    torch.manual_seed(0)
    save_pretrained(FuseLIP(FuseLIPConfig.from_size("tiny")).eval(), tmp_path / "tiny")
    command = [sys.executable, "-m", "fuselip_med.cli", "index", "build", "-m", str(tmp_path / "tiny"), "-i",
               str(tmp_path / "export"), "--unit", "study", "--slices", "3", "--chunk-size", "3", "--device", "cpu",
               "--batch-size", "3"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    subprocess.run([*command, "-o", str(tmp_path / "whole")], check=True, env=env, capture_output=True)
    salt = json.loads((tmp_path / "whole" / "manifest.json").read_text())["salt"]
    (tmp_path / "killed" / ".work").mkdir(parents=True)
    (tmp_path / "killed" / ".work" / "salt").write_text(salt)  # as a first build killed after it began leaves it
    process = subprocess.Popen([*command, "-o", str(tmp_path / "killed")], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    chunks = tmp_path / "killed" / ".work" / "series"
    deadline = time.time() + 120
    while not (chunks.is_dir() and any(chunks.glob("*.npz"))):
        assert process.poll() is None and time.time() < deadline, "the build ended before a chunk was seen"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = len(list(chunks.glob("*.npz")))
    assert not (tmp_path / "killed" / "manifest.json").exists() and 1 <= finished < 10
    rerun = subprocess.run([*command, "-o", str(tmp_path / "killed")], env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    printed = " ".join(rerun.stdout.split())
    assert f"embedded {10 - finished} series (+{finished} from an interrupted run)" in printed, printed
    whole, resumed = open_index(tmp_path / "whole"), open_index(tmp_path / "killed")
    assert resumed.manifest["generation"] == whole.manifest["generation"]  # rows, vectors, slices: all equal
    assert np.array_equal(np.asarray(resumed.slice_vectors), np.asarray(whole.slice_vectors))
    assert sorted(p.name for p in (tmp_path / "killed" / "thumbs").iterdir()) == sorted(
        p.name for p in (tmp_path / "whole" / "thumbs").iterdir())
    assert not (tmp_path / "killed" / ".work").exists()


def test_key_object_selection_of_series_hits_needs_the_stored_files(tmp_path):
    """A series index keeps no file (and so no UID) unless built with --keep-paths: --export-kos then stops with one
    line saying so (before: "no hit is a DICOM instance", as if the hits were not DICOM); with --keep-paths the KOS
    references each hit series' instance in rank order."""
    dark, bright = two_studies(tmp_path / "export")
    torch.manual_seed(0)
    save_pretrained(FuseLIP(FuseLIPConfig.from_size("tiny")).eval(), tmp_path / "tiny")
    runner = CliRunner()
    for name, extra in (("plain", []), ("kept", ["--keep-paths"])):
        built = runner.invoke(app, ["index", "build", "-m", str(tmp_path / "tiny"), "-i", str(tmp_path / "export"),
                                    "--unit", "series", "--slices", "3", "-o", str(tmp_path / name), "--device",
                                    "cpu", *extra])
        assert built.exit_code == 0, built.output
    query = bright["files"][25.0]
    refused = runner.invoke(app, ["search", "--index", str(tmp_path / "plain"), "--image", str(query),
                                  "--export-kos", str(tmp_path / "plain.dcm")])
    message = " ".join(refused.output.split())
    assert refused.exit_code == 1 and message.startswith("error:") and "--keep-paths" in message
    assert not (tmp_path / "plain.dcm").exists()
    written = runner.invoke(app, ["search", "--index", str(tmp_path / "kept"), "--image", str(query),
                                  "--export-kos", str(tmp_path / "kept.dcm")])
    assert written.exit_code == 0, written.output
    kos = pydicom.dcmread(tmp_path / "kept.dcm")
    referenced = [item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for item in kos.ContentSequence
                  if "ReferencedSOPSequence" in item]
    uids = [{pydicom.dcmread(path).SOPInstanceUID for path in series["files"].values()} for series in (bright, dark)]
    assert len(referenced) == 2 and referenced[0] in uids[0] and referenced[1] in uids[1]  # rank order
    assert kos.StudyInstanceUID == pydicom.dcmread(query).StudyInstanceUID
    descriptions = [item.TextValue for item in kos.ContentSequence if "TextValue" in item]
    assert descriptions == ["Similar cases: query image"]  # never the query file's name (PACS exports name files
    assert query.name not in str(kos)                       # after patients)
    again = ["search", "--index", str(tmp_path / "kept"), "--image", str(query), "--export-kos"]
    replaced = runner.invoke(app, [*again, str(tmp_path / "kept.dcm"), "--force"])  # --force replaces a file
    assert replaced.exit_code == 0, replaced.output
    assert pydicom.dcmread(tmp_path / "kept.dcm").SOPInstanceUID != kos.SOPInstanceUID


def test_export_kos_refuses_an_existing_file_a_folder_and_the_query_image_before_searching(tmp_path):
    """--export-kos onto an existing file (a model's weights, the query image) or a folder: one error line and the
    file unchanged; checked before the index is opened (here there is none). --force never replaces the query."""
    from tests.search_helpers import write_ct

    query = write_ct(tmp_path / "query.dcm")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights")
    before = query.read_bytes()
    runner = CliRunner()
    for target, extra, words in ((weights, [], "--force"), (query, [], "query image"),
                                 (query, ["--force"], "query image"), (tmp_path, [], "folder"),
                                 (tmp_path, ["--force"], "folder")):
        result = runner.invoke(app, ["search", "--index", str(tmp_path / "no_index"), "--image", str(query),
                                     "--export-kos", str(target), *extra])
        lines = result.output.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error:"), result.output
        assert words in lines[0], lines[0]
    assert weights.read_bytes() == b"weights" and query.read_bytes() == before
