"""Search index: build over PNG + DICOM, search by text / image / image+instruction, incremental updates equal a
fresh build, a SIGKILLed build resumes to the same index, model mismatches are refused, FAISS index choice."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fuselip_med.search.index import (
    IndexSettings,
    ModelId,
    SearchIndexError,
    build_index,
    list_entries,
    make_faiss_index,
    open_index,
)
from fuselip_med.search.query import check_model, more_like_this, search
from tests.search_helpers import KEEP_PATHS, PlantedEncoder, make_folder, write_png

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def build(folder: Path, out: Path, **settings) -> object:
    entries, _ = list_entries(folder, privacy=KEEP_PATHS)
    encoder = PlantedEncoder()
    return build_index(out, entries, encoder, encoder.model_id, IndexSettings(**settings), progress=False)


def index_state(out: Path) -> tuple:
    """Everything a reader sees: manifest (minus nothing), metadata rows, vectors, FAISS answers."""
    index = open_index(out)
    manifest = json.loads((out / "manifest.json").read_text())
    meta = index.meta.drop(columns=["mtime_ns"]).to_dict("records")
    queries = np.eye(index.dim, dtype=np.float32)
    return (manifest["generation"], manifest["count"], meta, np.asarray(index.image_vectors).tobytes(),
            np.asarray(index.caption_vectors).tobytes(), index.search(queries, 3)[1].tolist())


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "images")


def test_build_lists_png_and_dicom_with_metadata(folder, tmp_path):
    report = build(folder, tmp_path / "index")
    index = open_index(tmp_path / "index")
    assert report.n_rows == len(index) == 5 and report.n_captions == 5 and report.embedded_images == 5
    assert sorted(index.meta["id"]) == ["blue.png", "ct.dcm", "green.png", "red.png", "yellow.png"]
    assert set(index.meta.columns) >= {"id", "path", "caption", "source", "content_hash", "model_id"}
    assert index.image_vectors.dtype == np.float16 and isinstance(index.image_vectors, np.memmap)
    assert index.image_vectors.shape == (5, 8) and index.manifest["index"]["type"] == "flat"
    assert set(index.meta["model_id"]) == {str(PlantedEncoder.model_id)}
    ct = index.meta[index.meta["id"] == "ct.dcm"].iloc[0]
    assert ct["path"] == str(folder / "ct.dcm") and ct["caption"] == "a grey ct slice"
    assert not (tmp_path / "index" / ".work").exists()


def test_search_by_text_image_and_image_with_instruction(folder, tmp_path):
    build(folder, tmp_path / "index")
    index, encoder = open_index(tmp_path / "index"), PlantedEncoder()
    assert search(index, encoder, text="the red one", k=3)[0].id == "red.png"
    assert search(index, encoder, text="grey", k=1)[0].id == "ct.dcm"
    assert search(index, encoder, image=folder / "blue.png", k=2)[0].id == "blue.png"
    assert search(index, encoder, image=folder / "ct.dcm", k=2)[0].id == "ct.dcm"  # a DICOM query
    fused = search(index, encoder, image=folder / "red.png", text="but green", k=3)
    assert fused[0].id == "yellow.png" and fused[0].score > fused[1].score  # red image + "green" = yellow
    assert [h.rank for h in fused] == [1, 2, 3]
    by_caption = search(index, encoder, text="blue", k=1, target="caption")
    assert by_caption[0].id == "blue.png" and by_caption[0].caption == "a blue square"
    like = more_like_this(index, "red.png", k=2)
    assert "red.png" not in [h.id for h in like] and like[0].id == "yellow.png"


def test_incremental_add_remove_and_change_equal_a_fresh_build(folder, tmp_path):
    build(folder, tmp_path / "incremental")
    (folder / "blue.png").unlink()
    (folder / "blue.png.txt").unlink()
    write_png(folder / "cyan.png", (20, 220, 220))
    (folder / "cyan.png.txt").write_text("a cyan square")
    write_png(folder / "green.png", (30, 200, 30))       # changed content, same name
    (folder / "red.png.txt").write_text("a bright red square")  # changed caption only
    report = build(folder, tmp_path / "incremental")
    assert report.embedded_images == 2 and report.reused_images == 3 and report.removed == 1
    assert report.embedded_captions == 2
    build(folder, tmp_path / "fresh")
    assert index_state(tmp_path / "incremental") == index_state(tmp_path / "fresh")
    again = build(folder, tmp_path / "incremental")
    assert again.up_to_date and again.embedded_images == 0


def test_images_that_fail_are_not_counted_as_embedded_here_or_elsewhere(folder, tmp_path):
    """5 good images and 2 that do not decode: "embedded 5 (+0 elsewhere)", the 2 named as skipped (before:
    the failures counted as embedded and "+-2 by other processes or an interrupted run")."""
    for name in ("broken.png", "empty.png"):
        (folder / name).write_bytes(b"not a png" if name == "broken.png" else b"")
    report = build(folder, tmp_path / "index", chunk_size=2)
    assert (report.embedded_images, report.embedded_elsewhere, report.n_rows) == (5, 0, 5)
    assert sorted(report.skipped) == ["broken.png", "empty.png"]


def test_index_build_and_embed_name_failed_images_without_a_warning_per_image(folder, tmp_path, caplog):
    """The callers that name skips (skip summary + skipped.csv, by row id) get no console warning per image
    keyed by its unsalted content hash; the engine's line stays at debug level."""
    import logging

    from fuselip_med.embed import EmbedRow, embed_rows

    (folder / "broken.png").write_bytes(b"not a png")
    with caplog.at_level(logging.DEBUG, logger="fuselip_med"):
        report = build(folder, tmp_path / "index")
        _, _, failed = embed_rows(PlantedEncoder(), [EmbedRow("broken.png", str(folder / "broken.png"), None)],
                                  progress=False)
    assert sorted(report.skipped) == ["broken.png"] and list(failed) == ["broken.png"]
    skipping = [record for record in caplog.records if "skipping image" in record.getMessage()]
    assert len(skipping) == 2 and {record.levelno for record in skipping} == {logging.DEBUG}


