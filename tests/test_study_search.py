"""Series/study indexes: `index build --unit series` over a two-study export, then text and one-slice image
queries find the right series first with the right best slice; the JSON answer names study / series / slice
by salted keys only."""
from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
import torch
from typer.testing import CliRunner

from fuselip_med.cli import app
from fuselip_med.core.fuselip import FuseLIP, FuseLIPConfig
from fuselip_med.core.pretrained import save_pretrained
from fuselip_med.data.phi import PrivacyOptions, Pseudonyms
from fuselip_med.data.studies import find_series
from fuselip_med.search.index import ModelId, build_unit_index, open_index
from fuselip_med.search.query import search
from fuselip_med.units import UnitOptions, embed_series, unit_rows
from tests.study_helpers import ct_series

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class BrightnessEncoder:
    """Planted ``encode``: an image maps to (m, 1 - m, 0.1) with m its mean pixel value; the text "bright" to
    (1, 0, 0) and "dark" to (0, 1, 0). Unit vectors [B, 3]."""

    def encode(self, images=None, texts=None, image_ids=None):
        if images is not None:
            mean = images.mean(dim=(1, 2, 3))
            out = torch.stack([mean, 1 - mean, torch.full_like(mean, 0.1)], dim=1)
        else:
            out = torch.tensor([[1.0, 0.0, 0.0] if "bright" in t else [0.0, 1.0, 0.0] for t in texts])
        return torch.nn.functional.normalize(out, dim=-1)


def two_studies(root):
    """Study 1: a dark series (z 0..10 mm); study 2: a brighter series (z 15..25 mm) — brightness follows z."""
    dark = ct_series(root / "PAT_A" / "s1", n=5, spacing_mm=2.5, study_uid="1.5.1", series_uid="1.5.1.1")
    bright = ct_series(root / "PAT_B" / "s1", n=5, spacing_mm=2.5, z0=15.0, study_uid="1.5.2", series_uid="1.5.2.1")
    return dark, bright


def test_text_and_slice_queries_find_the_series_and_its_best_slice(tmp_path):
    dark, bright = two_studies(tmp_path / "export")
    keys = Pseudonyms.fresh()
    model = BrightnessEncoder()
    embedded = embed_series(model, find_series(tmp_path / "export", keys), UnitOptions(slices=5), keep_images=True,
                            progress=False)
    build_unit_index(tmp_path / "index", unit_rows(embedded, "series"), ModelId("planted", "p1"), "series", keys.salt)
    index = open_index(tmp_path / "index")
    assert index.unit == "series" and len(index) == 2 and len(index.slices) == 10

    def slice_key(path):
        return keys.key(pydicom.dcmread(path).SOPInstanceUID, "sl-")

    [top, other] = search(index, model, text="bright", k=2)
    assert top.series == keys.key("1.5.2.1", "se-") and top.study == keys.key("1.5.2", "st-")
    assert top.best_slice == slice_key(bright["files"][25.0])  # the brightest slice
    [top, _] = search(index, model, text="dark", k=2)
    assert top.series == keys.key("1.5.1.1", "se-") and top.best_slice == slice_key(dark["files"][0.0])
    [top, _] = search(index, model, image=bright["files"][20.0], k=2)
    assert top.series == keys.key("1.5.2.1", "se-") and top.best_slice == slice_key(bright["files"][20.0])
    assert top.slice_score == pytest.approx(1.0, abs=1e-3)
    assert index.thumbnail_path(top.slice_row).is_file()


