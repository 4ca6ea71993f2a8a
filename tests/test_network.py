"""Networks that never answer: a Hub endpoint that accepts the connection and never replies ends `push` and a
model download in one `error:` line naming the endpoint, after the timeout and the bounded retries."""
from __future__ import annotations

import socket
import threading
import time

import huggingface_hub
import pytest
import torch
from huggingface_hub.utils import _http
from safetensors.torch import save_file
from typer.testing import CliRunner

from fuselip_med.cli import app
from fuselip_med.core import network


@pytest.fixture
def silent_endpoint(monkeypatch):
    """http://127.0.0.1:<port>: accepts every connection and never sends a byte."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []

    def accept():
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}"
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", url)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv(network.TIMEOUT_ENV, "0.5")
    monkeypatch.setenv(network.RETRIES_ENV, "1")
    yield url
    server.close()
    for connection in held:
        connection.close()
    network._installed = None
    huggingface_hub.set_client_factory(_http.default_client_factory)


def one_error_line(args: list[str]) -> tuple[str, float]:
    start = time.perf_counter()
    result = CliRunner().invoke(app, args)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0], time.perf_counter() - start


def test_push_to_a_silent_endpoint_ends_in_one_line_naming_it(silent_endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    save_file({"w": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    line, seconds = one_error_line(["push", str(tmp_path), "--repo-id", "me/fuselip-test"])
    assert f"{silent_endpoint}/api/repos/create did not answer" in line and "2 tries" in line
    assert seconds < 60


def test_a_download_from_a_silent_endpoint_ends_in_one_line_naming_it(silent_endpoint):
    line, seconds = one_error_line(["info", "me/fuselip-not-cached"])
    assert f"{silent_endpoint}/api/models/me/fuselip-not-cached" in line and "did not answer" in line
    assert seconds < 60


def test_bad_network_settings_are_one_line(monkeypatch):
    monkeypatch.setenv(network.TIMEOUT_ENV, "soon")
    with pytest.raises(network.UserError, match=network.TIMEOUT_ENV):
        network.network_settings()


@pytest.mark.timeout(120)
def test_a_dataset_from_a_silent_endpoint_ends_in_one_line_naming_it(silent_endpoint, tmp_path, monkeypatch):
    """``datasets`` downloads through huggingface_hub's client: without the timeout this hung for good, with the
    timeout alone it took 396 s (``datasets`` retries each file with its own backoff)."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", silent_endpoint)
    monkeypatch.setattr(datasets.config, "HUB_DATASETS_URL",
                        silent_endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}")
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        silent_endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    from fuselip_med.data.adapters import get_adapter

    start = time.perf_counter()
    with pytest.raises(network.NetworkError) as error:
        get_adapter("rocov2")("eltorio/ROCOv2-radiology", split="train", cache_dir=str(tmp_path / "cache"))
    assert silent_endpoint in str(error.value)
    assert "did not answer while loading ROCOv2 eltorio/ROCOv2-radiology" in str(error.value)
    assert time.perf_counter() - start < 60