KILLABLE = """
import sys, time
sys.path.insert(0, {root!r})
from fuselip_med.search.index import IndexSettings, build_index, list_entries
from tests.search_helpers import KEEP_PATHS, PlantedEncoder

class Slow(PlantedEncoder):
    def encode(self, **kw):
        time.sleep(0.4)
        return super().encode(**kw)

entries, _ = list_entries({folder!r}, privacy=KEEP_PATHS)
build_index({out!r}, entries, Slow(), Slow.model_id, IndexSettings(chunk_size=1, batch_size=1), progress=False)
"""


def test_build_killed_midway_resumes_to_the_same_index(folder, tmp_path):
    for i in range(4):  # more chunks, so that the kill lands midway
        write_png(folder / f"extra{i}.png", (40 * i, 90, 150))
        (folder / f"extra{i}.png.txt").write_text(f"extra {i}")
    out = tmp_path / "killed"
    script = KILLABLE.format(root=str(Path(__file__).parents[1]), folder=str(folder), out=str(out))
    process = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"})
    chunks = out / ".work" / "image"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(chunks.glob("*.npz"))) < 3:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = len(list(chunks.glob("*.npz")))
    assert 3 <= finished < 9 and not (out / "manifest.json").exists()
    report = build(folder, out, chunk_size=1, batch_size=1)
    assert report.embedded_images == 9 - finished and report.embedded_elsewhere == finished
    build(folder, tmp_path / "uninterrupted", chunk_size=1, batch_size=1)
    assert index_state(out) == index_state(tmp_path / "uninterrupted")
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("manifest")) == sorted(
        p.name for p in (tmp_path / "uninterrupted").iterdir() if not p.name.startswith("manifest"))


