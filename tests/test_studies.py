"""data/studies.py + data/volumes.py: series from pydicom-built files, pydicom-data's DICOMDIR and nibabel's
NIfTI files; slice order, named skips and series/study counts checked exactly."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from fuselip_med.data.images import dicom_modality_values
from fuselip_med.data.phi import Pseudonyms
from fuselip_med.data.skips import SkipReport
from fuselip_med.data.studies import StudiesError, find_series, nifti_series, read_series
from fuselip_med.data.volumes import Rendering, render_slice, sample_slices, sampled_indices, slice_values
from tests.study_helpers import ct_series, ct_slice, enhanced_mr, nifti_volume, slice_pixels

KEYS = Pseudonyms("0123456789abcdef0123456789abcdef")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _positions(series):
    return [s.position for s in series.slices]


def test_shuffled_ct_series_is_ordered_by_position_not_name_or_instance_number(tmp_path):
    made = ct_series(tmp_path / "a", n=7, spacing_mm=2.5, shuffle_seed=3)
    skips = SkipReport()
    [series] = find_series(tmp_path, KEYS, skips)
    assert _positions(series) == [i * 2.5 for i in range(7)]
    assert [s.instance_number for s in series.slices] == [7, 6, 5, 4, 3, 2, 1]  # InstanceNumber disagrees
    assert series.ordered_by == "ImagePositionPatient" and series.spacing_mm == 2.5
    assert [os.fspath(s.source) for s in series.slices] == [os.fspath(made["files"][i * 2.5]) for i in range(7)]
    assert series.key == KEYS.key(made["series"], "se-") and series.study_key == KEYS.key(made["study"], "st-")
    assert skips.total == 0 and not skips.hints


def test_orientation_decides_the_normal(tmp_path):
    """Coronal slices (normal along -y for these cosines) are ordered by y, whatever z says."""
    study, series_uid = "1.2.3.4", "1.2.3.4.5"
    orientation = (1, 0, 0, 0, 0, -1)  # rows along x, columns along -z: normal = x cross -z = +y
    for i, y in enumerate([3.0, 0.0, 6.0, 9.0]):
        path = ct_slice(tmp_path / f"s{i}", 0.0, study_uid=study, series_uid=series_uid, instance_number=i + 1,
                        orientation=orientation)
        import pydicom

        ds = pydicom.dcmread(path)
        ds.ImagePositionPatient = [0.0, y, 100.0 - y]
        ds.save_as(path)
    [series] = read_series(sorted(tmp_path.iterdir()), KEYS)
    assert _positions(series) == [0.0, 3.0, 6.0, 9.0]


def test_localizer_duplicate_gap_single_slice_and_mixed_are_named_per_series(tmp_path):
    ok = ct_series(tmp_path / "ok", n=5, study_uid="1.2.9")
    with_localizer = ct_series(tmp_path / "loc", n=4, study_uid="1.2.9")
    ct_slice(tmp_path / "loc" / "SCOUT", 0.0, study_uid="1.2.9", series_uid=with_localizer["series"],
             instance_number=99, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    dup = ct_series(tmp_path / "dup", n=4)
    ct_slice(tmp_path / "dup" / "COPY", 2.5, study_uid=dup["study"], series_uid=dup["series"], instance_number=50)
    gap = ct_series(tmp_path / "gap", n=3)
    ct_slice(tmp_path / "gap" / "FAR", 40.0, study_uid=gap["study"], series_uid=gap["series"], instance_number=60)
    single = ct_series(tmp_path / "single", n=1)
    mixed = ct_series(tmp_path / "mixed", n=3)
    ct_slice(tmp_path / "mixed" / "TILT", 9.0, study_uid=mixed["study"], series_uid=mixed["series"],
             instance_number=70, orientation=(1, 0, 0, 0, 0.8, 0.6))
    spacing = ct_series(tmp_path / "spacing", n=3)
    ct_slice(tmp_path / "spacing" / "ZOOM", 9.0, study_uid=spacing["study"], series_uid=spacing["series"],
             instance_number=80, spacing=(0.5, 0.5))
    (tmp_path / "README.txt").write_text("not an image")

    skips = SkipReport()
    found = find_series(tmp_path, KEYS, skips)
    key = {name: KEYS.key(made["series"], "se-") for name, made in
           dict(ok=ok, loc=with_localizer, dup=dup, gap=gap, single=single, mixed=mixed, spacing=spacing).items()}
    assert {s.key: len(s) for s in found} == {key["ok"]: 5, key["loc"]: 4, key["dup"]: 4}
    assert len({s.study_key for s in found}) == 2  # ok + loc share study 1.2.9; dup its own
    assert sorted((e.id, e.reason) for e in skips.entries) == sorted([
        (key["loc"], "localizer left out"), (key["dup"], "duplicate slice position"),
        (key["gap"], "gap in slice spacing"), (key["single"], "single-slice series"),
        (key["mixed"], "mixed orientations"), (key["spacing"], "mixed pixel spacings"),
        (KEYS.key(os.fspath(tmp_path / "README.txt"), "file-"), "not a DICOM image"),
    ])
    dup_series = next(s for s in found if s.key == key["dup"])
    assert _positions(dup_series) == [0.0, 2.5, 5.0, 7.5]


def test_missing_positions_fall_back_to_instance_number_and_say_so(tmp_path):
    import pydicom

    made = ct_series(tmp_path, n=4)
    for path in made["files"].values():
        ds = pydicom.dcmread(path)
        del ds.ImagePositionPatient
        ds.save_as(path)
    skips = SkipReport()
    [series] = read_series(sorted(tmp_path.iterdir()), KEYS, skips)
    assert series.ordered_by == "InstanceNumber"
    assert [s.instance_number for s in series.slices] == [1, 2, 3, 4]
    assert skips.hints == [f"series {series.key}: ordered by InstanceNumber: a slice lacks "
                           "a usable ImagePositionPatient/ImageOrientationPatient"]


def test_enhanced_multiframe_mr_is_split_by_its_per_frame_groups(tmp_path):
    made = enhanced_mr(tmp_path / "EMR0001", n_frames=5, spacing_mm=3.0, reverse=True)
    [series] = find_series(tmp_path, KEYS)
    assert series.modality == "MR" and len(series) == 5
    assert _positions(series) == [0.0, 3.0, 6.0, 9.0, 12.0]
    assert [s.frame for s in series.slices] == [4, 3, 2, 1, 0]  # stored in reverse
    for ref, z in zip(series.slices, _positions(series)):
        assert np.array_equal(slice_values(ref), np.abs(slice_pixels(z)).astype(np.float32))
    assert made["series"] and series.key == KEYS.key(made["series"], "se-")


def test_pydicom_data_dicomdir_series_and_studies():
    from pydicom.data import get_testdata_file

    dicomdir = get_testdata_file("DICOMDIR")
    skips = SkipReport()
    found = find_series(dicomdir, KEYS, skips)
    # the real set: one CT volume; 3-plane MR localizers (mixed orientations), a radial MR set, a CT series
    # with a 202 mm jump, the 2-image CT localizer series and single CR/MR images are named, not volumes
    assert [(s.modality, len(s), s.spacing_mm) for s in found] == [("CT", 5, 2.5)]
    assert skips.counts == {"single-slice series": 7, "mixed orientations": 3, "gap in slice spacing": 1,
                            "localizer left out": 1}
    assert next(e for e in skips.entries if e.reason == "gap in slice spacing").detail == \
        "a step of 202 mm where the median step is 1.25 mm"
    # the same instances read as a folder (walked recursively) give the same series
    assert [s.key for s in find_series(Path(dicomdir).parent, KEYS)] == [s.key for s in found]


def test_nibabel_shipped_nifti_files():
    from nibabel.testing import data_path

    skips = SkipReport()
    anatomical = nifti_series(Path(data_path) / "anatomical.nii", skips=skips)
    assert anatomical.key == "anatomical.nii" and len(anatomical) == 25 and anatomical.spacing_mm == 2.0
    standard = nifti_series(Path(data_path) / "standard.nii.gz", skips=skips)
    assert len(standard) == 7 and standard.slices[0].axis == 2
    coronal = nifti_series(Path(data_path) / "standard.nii.gz", plane="coronal")
    assert len(coronal) == 5 and coronal.spacing_mm == 3.0
    assert nifti_series(Path(data_path) / "example4d.nii.gz", skips=skips) is None
    assert skips.counts == {"not a 3-D volume": 1}
    image = render_slice(standard.slices[3])
    assert image.dtype == np.uint8 and image.shape == (5, 4)  # [A, R] rows x columns of the axial slice


def test_nifti_values_are_read_in_ras(tmp_path):
    import nibabel

    data = nifti_volume(tmp_path / "vol.nii.gz", shape=(6, 5, 4))
    flipped = tmp_path / "flipped.nii.gz"  # the same anatomy stored with x reversed (LAS)
    affine = np.diag([-1.0, 1.0, 2.0, 1.0])
    affine[0, 3] = 5.0
    nibabel.save(nibabel.Nifti1Image(data[::-1].copy(), affine), str(flipped))
    a, b = nifti_series(tmp_path / "vol.nii.gz"), nifti_series(flipped)
    for k in range(4):
        assert np.array_equal(slice_values(a.slices[k]), slice_values(b.slices[k]))
        assert np.array_equal(slice_values(a.slices[k]), data[:, :, k].T[::-1, ::-1].astype(np.float32))


def test_broken_nifti_header_and_no_usable_series_is_one_error(tmp_path):
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    (tmp_path / "short.nii").write_bytes(b"\x00" * 40)
    skips = SkipReport()
    with pytest.raises(StudiesError, match=f"^{tmp_path}: no usable series .*2 broken NIfTI header"):
        find_series(tmp_path, KEYS, skips)


def test_csv_lists_folders_and_volumes(tmp_path):
    ct_series(tmp_path / "exp1", n=3)
    nifti_volume(tmp_path / "v.nii.gz")
    (tmp_path / "list.csv").write_text("path\nexp1\nv.nii.gz\n")
    found = find_series(tmp_path / "list.csv", KEYS)
    assert sorted((s.kind, len(s)) for s in found) == [("dicom", 3), ("nifti", 6)]
    with pytest.raises(StudiesError, match="no column 'file'"):
        find_series(tmp_path / "list.csv", KEYS, path_column="file")


def test_sampling_is_even_and_multi_window_rendering_uses_the_presets(tmp_path):
    assert sampled_indices(300, 16).tolist() == [round(i * 299 / 15) for i in range(16)]
    assert sampled_indices(5, 16).tolist() == [0, 1, 2, 3, 4]
    ct_series(tmp_path, n=20, spacing_mm=1.0)
    [series] = find_series(tmp_path, KEYS)
    picked = sample_slices(series, 4)
    assert [s.position for s in picked] == [0.0, 6.0, 13.0, 19.0]
    rgb = render_slice(picked[1], Rendering.parse("multi"))
    hu = dicom_modality_values(picked[1].source)
    expect = [np.clip((hu - (level - width / 2)) / width, 0, 1) for width, level in
              [(1500, -600), (400, 40), (1800, 400)]]
    assert rgb.shape == (16, 16, 3)
    assert np.array_equal(rgb, np.rint(np.stack(expect, -1) * 255).astype(np.uint8))
    assert render_slice(picked[1]).shape == (16, 16)
    with pytest.raises(ValueError, match="unknown window preset"):
        Rendering.parse("multi:lung,nope,bone")


def test_truncated_slice_fails_when_rendered(tmp_path):
    from fuselip_med.data.images import ImageDecodeError

    made = ct_series(tmp_path, n=3)
    ct_slice(next(iter(made["files"].values())), 0.0, study_uid=made["study"], series_uid=made["series"],
             instance_number=3, truncate=True)
    [series] = read_series(sorted(tmp_path.iterdir()), KEYS)
    with pytest.raises(ImageDecodeError, match="truncated image"):
        render_slice(series.slices[0])


def test_read_series_takes_datasets_held_in_memory(tmp_path):
    """A network source (DICOMweb) hands pydicom data sets, not files: same series, same slices, same pixels."""
    import pydicom

    made = ct_series(tmp_path, n=4)
    datasets = [pydicom.dcmread(path) for path in sorted(tmp_path.iterdir())]
    [from_memory] = read_series(datasets, KEYS)
    [from_files] = read_series(sorted(tmp_path.iterdir()), KEYS)
    assert [s.key for s in from_memory.slices] == [s.key for s in from_files.slices]
    assert from_memory.key == KEYS.key(made["series"], "se-")
    for a, b in zip(from_memory.slices, from_files.slices):
        assert np.array_equal(render_slice(a), render_slice(b))
