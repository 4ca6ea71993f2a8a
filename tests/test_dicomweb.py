"""`index build --dicomweb` against a real Orthanc (tests/orthanc.py): equal to the folder build, incremental by
SOP Instance UID, resumable after a kill or a server stop, one-line errors, no credential in any output."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from fuselip_med.cli import app
from fuselip_med.data.adapters.dicomweb import PASSWORD_ENV, TOKEN_ENV
from fuselip_med.search.index import open_index
from fuselip_med.search.pacs import hit_uids
from tests.dicom_series import write_series
from tests.orthanc import start_orthanc
from tests.test_search_cli import tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
runner = CliRunner()
# pydicom's own CT and MR slices and two pydicom-data files (a JPEG 2000 lossless MR, an RGB secondary capture).
PYDICOM_FILES = ("CT_small.dcm", "MR_small.dcm", "emri_small_jpeg_2k_lossless.dcm", "SC_rgb.dcm")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("dicomweb_model") / "model", 0)


def export_folder(root: Path) -> Path:
    """Two studies written by the test (a 3-slice CT series, a 2-slice MR series) plus the pydicom-data files."""
    folder = root / "export"
    write_series(folder / "study1", "CT", 3, seed=1, description="CT CHEST")
    write_series(folder / "study2", "MR", 2, seed=2, study_date="20230610", description="MR BRAIN")
    for name in PYDICOM_FILES:
        shutil.copy(get_testdata_file(name), folder / name)
    return folder


@pytest.fixture
def pacs(tmp_path, monkeypatch, orthanc):
    """A running Orthanc holding the export folder; the password in the environment."""
    folder = export_folder(tmp_path)
    orthanc.upload(sorted(folder.rglob("*.dcm")))
    monkeypatch.setenv(PASSWORD_ENV, orthanc.password)
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    return orthanc, folder


@pytest.fixture(scope="module")
def shared(tmp_path_factory, model):
    """One Orthanc for the tests that only read from it, with the index built from it and the folder index
    (``root / "pacs_index"``, ``root / "folder_index"``); returns (server, folder, root, first build's output)."""
    root = tmp_path_factory.mktemp("dicomweb_shared")
    server = start_orthanc(root / "orthanc")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(PASSWORD_ENV, server.password)
        patch.delenv(TOKEN_ENV, raising=False)
        try:
            folder = export_folder(root)
            server.upload(sorted(folder.rglob("*.dcm")))
            from_pacs = dicomweb_build(model, server, root / "pacs_index")
            assert from_pacs.exit_code == 0, from_pacs.output
            # --keep-paths: the comparison reads each row's UIDs from its file (no DICOM path is stored without it)
            from_folder = build(model, root / "folder_index", "--input", str(folder), "--keep-paths")
            assert from_folder.exit_code == 0, from_folder.output
            yield server, folder, root, from_pacs.output
        finally:
            server.stop()


def build(model, out: Path, *args: str):
    return runner.invoke(app, ["index", "build", "--model", str(model), "--out", str(out), "--device", "cpu", *args])


def dicomweb_build(model, server, out: Path, *args: str):
    return build(model, out, "--dicomweb", server.dicomweb, "--user", server.user, *args)


def vectors_by_instance(index_dir: Path) -> dict[str, np.ndarray]:
    """{SOP Instance UID: [D] float32 image vector} of an index, the UIDs read from the indexed files."""
    index = open_index(index_dir)
    return {hit_uids(path).instance: np.asarray(index.image_vectors[row], dtype=np.float32)
            for row, path in enumerate(index.meta["path"])}


def series_of(index_dir: Path) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for path in open_index(index_dir).meta["path"]:
        uids = hit_uids(path)
        out.setdefault(uids.series, set()).add(uids.instance)
    return out


def test_dicomweb_build_equals_the_folder_build(shared):
    server, folder, tmp_path, output = shared
    assert "9 instances; fetched 9, dropped 0" in output
    assert series_of(tmp_path / "pacs_index") == series_of(tmp_path / "folder_index")
    pacs_vectors, folder_vectors = vectors_by_instance(tmp_path / "pacs_index"), vectors_by_instance(
        tmp_path / "folder_index")
    assert sorted(pacs_vectors) == sorted(folder_vectors) and len(pacs_vectors) == 9
    for uid, vector in pacs_vectors.items():
        np.testing.assert_allclose(vector, folder_vectors[uid], atol=1e-6)
    index = open_index(tmp_path / "pacs_index")
    assert set(index.meta["source"]) == {"dicomweb"}
    real_uids = set(pacs_vectors)
    for path in (tmp_path / "pacs_index").rglob("*"):  # ids and state hold salted keys, never a real UID
        if path.is_file() and path.suffix != ".dcm":
            assert not any(uid.encode() in path.read_bytes() for uid in real_uids), path


def series_vectors(index_dir: Path, series_uids) -> dict[str, np.ndarray]:
    """{SeriesInstanceUID: [D] float32 series vector} of a series index (keys = the index's salted series keys)."""
    from fuselip_med.data.phi import Pseudonyms

    index = open_index(index_dir)
    keys = Pseudonyms(index.manifest["salt"])
    row_of = {str(i): r for r, i in enumerate(index.meta["id"])}
    return {uid: np.asarray(index.image_vectors[row_of[keys.key(uid, "se-")]], dtype=np.float32)
            for uid in series_uids if keys.key(uid, "se-") in row_of}


def test_series_index_from_dicomweb_equals_the_folder_series_index(shared, model, tmp_path):
    from pydicom import dcmread

    server, folder = shared[:2]
    from_pacs = dicomweb_build(model, server, tmp_path / "pacs", "--unit", "series", "--slices", "2")
    assert from_pacs.exit_code == 0, from_pacs.output
    from_folder = build(model, tmp_path / "folder", "--input", str(folder), "--unit", "series", "--slices", "2")
    assert from_folder.exit_code == 0, from_folder.output
    uids = {dcmread(p).SeriesInstanceUID for p in folder.rglob("*.dcm")}
    pacs_vectors, folder_vectors = series_vectors(tmp_path / "pacs", uids), series_vectors(tmp_path / "folder", uids)
    assert sorted(pacs_vectors) == sorted(folder_vectors) and len(pacs_vectors) >= 2  # the CT and the MR series
    assert len(open_index(tmp_path / "pacs")) == len(open_index(tmp_path / "folder"))
    for uid, vector in pacs_vectors.items():
        np.testing.assert_allclose(vector, folder_vectors[uid], atol=1e-6)


def test_filters_pick_the_series(shared, model, tmp_path):
    server = shared[0]
    result = dicomweb_build(model, server, tmp_path / "mr", "--modality", "MR", "--study-date", "20230101-20231231")
    assert result.exit_code == 0, result.output
    assert "1 series, 2 instances" in result.output
    described = dicomweb_build(model, server, tmp_path / "chest", "--study-description", "chest", "--limit", "1")
    assert described.exit_code == 0 and "1 series, 3 instances" in described.output, described.output


def test_rebuild_fetches_only_new_series_and_drops_deleted_ones(pacs, model, tmp_path):
    server, _ = pacs
    out = tmp_path / "index"
    assert dicomweb_build(model, server, out).exit_code == 0
    added = write_series(tmp_path / "new", "CT", 2, seed=7)
    server.upload(added)
    again = dicomweb_build(model, server, out)
    assert again.exit_code == 0, again.output
    assert "fetched 2, dropped 0" in again.output and "embedded 2 images" in again.output
    assert len(open_index(out)) == 11
    from pydicom import dcmread

    server.delete_series(dcmread(added[0]).SeriesInstanceUID)
    dropped = dicomweb_build(model, server, out)
    assert dropped.exit_code == 0 and "fetched 0, dropped 2" in dropped.output, dropped.output
    assert len(open_index(out)) == 9 and len(list((out / ".dicomweb" / "objects").rglob("*.dcm"))) == 9


def cli_command(model, server, out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "fuselip_med.cli", "index", "build", "--model", str(model), "--out", str(out),
            "--device", "cpu", "--dicomweb", server.dicomweb, "--user", server.user, *args]


@pytest.mark.slow
def test_a_killed_build_resumes_to_the_same_index(pacs, model, tmp_path):
    server, _ = pacs
    server.upload(write_series(tmp_path / "many", "CT", 24, seed=3, size=64))
    out = tmp_path / "killed"
    process = subprocess.Popen(cli_command(model, server, out, "--max-concurrent", "1", "--chunk-size", "2"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    objects = out / ".dicomweb" / "objects"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(objects.rglob("*.dcm"))) < 5 and process.poll() is None:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "manifest.json").exists(), "the build ended before it could be killed"
    recorded = len(json.loads((out / ".dicomweb" / "state.json").read_text())["instances"])
    resumed = dicomweb_build(model, server, out)
    assert resumed.exit_code == 0, resumed.output
    assert 0 < recorded < 33 and f"fetched {33 - recorded}, dropped 0" in resumed.output, resumed.output
    whole = dicomweb_build(model, server, tmp_path / "whole")
    assert whole.exit_code == 0
    resumed_vectors, whole_vectors = vectors_by_instance(out), vectors_by_instance(tmp_path / "whole")
    assert sorted(resumed_vectors) == sorted(whole_vectors)
    for uid, vector in resumed_vectors.items():
        np.testing.assert_array_equal(vector, whole_vectors[uid])


def test_server_stopped_midway_is_one_line_and_a_rerun_completes(pacs, model, tmp_path, monkeypatch):
    server, _ = pacs
    import fuselip_med.data.adapters.dicomweb as dicomweb

    real, calls = dicomweb._dataset_bytes, []

    def stop_after_two(dataset):  # the server goes away after the second instance arrived
        calls.append(1)
        if len(calls) == 2:
            server.stop()
        return real(dataset)

    monkeypatch.setattr(dicomweb, "_dataset_bytes", stop_after_two)
    out = tmp_path / "index"
    failed = dicomweb_build(model, server, out, "--max-concurrent", "1", "--retries", "2")
    assert failed.exit_code == 1
    lines = failed.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and server.dicomweb in lines[0], failed.output
    assert "WADO-RS" in lines[0] and not (out / "manifest.json").exists()
    monkeypatch.setattr(dicomweb, "_dataset_bytes", real)
    server.start()
    rerun = dicomweb_build(model, server, out)
    assert rerun.exit_code == 0 and "fetched 7, dropped 0" in rerun.output, rerun.output
    assert len(open_index(out)) == 9


def test_wrong_password_is_one_line_without_retries_and_no_output_holds_a_password(shared, model, tmp_path,
                                                                                  monkeypatch, caplog):
    server = shared[0]
    import requests

    wrong = "Wr0ng-pa55word-canary-91"
    sent = []
    real_send = requests.Session.send
    monkeypatch.setattr(requests.Session, "send", lambda self, request, **kw: sent.append(1) or real_send(
        self, request, **kw))
    monkeypatch.setenv(PASSWORD_ENV, wrong)
    out = tmp_path / "index"
    refused = runner.invoke(app, ["-v", "index", "build", "--model", str(model), "--out", str(out), "--device",
                                  "cpu", "--dicomweb", server.dicomweb, "--user", server.user])
    assert refused.exit_code == 1 and len(sent) == 1, (refused.output, len(sent))  # one request, no retry storm
    lines = refused.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and server.dicomweb in lines[0]
    assert "401" in lines[0]
    monkeypatch.setenv(PASSWORD_ENV, server.password)
    caplog.set_level(logging.DEBUG)  # every library's debug records (requests/urllib3, dicomweb_client, ours)
    done = runner.invoke(app, ["-v", "index", "build", "--model", str(model), "--out", str(out), "--device", "cpu",
                               "--dicomweb", server.dicomweb, "--user", server.user])
    assert done.exit_code == 0, done.output
    search = runner.invoke(app, ["search", "--index", str(out), "--text", "ct", "--json"])
    assert search.exit_code == 0 and "GET /dicom-web/" in caplog.text  # the debug records were captured
    outputs = [refused.output.encode(), done.output.encode(), search.output.encode(), caplog.text.encode()]
    outputs += [p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()]  # index, cache, state
    for secret in (wrong, server.password):
        assert not any(secret.encode() in blob for blob in outputs), secret
    assert json.loads(search.output)  # the index answers after all that


def test_embed_from_dicomweb_equals_embed_from_the_folder(shared, model, tmp_path):
    server, folder = shared[:2]
    from_pacs = runner.invoke(app, ["embed", "-m", str(model), "--dicomweb", server.dicomweb, "--user", server.user,
                                    "--modality", "CT", "-o", str(tmp_path / "pacs.npy"), "--device", "cpu"])
    assert from_pacs.exit_code == 0, from_pacs.output
    from_folder = runner.invoke(app, ["embed", "-m", str(model), "-i", str(folder), "-o", str(tmp_path / "dir.npy"),
                                      "--device", "cpu"])
    assert from_folder.exit_code == 0, from_folder.output
    cache = tmp_path / "pacs.dicomweb"
    from fuselip_med.data.adapters.dicomweb import cached_instances

    path_of = {i.key: i.path for i in cached_instances(cache)}
    pacs_ids = json.loads((tmp_path / "pacs.ids.json").read_text())["ids"]
    folder_ids = json.loads((tmp_path / "dir.ids.json").read_text())["ids"]
    pacs_vectors = dict(zip((hit_uids(path_of[i]).instance for i in pacs_ids), np.load(tmp_path / "pacs.npy")))
    from fuselip_med.data.phi import Pseudonyms, instance_key

    keys = Pseudonyms(json.loads((tmp_path / "dir.ids.json").read_text())["salt"])  # folder DICOM rows: keys
    file_of = {instance_key(keys, path): path for path in folder.rglob("*") if path.is_file()}
    folder_vectors = dict(zip((hit_uids(file_of[i]).instance for i in folder_ids), np.load(tmp_path / "dir.npy")))
    assert len(pacs_vectors) == 4  # the CT series (3) and CT_small
    for uid, vector in pacs_vectors.items():
        np.testing.assert_allclose(vector, folder_vectors[uid], atol=1e-6)


def test_kos_of_the_hits_is_stored_and_found_again_by_qido(shared, tmp_path):
    server, folder, root, _ = shared
    query = folder / "study1" / "IM0001.dcm"
    result = runner.invoke(app, ["search", "--index", str(root / "pacs_index"), "--image", str(query), "--text",
                                 "similar chest CT", "-k", "4", "--json", "--export-kos", str(tmp_path / "kos.dcm"),
                                 "--stow", server.dicomweb, "--user", server.user])
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)
    hit_instances = {hit_uids(hit["path"]).instance for hit in hits}
    assert len(hit_instances) == 4 and "stored on" in result.stderr

    from dicomweb_client import DICOMwebClient

    client = DICOMwebClient(server.dicomweb, session=server.session())
    found = client.search_for_series(search_filters={"Modality": "KO"})
    assert len(found) == 1
    study, series = found[0]["0020000D"]["Value"][0], found[0]["0020000E"]["Value"][0]
    (kos,) = client.retrieve_series(study, series)
    server.delete_series(series)  # the shared server holds the test's images only again
    from pydicom import dcmread

    assert study == dcmread(query).StudyInstanceUID  # filed in the query's study
    referenced = {item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for item in kos.ContentSequence
                  if "ReferencedSOPSequence" in item}
    evidence = {sop.ReferencedSOPInstanceUID for study_item in kos.CurrentRequestedProcedureEvidenceSequence
                for series_item in study_item.ReferencedSeriesSequence for sop in series_item.ReferencedSOPSequence}
    assert referenced == evidence == hit_instances
    assert kos.SeriesDescription == "Similar cases" and kos.ConceptNameCodeSequence[0].CodeMeaning == "Of Interest"
    assert kos.ContentSequence[0].TextValue == "Similar cases: query image + similar chest CT"  # no file name
    assert dcmread(tmp_path / "kos.dcm").SOPInstanceUID == kos.SOPInstanceUID


