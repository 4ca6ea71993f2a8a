"""`fuselip-med serve` driven in headless Chromium (Debian's ``chromium`` package through Playwright's Python API;
no browser is downloaded): a text query, a DICOM upload whose own image must come first, an instruction fused
with it, "why did it match?" (the occlusion map of a result, found as an image), "more like this", and no file
served by path. Set ``FUSELIP_SEARCH_SCREENSHOT=path.png`` to save a screenshot of the page (the README's is made
this way)."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fuselip_med.cli import app
from fuselip_med.core.fuselip import FuseLIP, FuseLIPConfig
from fuselip_med.core.pretrained import save_pretrained
from fuselip_med.data.demo import write_demo_dataset

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]
DICOM_ID = "ROCOv2_2023_train_000033"  # CT_small.dcm from pydicom's test files, in the demo's train split


def chromium() -> str:
    """Debian's Chromium (``apt-get install chromium``; .ci/run installs it); never a downloaded browser."""
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("Chromium is not installed: apt-get install -y chromium (the browser test never skips)")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import torch

    root = tmp_path_factory.mktemp("serve")
    data = write_demo_dataset(root / "demo", n_train=14, n_valid=1, n_test=1, n_dicom=2)
    torch.manual_seed(0)
    save_pretrained(FuseLIP(FuseLIPConfig.from_size("tiny")).eval(), root / "tiny_model")
    here = os.getcwd()
    os.chdir(root)  # the index records the model as given: a short relative name, resolved from serve's cwd
    try:
        built = CliRunner().invoke(app, ["index", "build", "-m", "tiny_model", "-i", str(data), "--adapter", "rocov2",
                                         "-o", "index", "--device", "cpu"])
    finally:
        os.chdir(here)
    assert built.exit_code == 0, built.output
    port = free_port()
    log = open(root / "serve.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "fuselip_med.cli", "serve", "--index", str(root / "index"),
                                "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, cwd=root,
                               env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300  # Gradio starts slowly on a busy 2-core machine
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                process.kill()
                pytest.fail(f"serve did not come up: {(root / 'serve.log').read_text()[-2000:]}")
            time.sleep(0.5)
    yield url, data / "train_images" / "train" / f"{DICOM_ID}.dcm"
    process.terminate()
    process.wait(timeout=30)
    log.close()


def captions(page) -> list[str]:
    return page.locator("#results .caption-label").all_inner_texts()


def test_search_page_in_headless_chromium(server):
    from playwright.sync_api import expect, sync_playwright

    url, dicom = server
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        page.goto(url)
        expect(page.locator("body")).to_contain_text("15 images")  # 14 train images + CT_small.dcm

        page.locator("#query-text textarea").fill("axial CT of the chest")
        page.locator("#query-text textarea").press("Enter")
        expect(page.locator("#status")).to_contain_text("axial CT of the chest", timeout=60_000)
        expect(page.locator("#results .thumbnail-item")).to_have_count(12)

        page.locator("#query-image input[type=file]").set_input_files(str(dicom))
        expect(page.locator("#status")).to_contain_text("image: 12 results", timeout=60_000)
        first = captions(page)[0]
        assert first.startswith("1 · 1.000 · " + DICOM_ID), first  # the uploaded DICOM is its own best match
        rendered = page.locator("#results img").first
        expect(rendered).to_have_js_property("complete", True)
        assert rendered.evaluate("img => img.naturalWidth") > 0
        expect(page.locator("#query-preview img")).to_have_count(1)

        page.locator("#instruction textarea").fill("the same study, lateral view")
        page.locator("#instruction textarea").press("Enter")
        expect(page.locator("#status")).to_contain_text("image + instruction: 12 results", timeout=60_000)
        if os.environ.get("FUSELIP_SEARCH_SCREENSHOT"):
            expect(page.locator("#results [data-testid=status-tracker]")).to_have_class(re.compile(r"\bhide\b"))
            page.wait_for_function("[...document.querySelectorAll('#results img')].every(img => img.complete)")
            page.wait_for_timeout(1000)  # let the gallery's fade-in finish
            page.screenshot(path=os.environ["FUSELIP_SEARCH_SCREENSHOT"])

        chosen = captions(page)[0].split(" · ")[2].split(" — ")[0]
        page.locator("#results .thumbnail-item").first.click()
        page.locator("#why").click()  # the fused query (DICOM + instruction) vs the selected result, on demand
        expect(page.locator("#why-note")).to_contain_text(f"{chosen} vs the query image + “the same study, lateral "
                                                          "view”", timeout=240_000)
        why_map = page.locator("#why-map img")
        expect(why_map).to_have_count(1)
        expect(why_map).to_have_js_property("complete", True)
        assert why_map.evaluate("img => img.naturalWidth") > 300
        page.locator("#more-like-this").click()
        expect(page.locator("#status")).to_contain_text(f"more like {chosen}: 12 results", timeout=60_000)
        liked = captions(page)
        assert len(liked) == 12 and not any(f" · {chosen}" in c for c in liked)  # the item itself is left out

        for path in (dicom, Path(__file__)):  # indexed files and anything else: never served by path
            response = page.request.get(f"{url}/gradio_api/file={path}")
            assert response.status in (403, 404), (path, response.status)
        browser.close()


def serve_index(root: Path, index: Path):
    """Start `serve` on ``index`` in a subprocess; (url, process, log file)."""
    port = free_port()
    log = open(root / f"serve_{index.name}.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "fuselip_med.cli", "serve", "--index", str(index),
                                "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, cwd=root,
                               env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return url, process, log
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                process.kill()
                pytest.fail(f"serve did not come up: {Path(log.name).read_text()[-2000:]}")
            time.sleep(0.5)


def test_series_page_shows_study_series_and_best_slice(tmp_path):
    """A series index over a two-study export: a slice upload answers with its series first, labelled
    study / series / best slice (that slice), with the index's own thumbnail of that slice."""
    import json

    import pydicom
    import torch
    from playwright.sync_api import expect, sync_playwright

    from fuselip_med.data.phi import Pseudonyms
    from tests.study_helpers import ct_series

    ct_series(tmp_path / "export" / "A", n=5, study_uid="1.7.1", series_uid="1.7.1.1")
    bright = ct_series(tmp_path / "export" / "B", n=5, z0=15.0, study_uid="1.7.2", series_uid="1.7.2.1")
    torch.manual_seed(0)
    save_pretrained(FuseLIP(FuseLIPConfig.from_size("tiny")).eval(), tmp_path / "tiny")
    built = CliRunner().invoke(app, ["index", "build", "-m", str(tmp_path / "tiny"), "-i", str(tmp_path / "export"),
                                     "--unit", "series", "--slices", "3", "-o", str(tmp_path / "series_index"),
                                     "--device", "cpu"])
    assert built.exit_code == 0, built.output
    keys = Pseudonyms(json.loads((tmp_path / "series_index" / "manifest.json").read_text())["salt"])
    query = bright["files"][25.0]  # named IM1000xx, no extension, as PACS exports write them
    url, process, log = serve_index(tmp_path, tmp_path / "series_index")
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium(), headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.goto(url)
            expect(page.locator("body")).to_contain_text("2 series")
            page.locator("#query-image input[type=file]").set_input_files(str(query))
            expect(page.locator("#status")).to_contain_text("image: 2 results", timeout=60_000)
            first = captions(page)[0]
            slice_key = keys.key(pydicom.dcmread(query).SOPInstanceUID, "sl-")
            assert first.startswith("1 · ") and first.endswith(
                f"study {keys.key('1.7.2', 'st-')} / series {keys.key('1.7.2.1', 'se-')} / slice {slice_key}"), first
            rendered = page.locator("#results img").first
            expect(rendered).to_have_js_property("complete", True)
            assert rendered.evaluate("img => img.naturalWidth") > 0
            assert "1.7.2" not in page.content()
            browser.close()
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()
