"""The synthetic demo dataset: deterministic bytes, the official ROCOv2 layout, learnable visual correlates."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fuselip_med.data import demo
from fuselip_med.data.adapters.rocov2 import rocov2

SMALL = {"n_train": 30, "n_valid": 8, "n_test": 10, "n_dicom": 6}
CAPTION_MODALITY = [("radiograph", "X-ray"), (" CT ", "CT"), ("MRI", "MRI"), ("ultrasound", "ultrasound")]


def tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return demo.write_demo_dataset(tmp_path_factory.mktemp("demo") / "small", seed=3, **SMALL)


def test_same_seed_same_bytes(small, tmp_path):
    again = demo.write_demo_dataset(tmp_path / "again", seed=3, **SMALL)
    assert tree_digest(again) == tree_digest(small)
    other = demo.write_demo_dataset(tmp_path / "other", seed=4, **SMALL)
    assert tree_digest(other) != tree_digest(small)


def test_official_layout_files(small):
    names = {p.name for p in small.iterdir()}
    for split in ("train", "valid", "test"):
        assert {f"{split}_captions.csv", f"{split}_concepts.csv", f"{split}_concepts_manual.csv",
                f"{split}_images"} <= names
        assert (small / f"{split}_images" / split).is_dir()
    assert {"cui_mapping.csv", "README.txt", demo.MARKER_NAME} <= names
    assert "SYNTHETIC" in (small / "README.txt").read_text()
    assert (small / "train_captions.csv").read_text().startswith("ID,Caption\n")
    assert (small / "cui_mapping.csv").read_text().startswith("CUI,Canonical name\n")
    assert not [p for p in small.parent.iterdir() if p.name.startswith(".")]  # no temp folders left behind


def test_rocov2_adapter_reads_it(small):
    marker = json.loads((small / demo.MARKER_NAME).read_text())
    dicom_splits = {entry.file: entry.split for entry in demo.DEMO_DICOM_FILES}
    for split, n in (("train", SMALL["n_train"]), ("valid", SMALL["n_valid"]), ("test", SMALL["n_test"])):
        source = rocov2(small, split)
        n_dicom = sum(1 for name in marker["dicom_files"] if dicom_splits[name] == split)
        assert len(source) == n + n_dicom and not source.skipped
        numbers = [int(i.rsplit("_", 1)[1]) for i in source.image_ids]
        assert numbers == sorted(numbers) and numbers[-1] - numbers[0] > len(numbers) - 1  # gaps in the IDs
        assert all(re.fullmatch(rf"ROCOv2_2023_{split}_\d{{6}}", i) for i in source.image_ids)
        labels = source.modality_labels()
        assert None not in labels
        dicoms = 0
        for i in range(len(source)):
            sample = source[i]
            caption, modality = sample.target.text, labels[i]
            if sample.query.image.endswith(".dcm"):
                dicoms += 1
                assert modality in ("CT", "MRI")
                continue
            assert [m for word, m in CAPTION_MODALITY if word in caption] == [modality], caption
            assert re.search(r"\b(small|large) \d+ mm\b", caption), caption
            assert re.search(r"\b(left|right)\b", caption), caption
            assert sample.meta["concepts"][0] == demo.MODALITY_CUIS[modality]
            assert all(c in demo.CUI_NAMES for c in sample.meta["concepts"])
            with Image.open(sample.query.image) as image:
                assert image.format == "JPEG" and image.size == (256, 256) and image.mode == "L"
        assert dicoms == n_dicom
        assert marker["splits"][split]["images"] == len(source)
    assert marker["dicom_files"] == [entry.file for entry in demo.DEMO_DICOM_FILES]


def test_dicom_samples_decode(small):
    import pydicom

    source = rocov2(small, "test")
    dicoms = [source[i] for i in range(len(source)) if source[i].query.image.endswith(".dcm")]
    assert len(dicoms) == 2
    for sample in dicoms:
        dataset = pydicom.dcmread(sample.query.image)
        assert dataset.pixel_array.ndim == 2
        assert {"CT": "CT", "MR": "MRI"}[dataset.Modality] == sample.meta["modality"]


def _difference(study: demo.Study, seed: int) -> np.ndarray:
    """Where the finding is: the study drawn with its finding against the same draw with a tiny finding."""
    tiny = demo.Study(**{**study.__dict__, "extent_px": 0.3})
    a = demo.render_study(study, np.random.default_rng(seed)).astype(np.float32)
    b = demo.render_study(tiny, np.random.default_rng(seed)).astype(np.float32)
    return np.abs(a - b) > 40


@pytest.mark.parametrize("modality,region", [(m, r) for m in demo.STUDIES for r in demo.STUDIES[m]])
def test_finding_is_where_and_as_large_as_the_caption_says(modality, region):
    for k, finding in enumerate(demo.STUDIES[modality][region]):
        for side in ("right", "left"):
            for vertical in (("lower",) if finding == "effusion" else ("upper", "lower")):
                areas = []
                for large in (False, True):
                    extent = float(np.mean(demo.EXTENT_PX[finding][int(large)]))
                    study = demo.Study(modality, region, finding, side, vertical, large, extent, 10, 0)
                    changed = _difference(study, seed=17 * k + 3)
                    ys, xs = np.nonzero(changed)
                    assert len(xs) > 0, study
                    areas.append(len(xs))
                    if large and region != "knee":  # a knee's side is which knee: the fibula shows it
                        # radiological convention: the patient's right is on the image's left
                        assert (np.median(xs) < 128) == (side == "right"), study
                    if large and modality != "ultrasound":  # ultrasound enhancement reaches far below
                        assert (np.median(ys) < 128) == (vertical == "upper"), study
                assert areas[1] > areas[0], (modality, region, finding, side, vertical)


def test_knee_side_shows_in_the_fibula():
    def lateral_bone(side):
        study = demo.Study("X-ray", "knee", "fracture", side, "upper", False, 2.0, 1, 0)
        image = demo.render_study(study, np.random.default_rng(0)).astype(np.float32)
        below_plateau = image[200:240]
        return below_plateau[:, 60:100].mean() - below_plateau[:, 156:196].mean()

    assert lateral_bone("right") > 20 and lateral_bone("left") < -20


def test_reuse_overwrite_and_refusal(tmp_path):
    params = {"n_train": 4, "n_valid": 2, "n_test": 2, "n_dicom": 0}
    out = demo.write_demo_dataset(tmp_path / "d", **params)
    stamp = (out / "train_captions.csv").stat().st_mtime_ns
    assert demo.write_demo_dataset(tmp_path / "d", **params) == out
    assert (out / "train_captions.csv").stat().st_mtime_ns == stamp  # reused, not rewritten
    with pytest.raises(FileExistsError, match="overwrite"):
        demo.write_demo_dataset(tmp_path / "d", **{**params, "n_train": 5})
    demo.write_demo_dataset(tmp_path / "d", overwrite=True, **{**params, "n_train": 5})
    assert len(rocov2(out, "train")) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="not a demo dataset"):
        demo.write_demo_dataset(tmp_path / "mine", overwrite=True, **params)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"

    (tmp_path / "empty").mkdir()
    demo.write_demo_dataset(tmp_path / "empty", **params)
    assert (tmp_path / "empty" / demo.MARKER_NAME).is_file()
    with pytest.raises(ValueError, match="n_dicom"):
        demo.write_demo_dataset(tmp_path / "x", n_dicom=len(demo.DEMO_DICOM_FILES) + 1)


def test_demo_dataset_path_uses_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "_DEFAULTS", {"seed": 0, "n_train": 3, "n_valid": 2, "n_test": 2, "n_dicom": 1})
    monkeypatch.setenv("FUSELIP_MED_CACHE", str(tmp_path / "cache"))
    path = demo.demo_dataset_path()
    assert path == tmp_path / "cache" / "demo_rocov2" and len(rocov2(path, "train")) == 4
    assert demo.demo_dataset_path() == path
    assert demo.demo_dataset_path(tmp_path / "elsewhere") == tmp_path / "elsewhere" / "demo_rocov2"
    # an older or different cached demo is replaced, since the cache is ours
    monkeypatch.setattr(demo, "_DEFAULTS", {"seed": 0, "n_train": 5, "n_valid": 2, "n_test": 2, "n_dicom": 1})
    assert len(rocov2(demo.demo_dataset_path(), "train")) == 6


@pytest.mark.slow
def test_default_dataset_counts(tmp_path):
    out = demo.write_demo_dataset(tmp_path / "full")
    counts = {split: len(rocov2(out, split)) for split in ("train", "valid", "test")}
    assert counts == {"train": 484, "valid": 96, "test": 98}
    labels = rocov2(out, "train").modality_labels()
    assert {label: labels.count(label) for label in set(labels)}.keys() == {"CT", "MRI", "X-ray", "ultrasound"}


def test_the_demo_command_reports_what_each_split_holds(tmp_path):
    """`data demo` printed the synthetic counts only ("test 96 images") while the test split holds 98 (2 real
    DICOM files): the line now gives each split's total as written."""
    from typer.testing import CliRunner

    from fuselip_med.cli import app

    result = CliRunner().invoke(app, ["data", "demo", "--out", str(tmp_path / "d"), "--n-train", "4", "--n-valid",
                                      "2", "--n-test", "3"])
    assert result.exit_code == 0, result.output
    written = demo.demo_split_counts(tmp_path / "d")
    line = " ".join(result.output.split())
    for split in ("train", "valid", "test"):
        assert f"{split} {written[split]['images']}" in line
    assert written["test"]["images"] == 3 + written["test"]["dicom"]