def test_page_links_dicomweb_hits_to_the_viewer_and_never_shows_a_path(shared):
    _, folder, tmp_path, _ = shared
    from fuselip_med.search.app import results_table
    from fuselip_med.search.pacs import ViewerUrlError, check_viewer_url
    from fuselip_med.search.query import load_index_model, search
    template = check_viewer_url("https://pacs.example.org/viewer?StudyInstanceUIDs={study}&series={series}")
    with pytest.raises(ViewerUrlError):
        check_viewer_url("https://pacs.example.org/viewer?patient={patient}")
    fuselip, _ = load_index_model(open_index(tmp_path / "pacs_index"))  # both indexes were built with it
    for name, linked in (("pacs_index", True), ("folder_index", False)):
        index = open_index(tmp_path / name)
        hits = search(index, fuselip, image=folder / "study1" / "IM0000.dcm", k=3)
        table = results_table(hits, "image", tmp_path / name, template)
        for hit in hits:
            assert hit.path not in table and (not linked or os.path.basename(hit.path) not in table)
            uids = hit_uids(hit.path)
            link = f"https://pacs.example.org/viewer?StudyInstanceUIDs={uids.study}&series={uids.series}"
            assert (link in table) == linked
        assert table.count("[open](") == (3 if linked else 0)



