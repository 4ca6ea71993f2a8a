"""The Orthanc fixture itself: a real server with authentication on, DICOMweb answering, stopped by pid."""
from __future__ import annotations

import json
from pathlib import Path

import requests

from tests.dicom_series import write_series
from tests.orthanc import start_orthanc


def test_orthanc_starts_authenticates_stores_and_stops(tmp_path):
    server = start_orthanc(tmp_path / "orthanc")
    try:
        assert requests.get(f"{server.dicomweb}/studies", timeout=10).status_code == 401  # authentication is on
        config = (server.folder / "orthanc.json").read_text()
        assert '"RemoteAccessAllowed": false' in config and '"DicomServerEnabled": false' in config
        server.upload(write_series(tmp_path / "ct", "CT", 2))
        answer = server.session().get(f"{server.dicomweb}/series", params={"Modality": "CT"}, timeout=10)
        assert answer.ok and len(answer.json()) == 1 and server.instance_count() == 2
    finally:
        server.stop()
    assert server.process.returncode is not None
    try:
        requests.get(f"{server.url}/system", timeout=2)
        raise AssertionError("Orthanc still answers after stop()")
    except requests.ConnectionError:
        pass


def test_the_readme_example_configuration_serves_dicomweb(tmp_path):
    """docs/pacs/orthanc.json (the README's quick start) starts Orthanc with DICOMweb on, auth on, loopback only."""
    shipped = json.loads((Path(__file__).parent.parent / "docs" / "pacs" / "orthanc.json").read_text())
    assert shipped["DicomWeb"] == {"Enable": True, "Root": "/dicom-web/"} and shipped["AuthenticationEnabled"]
    assert shipped["RemoteAccessAllowed"] is False and Path(shipped["Plugins"][0]).is_dir()
    server = start_orthanc(tmp_path / "orthanc", base=shipped)
    try:
        assert server.session().get(f"{server.dicomweb}/studies", timeout=10).json() == []
        assert (server.folder / "orthanc.json").read_text().count("fuselip-med-pacs") == 1
    finally:
        server.stop()
