"""DICOMweb credentials and TLS settings: where the password may come from (environment, netrc, never the URL or
the command line), bearer tokens, TLS verification switches; against the test Orthanc where a server is needed."""
from __future__ import annotations

import logging

import pytest
import requests

from fuselip_med.data.adapters.dicomweb import (
    PASSWORD_ENV,
    TOKEN_ENV,
    DicomwebAuthError,
    DicomwebError,
    DicomwebQuery,
    DicomwebServer,
    sync_instances,
)
from tests.dicom_series import write_series


@pytest.fixture(autouse=True)
def _no_credentials(monkeypatch, tmp_path):
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no netrc unless a test writes one
    (tmp_path / "home").mkdir()


def test_a_password_in_the_url_is_refused_without_echoing_it():
    with pytest.raises(DicomwebError) as error:
        DicomwebServer("https://alice:Secret-In-Url@pacs.example.org/dicom-web")
    assert "Secret-In-Url" not in str(error.value) and "FUSELIP_MED_DICOMWEB_PASSWORD" in str(error.value)



@pytest.mark.parametrize("url", ["http://alice:Secret-In-Url@pacs:99999/dicom-web", "http://pacs:abc/dicom-web",
                                 "http://[::1/dicom-web", "https://alice:Secret-In-Url@pacs:0x50/dicom-web"])
def test_a_url_urllib_cannot_parse_is_one_error_line_without_the_password(url, tmp_path):
    from typer.testing import CliRunner

    from fuselip_med.cli import app

    with pytest.raises(DicomwebError, match="give an http\\(s\\) URL") as error:
        DicomwebServer(url)
    assert "Secret-In-Url" not in str(error.value)
    result = CliRunner().invoke(app, ["index", "build", "--dicomweb", url, "-m", "none", "-o", str(tmp_path / "idx")])
    assert result.exit_code == 1 and result.output.startswith("error: ") and "Traceback" not in result.output
    assert "Secret-In-Url" not in result.output

def test_a_user_without_a_password_is_a_clear_error():
    with pytest.raises(DicomwebError, match="has no password"):
        DicomwebServer("https://alice@pacs.example.org/dicom-web")


def test_tls_is_verified_unless_turned_off_with_a_warning(tmp_path, caplog):
    assert DicomwebServer("https://pacs.example.org/dicom-web").client()._session.verify is True
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    assert DicomwebServer("https://pacs.example.org/dicom-web", ca_bundle=bundle).client()._session.verify == str(
        bundle)
    with pytest.raises(DicomwebError, match="--ca-bundle"):
        DicomwebServer("https://pacs.example.org/dicom-web", ca_bundle=tmp_path / "missing.pem")
    with caplog.at_level(logging.WARNING):
        insecure = DicomwebServer("https://pacs.example.org/dicom-web", insecure=True)
    assert insecure.client()._session.verify is False and "verification is off" in caplog.text


def test_netrc_supplies_user_and_password(orthanc, tmp_path, monkeypatch):
    orthanc.upload(write_series(tmp_path / "ct", "CT", 2))
    netrc = tmp_path / "home" / ".netrc"
    netrc.write_text(f"machine 127.0.0.1 login {orthanc.user} password {orthanc.password}\n")
    netrc.chmod(0o600)
    report = sync_instances(DicomwebServer(orthanc.dicomweb), DicomwebQuery(), tmp_path / "cache", progress=False)
    assert report.fetched == 2


def test_a_bearer_token_is_sent_and_a_refusal_is_one_error_without_retry(orthanc, monkeypatch, tmp_path):
    token = "tok-canary-5150"
    monkeypatch.setenv(TOKEN_ENV, token)
    sent = []
    real_send = requests.Session.send
    monkeypatch.setattr(requests.Session, "send", lambda self, request, **kw: sent.append(request) or real_send(
        self, request, **kw))
    with pytest.raises(DicomwebAuthError) as error:  # Orthanc's basic auth does not take tokens: HTTP 401
        sync_instances(DicomwebServer(orthanc.dicomweb), DicomwebQuery(), tmp_path / "cache", progress=False)
    assert len(sent) == 1 and sent[0].headers["Authorization"] == f"Bearer {token}"
    assert token not in str(error.value) and orthanc.dicomweb in str(error.value)
    assert "state.json" not in {p.name for p in (tmp_path / "cache").iterdir()} or token not in (
        tmp_path / "cache" / "state.json").read_text()