def test_two_processes_embed_their_shards_and_the_main_one_merges(folder, tmp_path):
    barrier = threading.Barrier(2, timeout=60)

    class Process:  # what build_index reads from an Accelerate PartialState; the ranks run as threads
        def __init__(self, rank):
            self.process_index, self.num_processes = rank, 2

        def wait_for_everyone(self):
            barrier.wait()

    entries, _ = list_entries(folder, privacy=KEEP_PATHS)
    encoder, settings, out = PlantedEncoder(), IndexSettings(chunk_size=2), tmp_path / "sharded"
    reports = {}

    def run(rank):
        reports[rank] = build_index(out, entries, encoder, encoder.model_id, settings, accelerator=Process(rank),
                                    progress=False)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert reports[1].n_rows == 0 and reports[1].embedded_images == 2  # chunk 1 of [0, 1, 2]
    assert reports[0].embedded_images == 3 and reports[0].n_rows == 5  # chunks 0 and 2, then the merge
    assert reports[0].embedded_elsewhere == 2
    build(folder, tmp_path / "single", chunk_size=2)
    assert index_state(out) == index_state(tmp_path / "single")


def test_model_mismatch_is_refused(folder, tmp_path):
    build(folder, tmp_path / "index")
    index = open_index(tmp_path / "index")
    other = ModelId("other", "0123456789abcdef")
    with pytest.raises(SearchIndexError, match="built with model planted@.*rebuild"):
        check_model(index, other)
    entries, _ = list_entries(folder, privacy=KEEP_PATHS)
    with pytest.raises(SearchIndexError, match="--rebuild"):
        build_index(tmp_path / "index", entries, PlantedEncoder(), other, progress=False)
    report = build_index(tmp_path / "index", entries, PlantedEncoder(), other, rebuild=True, progress=False)
    assert report.embedded_images == 5 and open_index(tmp_path / "index").model == other


def test_unreadable_images_are_skipped_and_named(folder, tmp_path):
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "broken.png.txt").write_text("broken")
    report = build(folder, tmp_path / "index")
    assert report.n_rows == 5 and "broken.png" in report.skipped
    assert "broken.png" not in set(open_index(tmp_path / "index").meta["id"])


def test_nothing_embeddable_is_a_clear_error(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"not a png")
    (folder / "a.png.txt").write_text("broken")
    with pytest.raises(SearchIndexError, match="no image of the 1 listed could be embedded"):
        build(folder, tmp_path / "index")
    assert not (tmp_path / "index" / "manifest.json").exists()


def test_not_an_index_is_a_clear_error(tmp_path):
    with pytest.raises(SearchIndexError, match="not a search index.*index build"):
        open_index(tmp_path)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_faiss_index_kinds_find_planted_neighbours(kind):
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((2000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = make_faiss_index(vectors, kind, IndexSettings(nlist=16, nprobe=16))
    _, ids = index.search(vectors[:50], 1)
    assert (ids[:, 0] == np.arange(50)).mean() >= 0.95


def test_auto_index_type_switches_at_the_threshold():
    settings = IndexSettings(exact_max=1000)
    assert settings.resolved_type(1000) == "flat" and settings.resolved_type(1001) == "hnsw"
    assert IndexSettings(index_type="ivf").resolved_type(10) == "ivf"
    assert IndexSettings().resolved_nlist(1_000_000) == 4096
    with pytest.raises(ValueError, match="index type"):
        IndexSettings(index_type="lsh")  # type: ignore[arg-type]



def test_listing_dicom_without_pseudonyms_is_refused_so_no_path_is_stored(tmp_path):
    import shutil

    from pydicom.data import get_testdata_file

    from fuselip_med.data.phi import Pseudonyms, new_salt
    from fuselip_med.errors import UsageError

    folder = tmp_path / "DOE^JOHN_1950"  # PACS exports name folders after patients
    folder.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "img.dcm")
    with pytest.raises(UsageError, match="pseudonyms"):
        list_entries(folder)
    entries, _ = list_entries(folder, pseudonyms=Pseudonyms(new_salt()))
    assert [e.dicom for e in entries] == [True] and "DOE" not in entries[0].id and "img" not in entries[0].id
