"""Occlusion maps (``fuselip_med.explain``): the grid equals an independent loop over cells, TiTok codes of an image
are computed once, the sanity checks' arithmetic, the planted demo findings, and ``fuselip-med explain``'s outputs
and one-line errors. The sanity checks on the trained demo model are in test_explain_demo.py (slow)."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fuselip_med.cli import app
from fuselip_med.core.fuselip import FuseLIP, FuseLIPConfig
from fuselip_med.core.pretrained import save_pretrained
from fuselip_med.data.demo import planted_findings, write_demo_dataset
from fuselip_med.explain.occlusion import ExplainError, OcclusionExplainer, explain, fill_image
from fuselip_med.explain.sanity import (
    MAX_RHO,
    Case,
    pointing_game,
    randomized_copy,
    spearman,
    text_randomisation,
)

TEXT = "Pelvic ultrasound showing a large anechoic cyst in the left lower pelvis."


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return FuseLIP(FuseLIPConfig.from_size("tiny")).eval()


@pytest.fixture(scope="module")
def image():
    from fuselip_med.data.images import decode_image

    return decode_image(planted_findings(1)[0].jpeg)


def loop_over_cells(model, pixels, target, grid, filler, cells=None):
    """The definition, one cell at a time: cos(image, target) - cos(image with the cell replaced by filler, target)."""
    size = pixels.shape[-1] // grid
    with torch.no_grad():
        before = float(model.encode(images=pixels[None])[0] @ target)
        out = {}
        for row, col in cells or [(r, c) for r in range(grid) for c in range(grid)]:
            hidden = pixels.clone()
            window = (slice(None), slice(row * size, (row + 1) * size), slice(col * size, (col + 1) * size))
            hidden[window] = filler[window]
            out[row, col] = before - float(model.encode(images=hidden[None])[0] @ target)
    return before, out


def test_grid_equals_loop_over_cells_mean_fill(tiny, image):
    result = explain(tiny, image, TEXT, grid=8, fill="mean", batch_size=16)
    with torch.no_grad():
        target = tiny.encode(texts=[TEXT])[0]
    before, expected = loop_over_cells(tiny, image, target, 8, torch.full_like(image, float(image.mean())))
    assert result.drops.shape == (8, 8) and result.mode == "image-text" and result.cell_px == 32
    assert result.similarity_before == pytest.approx(before, abs=1e-6)
    grid = np.array([[expected[r, c] for c in range(8)] for r in range(8)])
    np.testing.assert_allclose(result.drops, grid, atol=1e-5)
    assert np.abs(grid).max() > 1e-3  # the map is not trivially zero


def test_blur_fill_and_fused_query_match_the_loop(tiny, image):
    query = torch.flip(image, dims=(-1,))
    instruction = "the same study, mirrored"
    result = explain(tiny, image, instruction, query_image=query, grid=8, fill="blur", batch_size=32)
    with torch.no_grad():
        target = tiny.encode(images=query[None], texts=[instruction])[0]
    cells = [(0, 0), (2, 5), (6, 3), (7, 7)]
    before, expected = loop_over_cells(tiny, image, target, 8, fill_image(image, 8, "blur"), cells)
    assert result.mode == "query-image" and result.drops.shape == (8, 8)
    assert result.similarity_before == pytest.approx(before, abs=1e-6)
    for cell in cells:
        assert result.drops[cell] == pytest.approx(expected[cell], abs=1e-5)


def test_blur_fill_keeps_local_brightness_and_removes_detail(image):
    blurred = fill_image(image, 8, "blur")
    assert blurred.shape == image.shape and float(blurred.min()) >= 0 and float(blurred.max()) <= 1
    assert abs(float(blurred.mean()) - float(image.mean())) < 0.01
    detail = lambda x: float((x[:, 1:] - x[:, :-1]).abs().mean())  # noqa: E731
    assert detail(blurred) < 0.3 * detail(image)


def test_titok_codes_are_computed_once_per_image(tiny, image):
    seen = []
    encode = tiny.image_tokenizer.encode

    def counting(pixels):
        seen.append(pixels.shape[0])
        return encode(pixels)

    tiny.image_tokenizer.encode = counting
    try:
        explainer = OcclusionExplainer(grid=8, fill="mean", batch_size=32)
        first = explainer(tiny, image, TEXT)
        assert sum(seen) == 1 + 64  # the unoccluded image once, each occluded copy once
        seen.clear()
        other = explainer(tiny, image, "Axial CT of the head")  # another text: no image is re-tokenized
        again = explainer(randomized_copy(tiny), image, TEXT)  # re-initialised encoder, same tokenizer: neither
        assert seen == []
        explainer(tiny, image, TEXT, query_image=image)
        assert seen == [1]  # the query image only
    finally:
        del tiny.image_tokenizer.encode
    assert not np.allclose(first.drops, other.drops) and not np.allclose(first.drops, again.drops)


def test_randomized_copy_reinitialises_the_encoder_and_shares_the_tokenizer(tiny):
    copy = randomized_copy(tiny, seed=1)
    assert copy.image_tokenizer is tiny.image_tokenizer
    changed = [name for (name, a), (_, b) in zip(tiny.named_parameters(), copy.named_parameters())
               if not name.startswith("image_tokenizer") and not torch.equal(a, b)]
    assert "token_embedding.weight" in changed and len(changed) > 10
    assert torch.equal(randomized_copy(tiny, seed=1).token_embedding.weight, copy.token_embedding.weight)


def test_an_explainer_that_ignores_the_text_fails_text_randomisation(tiny, image):
    real = OcclusionExplainer(grid=8, fill="mean", batch_size=32)

    def ignores_text(model, pixels, text, *, query_image=None):
        return real(model, pixels, "a medical image", query_image=query_image)

    result = text_randomisation(tiny, ignores_text, [Case(image, TEXT)])
    print(result.line())
    assert result.value == pytest.approx(1.0) and not result.passed and result.threshold == MAX_RHO
    assert "FAIL" in result.line()


def test_spearman_and_pointing_game_arithmetic():
    a = np.arange(16, dtype=np.float32).reshape(4, 4)
    assert spearman(a, a) == pytest.approx(1.0) and spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(a, np.zeros_like(a)) == 0.0  # a constant map shares no ordering

    mask = np.zeros((256, 256), bool)
    mask[40:50, 200:210] = True  # inside cell (1, 6) of an 8x8 grid

    class Pointing:
        def __init__(self, cell):
            self.drops = np.zeros((8, 8), np.float32)
            self.drops[cell] = 1.0

    cases = [Case(torch.zeros(3, 256, 256), "x")] * 4
    hit = pointing_game(None, lambda *a, **k: Pointing((1, 6)), cases, [mask] * 4)
    miss = pointing_game(None, lambda *a, **k: Pointing((7, 0)), cases, [mask] * 4)
    assert hit.value == 1.0 and hit.passed and miss.value == 0.0 and not miss.passed
    assert "a random cell: 0.016" in hit.detail  # 1 of 64 cells


class RegionTexture(torch.nn.Module):
    """A model whose image-text similarity depends only on the texture (pixel standard deviation) of one region:
    the answer a map must give is known."""

    def __init__(self, rows: slice, cols: slice):
        super().__init__()
        self.rows, self.cols = rows, cols
        self.unused = torch.nn.Parameter(torch.zeros(1))  # gives the model a device

    def encode(self, images=None, texts=None):
        if images is None:
            return torch.tensor([[0.0, 1.0]]).repeat(len(texts), 1)
        texture = images[:, :, self.rows, self.cols].flatten(1).std(dim=1)
        return torch.nn.functional.normalize(torch.stack([torch.ones_like(texture), 10 * texture], dim=1), dim=1)


@pytest.mark.parametrize("fill", ["blur", "mean"])
@pytest.mark.parametrize("top,left", [(70, 170), (170, 70), (8, 230)])
def test_map_maximum_lands_on_the_region_the_similarity_depends_on(fill, top, left):
    # a checkerboard "finding" at rows top..top+20, columns left..left+12 (row 2, column 5 of the 8x8 grid for the
    # first; its transpose for the second): a map with rows and columns swapped, the wrong sign, or a mask resized
    # the wrong way round points elsewhere
    pixels = torch.full((3, 256, 256), 0.4)
    checker = ((torch.arange(20)[:, None] + torch.arange(12)[None]) % 2).float()
    pixels[:, top:top + 20, left:left + 12] = 0.2 + 0.6 * checker
    mask = np.zeros((256, 256), bool)
    mask[top:top + 20, left:left + 12] = True
    model = RegionTexture(slice(top, top + 20), slice(left, left + 12))
    explainer = OcclusionExplainer(grid=8, fill=fill, batch_size=64)  # one sweep, scored three times
    result = explainer(model, pixels, "a textured finding")
    assert result.max_cell == (top // 32, left // 32) and result.drops.max() > 0.1
    flat = torch.full_like(pixels, 0.4)  # the same image without its finding
    game = pointing_game(model, explainer, [Case(pixels, "a textured finding", without=flat)], [mask])
    assert game.value == 1.0 and game.passed and "the finding raises the similarity in 1 of 1 images" in game.detail
    unseen = pointing_game(model, explainer, [Case(pixels, "a textured finding", without=pixels)], [mask])
    assert "raises the similarity in 0 of 1 images (median gain +0.0000)" in unseen.detail
    elsewhere = np.roll(mask, (128, 96), axis=(0, 1))
    assert pointing_game(model, explainer, [Case(pixels, "x")], [elsewhere]).value == 0


def test_planted_findings_are_the_demo_test_images(tmp_path):
    data = write_demo_dataset(tmp_path / "demo", n_train=0, n_valid=0, n_test=3, n_dicom=0)
    files = sorted((data / "test_images" / "test").glob("*.jpg"))
    captions = dict(line.split(",", 1) for line in (data / "test_captions.csv").read_text().splitlines()[1:])
    planted = planted_findings(3)
    assert [f.read_bytes() for f in files] == [p.jpeg for p in planted]
    assert [captions[f.stem].strip('"') for f in files] == [p.caption for p in planted]
    for item in planted:
        assert item.mask.shape == (256, 256) and 20 < item.mask.sum() < 0.1 * item.mask.size
        without = np.asarray(Image.open(io.BytesIO(item.jpeg_without)), np.int16)
        with_finding = np.asarray(Image.open(io.BytesIO(item.jpeg)), np.int16)
        assert np.abs(with_finding - without)[item.mask].mean() > 3 * np.abs(with_finding - without)[~item.mask].mean()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny):
    return save_pretrained(tiny, tmp_path_factory.mktemp("explain") / "tiny")


def test_explain_command_writes_overlay_grid_json_and_sanity_marks(tiny_dir, tmp_path):
    scan = tmp_path / "scan.jpg"
    scan.write_bytes(planted_findings(1)[0].jpeg)
    out = tmp_path / "maps" / "why.png"
    result = CliRunner().invoke(app, ["explain", "-m", str(tiny_dir), "--image", str(scan), "--text", TEXT,
                                      "--fill", "mean", "--sanity", "--sanity-images", "1", "-o", str(out),
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "Similarity before" in result.output
    record = json.loads(out.with_suffix(".json").read_text())
    drops = np.load(out.with_suffix(".npy"))
    assert drops.shape == (8, 8) and drops.dtype == np.float32
    np.testing.assert_allclose(np.array(record["drops"]), drops, atol=1e-6)
    np.testing.assert_allclose(np.array(record["similarity_after"]), record["similarity_before"] - drops, atol=1e-5)
    assert record["units"] == "cosine similarity" and record["grid"] == 8 and record["fill"] == "mean"
    checks = record["sanity"]
    assert set(checks) == {"model randomisation", "text randomisation", "pointing game"}
    for name, check in checks.items():  # each printed with its number and threshold
        assert f"{name}: {check['value']:.3f} ({'pass' if check['passed'] else 'FAIL'}: needs" in result.output
    failed = [name for name, check in checks.items() if not check["passed"]]
    assert record["sanity_passed"] is (not failed)
    assert all(name in result.output.split("The map failed:")[-1] for name in failed)
    with Image.open(out) as png:
        assert png.format == "PNG" and png.width > 300


def test_explain_command_overlays_a_dicom_through_its_window(tiny_dir, tmp_path):
    from pydicom.data import get_testdata_file

    from fuselip_med.data.images import load_image
    from fuselip_med.explain.occlusion import load_explain_image

    ct = get_testdata_file("CT_small.dcm")
    display, pixels = load_explain_image(ct, 8)
    assert display.mode == "L" and display.size == (128, 128) and pixels.shape == (3, 256, 256)
    assert np.array_equal(np.asarray(display), np.asarray(load_image(ct)))  # windowed as the user sees it


@pytest.mark.parametrize(("args", "message"), [
    (["--text", "   "], "--text is empty"),
    (["--grid", "12"], "--grid 12: choose one of 8, 16"),
    (["--fill", "zeros"], "--fill 'zeros'"),
    (["--frame", "-1"], "--frame -1: give a frame number, 0 or more"),  # was a ValueError traceback
])
def test_explain_command_bad_options_are_one_line(tiny_dir, tmp_path, args, message):
    scan = tmp_path / "scan.png"
    Image.new("L", (64, 64), 90).save(scan)
    base = ["explain", "-m", str(tiny_dir), "--image", str(scan), "--text", TEXT, "-o", str(tmp_path / "m.png")]
    result = CliRunner().invoke(app, base + args)
    assert result.exit_code == 2 and message in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_a_fifo_or_folder_as_image_is_not_a_regular_file_in_explain_and_search(tiny_dir, tmp_path):
    """explain --image/--query-image and search --image on a FIFO or a folder: one usage line saying "not a regular
    file" (before: explain "empty file; the file has zero bytes", search "no such file"), checked before any
    model or index is opened."""
    import os

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    scan = tmp_path / "scan.png"
    Image.new("L", (64, 64), 90).save(scan)
    runner = CliRunner()
    explain_args = ["explain", "-m", str(tiny_dir), "--text", TEXT, "-o", str(tmp_path / "m.png")]
    for args, flag in (([*explain_args, "--image", str(fifo)], "--image"),
                       ([*explain_args, "--image", str(scan), "--query-image", str(tmp_path)], "--query-image"),
                       (["search", "--index", str(tmp_path / "none"), "--image", str(fifo)], "--image")):
        result = runner.invoke(app, args)
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1, result.output
        assert f"{flag} " in lines[0] and "not a regular file" in lines[0], lines[0]
    missing = runner.invoke(app, [*explain_args, "--image", str(tmp_path / "gone.png")])
    assert missing.exit_code == 2 and "no such file" in missing.output
    assert not (tmp_path / "m.png").exists()


def test_explain_out_that_would_replace_an_input_image_is_refused(tiny_dir, tmp_path):
    """-o the input image itself (or a sibling .npy/.json the map is written to): one usage line, the image kept
    (before: the overlay replaced the scan)."""
    scan = tmp_path / "scan.png"
    Image.new("L", (64, 64), 90).save(scan)
    before = scan.read_bytes()
    query = tmp_path / "query.json"  # not an image, but an input the grid's .json would replace
    query.write_bytes(before)
    runner = CliRunner()
    base = ["explain", "-m", str(tiny_dir), "--text", TEXT, "--image", str(scan)]
    for extra, flag in ((["-o", str(scan)], "--image"),
                        (["-o", str(tmp_path / "query.png"), "--query-image", str(query)], "--query-image")):
        result = runner.invoke(app, [*base, *extra])
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and f"would replace {flag}" in lines[0], result.output
    assert scan.read_bytes() == before and query.read_bytes() == before


def test_explain_command_bad_images_are_one_line(tiny_dir, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    small = tmp_path / "small.png"
    Image.new("L", (12, 12), 90).save(small)
    runner = CliRunner()
    for image, grid, message in ((broken, "8", f"cannot decode image {broken}"),
                                 (small, "16", f"{small}: the image is 12x12 px, smaller than the 16x16 grid")):
        result = runner.invoke(app, ["explain", "-m", str(tiny_dir), "--image", str(image), "--text", TEXT,
                                     "--grid", grid, "-o", str(tmp_path / "m.png")])
        assert result.exit_code == 1, result.output
        assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "m.png").exists()
    with pytest.raises(ExplainError, match="the text is empty"):
        explain(FuseLIP(FuseLIPConfig.from_size("tiny")), torch.zeros(3, 256, 256), "")


def test_explain_out_in_an_unwritable_place_is_one_line_before_work(tiny_dir, tmp_path):
    """Before: -o under a file (or in /proc) computed the whole map, then died with a FileNotFoundError /
    NotADirectoryError traceback from the atomic write."""
    scan = tmp_path / "scan.png"
    Image.new("L", (64, 64), 90).save(scan)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    result = CliRunner().invoke(app, ["explain", "-m", str(tiny_dir), "--text", TEXT, "--image", str(scan),
                                      "-o", str(blocker / "why.png")])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and f"cannot write to {blocker}" in lines[0], result.output
