"""A real Orthanc server for the DICOMweb tests: started on a free loopback port with a temporary storage folder
and a generated configuration (DICOMweb plugin from the Debian package's plugin folder, HTTP basic authentication
with a test user, remote access off, DICOM port off), filled through its REST API (``POST /instances``) and
stopped by its process id.

Use the ``orthanc`` fixture (one server per test) or ``start_orthanc`` for a server a test stops and restarts.
Without ``Orthanc`` on the machine the tests skip, except in CI (``CI=true``), where they fail.
Configuration keys: Orthanc Book, "Configuration of Orthanc" and "DICOMweb plugin" (``DicomWeb.Enable/Root``).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

ORTHANC = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if os.path.exists("/usr/sbin/Orthanc") else None)
PLUGIN_FOLDERS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc")
USER = "radiologist"
PASSWORD = "orthanc-test-Pa55word-7Qx"  # a canary: the tests grep every output for it


def dicomweb_plugin() -> str | None:
    """Path of the DICOMweb plugin (Debian ``orthanc-dicomweb``), or None when it is not installed."""
    for folder in PLUGIN_FOLDERS:
        for candidate in sorted(Path(folder).glob("libOrthancDicomWeb.so*")) if os.path.isdir(folder) else []:
            return str(candidate)
    return None


def require_orthanc() -> tuple[str, str]:
    """(Orthanc binary, plugin path); skips the test when they are missing, fails in CI (``CI=true``)."""
    plugin = dicomweb_plugin()
    if ORTHANC and plugin:
        return ORTHANC, plugin
    message = "Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class OrthancServer:
    """A running (or stopped) Orthanc: ``url`` of its REST API, ``dicomweb`` root, the test user's credentials."""

    folder: Path
    port: int
    user: str = USER
    password: str = PASSWORD
    base: dict = field(default_factory=dict)
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def log_path(self) -> Path:
        return self.folder / "orthanc.log"

    def config(self, plugin: str) -> dict:
        """``base`` (e.g. the README's example configuration) with this server's port, storage and user, the
        plugin from ``base`` or else the one found."""
        storage = str(self.folder / "storage")
        return {
            **self.base, "Name": self.base.get("Name", "fuselip-med-test"),
            "StorageDirectory": storage, "IndexDirectory": storage,
            "HttpPort": self.port, "DicomServerEnabled": False, "DicomPort": free_port(),
            "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
            "RegisteredUsers": {self.user: self.password},
            "Plugins": self.base.get("Plugins", [plugin]), "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }

    def start(self, timeout: float = 30.0) -> OrthancServer:
        """Start Orthanc (again, on the same port and storage) and wait until its REST API answers."""
        binary, plugin = require_orthanc()
        self.folder.mkdir(parents=True, exist_ok=True)
        config = self.folder / "orthanc.json"
        config.write_text(json.dumps(self.config(plugin), indent=1))
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([binary, str(config)], stdout=log, stderr=subprocess.STDOUT,
                                            cwd=self.folder)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = self.log_path.read_text()[-2000:]
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}: {log}")
            try:
                if self.session().get(f"{self.url}/system", timeout=1).ok:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {timeout} s: {self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        """Stop the server by its process id (SIGTERM, then SIGKILL after 10 s)."""
        if self.process is None or self.process.poll() is not None:
            return
        os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def session(self) -> requests.Session:
        session = requests.Session()
        session.auth = (self.user, self.password)
        return session

    def upload(self, paths) -> list[str]:
        """Store DICOM files through the REST API (``POST /instances``); returns Orthanc's instance ids."""
        ids = []
        with self.session() as session:
            for path in paths:
                answer = session.post(f"{self.url}/instances", data=Path(path).read_bytes(), timeout=30)
                answer.raise_for_status()
                ids.append(answer.json()["ID"])
        return ids

    def delete_series(self, series_uid: str) -> None:
        """Delete one series (``POST /tools/lookup`` for its Orthanc id, then ``DELETE /series/{id}``)."""
        with self.session() as session:
            found = session.post(f"{self.url}/tools/lookup", data=series_uid, timeout=30).json()
            (series,) = [item["ID"] for item in found if item["Type"] == "Series"]
            session.delete(f"{self.url}/series/{series}", timeout=30).raise_for_status()

    def instance_count(self) -> int:
        with self.session() as session:
            return len(session.get(f"{self.url}/instances", timeout=30).json())


def start_orthanc(folder: Path, base: dict | None = None) -> OrthancServer:
    """A started Orthanc on a free loopback port storing into ``folder`` (``base``: configuration keys to start
    from); the caller stops it."""
    return OrthancServer(Path(folder), free_port(), base=dict(base or {})).start()


@pytest.fixture
def orthanc(tmp_path_factory):
    """One running Orthanc per test, stopped (by pid) at its end."""
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        yield server
    finally:
        server.stop()
