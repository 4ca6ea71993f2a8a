"""No patient identifier leaves the input: canaries planted in the Annex E attributes pydicom can set (names, IDs,
birth date, accession number, institution, physicians, operators, study ID, descriptions, comments), in the
study / series / SOP instance UIDs and in a folder name are found in no byte that `embed`, `index build`
(series, study and the default image unit), `eval`, `search --json` and the search page write or serve."""
from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pydicom
import pytest
import torch
from typer.testing import CliRunner

from fuselip_med.cli import app
from fuselip_med.core.fuselip import FuseLIP, FuseLIPConfig
from fuselip_med.core.pretrained import save_pretrained
from fuselip_med.data.phi import ANNEX_E_TAGS, Pseudonyms, burned_in_risk, is_annex_e
from tests.study_helpers import PATIENT_ATTRIBUTES, ct_series

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]
CANARY = "QZXCANARY"
FOLDER = "Doe_John_QZXFOLDER_1930"


def test_annex_e_table_holds_the_planted_attributes_and_not_the_geometry():
    from pydicom.datadict import tag_for_keyword

    for keyword in (*PATIENT_ATTRIBUTES, "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        assert tag_for_keyword(keyword) in ANNEX_E_TAGS, keyword
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Modality", "ImageType"):
        assert not is_annex_e(tag_for_keyword(keyword)), keyword
    assert is_annex_e(0x00091001)  # private tags are removed by the basic profile
    assert is_annex_e(0x60023000) and not is_annex_e(0x60023001)  # overlay data of any overlay group 60xx
    assert len(ANNEX_E_TAGS) > 600
    assert repr(Pseudonyms("a" * 32)) == "Pseudonyms(salt=<hidden>)"
    ds = pydicom.Dataset()
    ds.Modality = "US"
    assert burned_in_risk(ds)
    ds.BurnedInAnnotation = "NO"
    assert not burned_in_risk(ds)


def _canaries(export: Path) -> set[bytes]:
    found = {CANARY.encode(), b"QZXFOLDER", b"19230101"}
    for path in export.rglob("IM*"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        found |= {str(ds.StudyInstanceUID).encode(), str(ds.SeriesInstanceUID).encode(),
                  str(ds.SOPInstanceUID).encode(), str(ds.FrameOfReferenceUID).encode()}
    return found


def _leaks(root: Path, canaries: set[bytes]) -> list[str]:
    out = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            out += [f"{path.relative_to(root)}: {c!r}" for c in canaries if c in data]
    return out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_canaries_never_leave_the_input(tmp_path):
    export = tmp_path / "pacs" / FOLDER
    ct_series(export / "CT1", n=6, canary=CANARY, study_uid="1.2.826.0.1.3680043.2.1125.777001",
              series_uid="1.2.826.0.1.3680043.2.1125.777001.1")
    ct_series(export / "CT2", n=5, canary=CANARY, study_uid="1.2.826.0.1.3680043.2.1125.777002",
              series_uid="1.2.826.0.1.3680043.2.1125.777002.1", z0=30.0)
    ct_series(export / "ONE", n=1, canary=CANARY)  # a named skip: its key, never its UIDs or folder
    canaries = _canaries(tmp_path / "pacs")
    assert any(CANARY.encode() in p.read_bytes() for p in export.rglob("IM*"))  # the inputs do carry them
    torch.manual_seed(0)
    save_pretrained(FuseLIP(FuseLIPConfig.from_size("tiny")).eval(), tmp_path / "tiny")
    out = tmp_path / "out"
    runner = CliRunner()
    printed = []

    def run(*args):
        result = runner.invoke(app, [*map(str, args)])
        assert result.exit_code == 0, result.output
        printed.append(result.output)
        return result

    run("embed", "-m", tmp_path / "tiny", "-i", tmp_path / "pacs", "--unit", "series", "--slices", "3",
        "-o", out / "embed" / "series.npy", "--device", "cpu")
    run("embed", "-m", tmp_path / "tiny", "-i", tmp_path / "pacs", "--unit", "study", "--slices", "3",
        "-o", out / "embed" / "studies.parquet", "--device", "cpu")
    run("index", "build", "-m", tmp_path / "tiny", "-i", tmp_path / "pacs", "--unit", "series", "--slices", "3",
        "-o", out / "index", "--device", "cpu")
    run("embed", "-m", tmp_path / "tiny", "-i", tmp_path / "pacs", "-o", out / "embed" / "images.parquet",
        "--device", "cpu", "--num-workers", "0")  # --unit image: one row per DICOM file, under its instance key
    run("index", "build", "-m", tmp_path / "tiny", "-i", tmp_path / "pacs", "-o", out / "image_index",
        "--device", "cpu")
    assert len(list((out / "image_index" / "thumbs").glob("im-*.png"))) == 12  # the index's own thumbnails
    keys = json.loads((out / "embed" / "series.ids.json").read_text())["ids"]
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as handle:
        csv.writer(handle).writerows([["series", "Emphysema"], [keys[0], 1], [keys[1], 0]])
    reports = tmp_path / "reports.csv"
    with open(reports, "w", newline="") as handle:
        csv.writer(handle).writerows([["series", "Findings_EN", "Impressions_EN"], [keys[0], "emphysema", "copd"],
                                      [keys[1], "normal lungs", "no acute finding"]])
    evaluated = run("eval", "-m", tmp_path / "tiny", "-t", "series-zero-shot,series-retrieval", "--device", "cpu",
                    "--data", f"volumes={tmp_path / 'pacs'}", "--data", f"series_keys={out / 'embed' / 'series.npy'}",
                    "--data", f"series_labels={labels}", "--data", f"series_reports={reports}", "-o", out / "eval")
    assert json.loads((out / "eval" / "metrics.json").read_text())["tasks"]["series-zero-shot"]["n"] == 2, \
        evaluated.output
    query = next((export / "CT1").iterdir())
    found = run("search", "--index", out / "index", "--image", query, "--json")
    assert json.loads(found.stdout)[0]["best_slice"].startswith("sl-")
    run("search", "--index", out / "index", "--text", "chest CT")
    image_hits = json.loads(run("search", "--index", out / "image_index", "--image", query, "--json").stdout)
    assert image_hits[0]["id"].startswith("im-") and image_hits[0]["path"] is None
    run("search", "--index", out / "image_index", "--text", "chest CT")

    port = _free_port()
    served = out / "served"
    served.mkdir()
    process = subprocess.Popen([sys.executable, "-m", "fuselip_med.cli", "serve", "--index", str(out / "index"),
                                "--port", str(port)], stdout=open(served / "serve.log", "w"), stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 180
        while True:
            try:
                (served / "page.html").write_bytes(urllib.request.urlopen(url, timeout=2).read())
                break
            except OSError:
                assert process.poll() is None and time.time() < deadline, (served / "serve.log").read_text()
                time.sleep(0.5)
        (served / "config.json").write_bytes(urllib.request.urlopen(f"{url}/config", timeout=30).read())
        from gradio_client import Client

        client = Client(url, download_files=str(served / "client_files"), verbose=False)
        answer = client.predict("chest CT", None, "", api_name="/run_query")
        (served / "answer.json").write_text(json.dumps(answer, default=str))
        for item in answer[0]:
            image = item["image"] if isinstance(item, dict) else item[0]
            path = image.get("path") if isinstance(image, dict) else image
            (served / f"thumb_{Path(path).name}").write_bytes(Path(path).read_bytes())  # fetched over HTTP
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert list(served.glob("thumb_*")) and "series" in (served / "answer.json").read_text()
    (out / "printed.txt").write_text("\n".join(printed))
    assert _leaks(out, canaries) == []