@pytest.mark.slow  # two processes under accelerate launch: seconds of start-up each
def test_two_processes_build_the_single_process_index_from_the_server(shared, model, tmp_path):
    """``accelerate launch --num_processes 2 ... index build --dicomweb``: the main process syncs the cache, the
    other waits and reads it, both embed their share; the index holds the vectors of the one-process build."""
    server, _, root, _ = shared
    repo = Path(__file__).parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo), PASSWORD_ENV: server.password}
    completed = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
         "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "fuselip_med.cli", "index", "build", "-m",
         str(model), "--dicomweb", server.dicomweb, "--user", server.user, "-o", str(tmp_path / "two"),
         "--chunk-size", "3"],
        cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    message = " ".join(completed.stdout.split())
    import re

    here, elsewhere = map(int, re.search(r"embedded (\d+) images \(\+(\d+) by other processes", message).groups())
    assert "9 instances; fetched 9" in message and here + elsewhere == 9 and here and elsewhere  # shared work
    assert server.password not in completed.stdout + completed.stderr
    two, one = vectors_by_instance(tmp_path / "two"), vectors_by_instance(root / "pacs_index")
    assert sorted(two) == sorted(one) and len(two) == 9
    for uid, vector in two.items():
        np.testing.assert_allclose(vector, one[uid], atol=1e-6)


