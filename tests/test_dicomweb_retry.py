"""The retry policy of DicomwebServer.call: 5xx and timeouts are retried with exponential backoff a bounded number
of times, then one error naming the server and what was fetched; 4xx other than 401/403 are not retried."""
from __future__ import annotations

import pytest
import requests

from fuselip_med.data.adapters import dicomweb
from fuselip_med.data.adapters.dicomweb import DicomwebError, DicomwebServer, RetryPolicy

URL = "https://pacs.example.org/dicom-web"


def http_error(status: int) -> requests.HTTPError:
    response = requests.Response()
    response.status_code = status
    return requests.HTTPError(response=response)


@pytest.fixture
def slept(monkeypatch):
    delays = []
    monkeypatch.setattr(dicomweb.time, "sleep", delays.append)
    return delays


def failing(*errors):
    calls = []

    def request(client):
        calls.append(client)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return "answer"

    return request, calls


def test_5xx_and_timeouts_are_retried_with_backoff(slept):
    server = DicomwebServer(URL, retry=RetryPolicy(attempts=4, backoff_s=0.5))
    request, calls = failing(http_error(503), requests.Timeout(), http_error(500))
    assert server.call("retrieving instance 1 of 1 with WADO-RS", request) == "answer"
    assert len(calls) == 4 and slept == [0.5, 1.0, 2.0]


def test_bounded_tries_end_in_one_line_naming_server_and_fetch(slept):
    server = DicomwebServer(URL, retry=RetryPolicy(attempts=3, backoff_s=0.1))
    request, calls = failing(*[http_error(502)] * 5)
    with pytest.raises(DicomwebError) as error:
        server.call("retrieving instance 7 of 9 with WADO-RS", request)
    message = str(error.value)
    assert len(calls) == 3 and slept == [0.1, 0.2] and "\n" not in message
    assert message.startswith(URL) and "HTTP 502" in message and "instance 7 of 9" in message


def test_client_errors_are_not_retried(slept):
    server = DicomwebServer(URL)
    request, calls = failing(http_error(404))
    with pytest.raises(DicomwebError, match="HTTP 404"):
        server.call("searching series (all) with QIDO-RS", request)
    assert len(calls) == 1 and slept == []