def test_burned_in_series_get_no_thumbnail_unless_allowed(tmp_path):
    ct_series(tmp_path / "export", n=3, burned_in="YES")
    keys = Pseudonyms.fresh()
    embedded = embed_series(BrightnessEncoder(), find_series(tmp_path / "export", keys), UnitOptions(slices=3),
                            keep_images=True, progress=False)
    rows = unit_rows(embedded, "series")
    build_unit_index(tmp_path / "hidden", rows, ModelId("planted", "p1"), "series", keys.salt)
    assert open_index(tmp_path / "hidden").slices["thumbnail"].isna().all()
    assert not list((tmp_path / "hidden").glob("thumbs/*.png"))
    build_unit_index(tmp_path / "shown", rows, ModelId("planted", "p1"), "series", keys.salt,
                     privacy=PrivacyOptions(allow_burned_in=True))
    assert len(list((tmp_path / "shown").glob("thumbs/*.png"))) == 3


def test_index_build_unit_series_cli_and_search_json(tmp_path):
    dark, bright = two_studies(tmp_path / "export")
    torch.manual_seed(0)
    save_pretrained(FuseLIP(FuseLIPConfig.from_size("tiny")).eval(), tmp_path / "tiny")
    runner = CliRunner()
    built = runner.invoke(app, ["index", "build", "-m", str(tmp_path / "tiny"), "-i", str(tmp_path / "export"),
                                "--unit", "series", "--slices", "3", "-o", str(tmp_path / "index"), "--device", "cpu"])
    assert built.exit_code == 0, built.output
    assert "2 series rows from 2 series, 6 slices" in " ".join(built.output.split())
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    keys = Pseudonyms(manifest["salt"])
    query = bright["files"][25.0]  # sampled: round(linspace(0, 4, 3)) = slices 0, 2, 4
    found = runner.invoke(app, ["search", "--index", str(tmp_path / "index"), "--image", str(query), "--json"])
    assert found.exit_code == 0, found.output
    hits = json.loads(found.stdout)
    assert [h["series"] for h in hits] == [keys.key("1.5.2.1", "se-"), keys.key("1.5.1.1", "se-")]
    assert hits[0]["best_slice"] == keys.key(pydicom.dcmread(query).SOPInstanceUID, "sl-")
    assert hits[0]["path"] is None and manifest["salt"] not in found.stdout
    text = runner.invoke(app, ["search", "--index", str(tmp_path / "index"), "--text", "chest CT"])
    assert text.exit_code == 0 and "best slice" in text.output
    again = runner.invoke(app, ["index", "build", "-m", str(tmp_path / "tiny"), "-i", str(tmp_path / "export"),
                                "--unit", "series", "--slices", "3", "-o", str(tmp_path / "index"), "--device", "cpu"])
    # same salt, same keys, same generation
    assert again.exit_code == 0 and "up to date" in " ".join(again.output.split())
    assert np.array_equal(open_index(tmp_path / "index").meta["id"], [h["id"] for h in sorted(hits,
                                                                                               key=lambda h: h["row"])])


def test_paths_are_stored_only_with_keep_paths(tmp_path):
    made = ct_series(tmp_path / "export" / "Doe_John", n=3)
    keys = Pseudonyms.fresh()
    embedded = embed_series(BrightnessEncoder(), find_series(tmp_path / "export", keys), UnitOptions(slices=3),
                            keep_images=True, progress=False)
    rows = unit_rows(embedded, "series")
    first = {rows[0].id: str(made["files"][0.0])}
    build_unit_index(tmp_path / "plain", rows, ModelId("planted", "p1"), "series", keys.salt, paths=first)
    assert open_index(tmp_path / "plain").meta["path"].isna().all()
    assert not any(b"Doe_John" in p.read_bytes() for p in (tmp_path / "plain").rglob("*") if p.is_file())
    build_unit_index(tmp_path / "kept", rows, ModelId("planted", "p1"), "series", keys.salt, paths=first,
                     privacy=PrivacyOptions(keep_paths=True))
    kept = open_index(tmp_path / "kept")
    assert kept.meta["path"].tolist() == [first[rows[0].id]] and not kept.privacy.show_paths
    with pytest.raises(ValueError, match="--show-paths needs --keep-paths"):
        PrivacyOptions(show_paths=True)