def test_an_undecodable_instance_is_a_named_skip(pacs, model, tmp_path):
    server, _ = pacs
    from pydicom import dcmread

    (broken,) = write_series(tmp_path / "broken", "CT", 1, seed=9)
    ds = dcmread(broken)
    ds.PixelData = ds.PixelData[:100]  # a valid file whose pixel data is too short for its Rows x Columns
    ds.save_as(broken, enforce_file_format=True)
    server.upload([broken])
    result = dicomweb_build(model, server, tmp_path / "index")
    assert result.exit_code == 0, result.output
    index = open_index(tmp_path / "index")
    output = " ".join(result.output.split())
    assert len(index) == 9 and "skipped 1 of 10 images" in output
    (skipped_id,) = index.manifest["skipped"]
    listed = (tmp_path / "index" / "skipped.csv").read_text()
    assert skipped_id in output and skipped_id in listed
    assert ds.SOPInstanceUID not in result.output and ds.SOPInstanceUID not in listed


def test_the_adapter_serves_recipes(shared, tmp_path):
    server = shared[0]
    from fuselip_med.data.adapters import get_adapter

    source = get_adapter("dicomweb")(server.dicomweb, limit=None, cache=str(tmp_path / "cache"), user=server.user,
                                     modality="CT", progress=False)
    assert len(source) == 4 and len(source.groups()) == 2  # the CT series (3 slices, one group) and CT_small
    assert all(Path(source[i].query.image).is_file() for i in range(len(source)))
    with pytest.raises(TypeError, match="unknown option"):
        get_adapter("dicomweb")(server.dicomweb, cache=str(tmp_path / "c2"), password="never")
