"""Series / volume reading under hostile inputs (an adversarial tester's findings): special files, links out of
the input folder, files that only look like DICOM by name, declared sizes the bytes cannot hold, broken NIfTI
headers and DICOMDIRs. Each must be a named skip (or one error line), fast, with no traceback."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from fuselip_med.data.phi import Pseudonyms
from fuselip_med.data.skips import SkipReport
from fuselip_med.data.studies import find_series
from tests.study_helpers import ct_series

KEYS = Pseudonyms("0123456789abcdef0123456789abcdef")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _reasons(skips: SkipReport) -> dict[str, int]:
    return dict(skips.counts)


@pytest.mark.timeout(30)
def test_special_files_in_a_series_folder_are_named_not_opened(tmp_path):
    """A FIFO (opening it would block for ever) and a socket are ``not a file``, as the image unit names them."""
    import socket

    ct_series(tmp_path / "exam", n=3)
    os.mkfifo(tmp_path / "exam" / "pipe.dcm")
    server = socket.socket(socket.AF_UNIX)
    server.bind(os.fspath(tmp_path / "exam" / "sock"))
    try:
        skips = SkipReport()
        [series] = find_series(tmp_path, KEYS, skips)
    finally:
        server.close()
    assert len(series) == 3
    assert _reasons(skips) == {"not a file": 2}


@pytest.mark.timeout(30)
def test_links_out_of_the_folder_loops_dangling_links_and_zero_files_are_named(tmp_path):
    """Links are held to the input folder as the image unit holds them (``outside image root``, ``symlink loop``,
    ``missing image``); a large zero-filled ``.dcm`` is ``not a DICOM image`` without letting pydicom parse it."""
    ct_series(tmp_path / "in" / "exam", n=3)
    outside = ct_series(tmp_path / "elsewhere", n=3)  # a readable DICOM series outside the input folder
    folder = tmp_path / "in"
    (folder / "passwd.dcm").symlink_to("/etc/passwd")
    (folder / "zero.dcm").symlink_to("/dev/zero")
    (folder / "outside.dcm").symlink_to(next(iter(outside["files"].values())))
    (folder / "loop.dcm").symlink_to(folder / "loop.dcm")
    (folder / "gone.dcm").symlink_to(folder / "nothing-here")
    (folder / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with open(folder / "zeros.dcm", "wb") as handle:  # sparse: 64 MiB of zeros on no disk space
        handle.truncate(64 << 20)
    skips = SkipReport()
    [series] = find_series(folder, KEYS, skips)
    assert len(series) == 3
    assert _reasons(skips) == {"outside image root": 3, "symlink loop": 1, "missing image": 1,
                               "not a DICOM image": 1, "symlinked folder": 1}
    assert not any(word in e.id + e.source + e.detail for e in skips.entries for word in ("passwd", str(tmp_path)))


def _multiframe(path, declared: int, groups: int, stored: int = 4):
    """An Enhanced CT object whose NumberOfFrames, per-frame functional groups and stored frames may disagree."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import EnhancedCTImageStorage, ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = EnhancedCTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), "CT"
    ds.Rows = ds.Columns = 16
    ds.NumberOfFrames, ds.SamplesPerPixel, ds.PhotometricInterpretation = declared, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelData = (np.arange(stored * 16 * 16) % 1000).astype("<i2").tobytes()
    frames = []
    for i in range(groups):
        group, position, orientation = Dataset(), Dataset(), Dataset()
        position.ImagePositionPatient = [0.0, 0.0, float(i)]
        orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        group.PlanePositionSequence, group.PlaneOrientationSequence = Sequence([position]), Sequence([orientation])
        frames.append(group)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.save_as(path, enforce_file_format=True)


@pytest.mark.timeout(30)
def test_declared_frames_the_pixel_data_cannot_hold_are_refused_at_once(tmp_path):
    """A 9 KB file declaring a million frames is ``truncated image`` before any per-frame record is made; per-frame
    groups that do not match the frames are ``frame count mismatch``; a consistent object still splits."""
    import tracemalloc

    from fuselip_med.data.studies import read_series

    _multiframe(tmp_path / "bomb.dcm", 1_000_000, 0)
    _multiframe(tmp_path / "more.dcm", 4, 8)
    _multiframe(tmp_path / "fewer.dcm", 4, 3)
    _multiframe(tmp_path / "ok.dcm", 4, 4)
    skips = SkipReport()
    tracemalloc.start()
    [series] = read_series(sorted(tmp_path.iterdir()), KEYS, skips)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(series) == 4 and peak < 20e6
    assert _reasons(skips) == {"truncated image": 1, "frame count mismatch": 2}
    bomb = next(e for e in skips.entries if e.reason == "truncated image")
    held = (tmp_path / "bomb.dcm").stat().st_size // (16 * 16 * 2)  # the file size bounds the pixel data
    assert bomb.detail == f"1000000 frame(s) declared, the pixel data holds at most {held}"


def test_nifti_slices_are_read_one_at_a_time_and_match_monai_ras(tmp_path):
    """Only the sampled slice is read (peak memory ~ one slice, not the 64 MB float32 volume), and every slice
    equals MONAI's LoadImage + Orientation("RAS") of the whole volume, for a permuted and flipped affine."""
    import tracemalloc

    import nibabel
    import numpy as np
    from monai.transforms import LoadImage, Orientation

    from fuselip_med.data.volumes import read_nifti_slice, render_slice, sample_slices

    big = tmp_path / "big.nii.gz"
    nibabel.save(nibabel.Nifti1Image(np.zeros((400, 400, 100), np.uint8), np.eye(4)), str(big))
    [series] = find_series(big, KEYS)
    refs = sample_slices(series, 4)
    tracemalloc.start()
    for ref in refs:
        render_slice(ref)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8e6, peak  # a 400 x 400 slice is 0.64 MB as float32; the volume 64 MB

    data = np.random.default_rng(1).integers(-1000, 1000, (5, 4, 6)).astype(np.int16)
    # voxel axis k -> -x, i -> y, j -> -z
    affine = np.array([[0, 0, -2.0, 10], [1.5, 0, 0, -3], [0, -1.0, 0, 7], [0, 0, 0, 1]])
    oblique = tmp_path / "oblique.nii.gz"
    nibabel.save(nibabel.Nifti1Image(data, affine), str(oblique))
    volume = LoadImage(image_only=True, ensure_channel_first=True, reader="NibabelReader")(str(oblique))
    ras = np.asarray(Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(volume))[0]
    for axis in range(3):
        for index in range(ras.shape[axis]):
            assert np.array_equal(read_nifti_slice(str(oblique), axis, index), np.take(ras, index, axis=axis))


def test_nifti_header_claiming_too_many_voxels_is_a_named_skip(tmp_path):
    """A 352-byte header claiming 30000^3 voxels is ``volume too large`` (was MemoryError, then IndexError)."""
    import nibabel
    import numpy as np

    from fuselip_med.data.studies import MAX_NIFTI_VOXELS

    header = nibabel.Nifti1Header()
    header.set_data_dtype(np.uint8)
    header.set_data_shape((30000, 30000, 30000))
    header.set_sform(np.eye(4), code=1)
    with open(tmp_path / "huge.nii", "wb") as handle:
        header.write_to(handle)
    nibabel.save(nibabel.Nifti1Image(np.zeros((4, 4, 3), np.int16), np.eye(4)), str(tmp_path / "ok.nii"))
    skips = SkipReport()
    [series] = find_series(tmp_path, KEYS, skips)
    assert series.key == "ok.nii"
    assert _reasons(skips) == {"volume too large": 1}
    assert skips.entries[0].detail.startswith(f"shape (30000, 30000, 30000): over {MAX_NIFTI_VOXELS} voxels")


def test_index_build_and_search_on_a_nifti_volume(tmp_path):
    """NIfTI slice keys are ``<volume>#<i>``: the unit index keeps them whole (was ValueError on the chunk keys)
    and search answers with the volume and its brightest slice."""
    import nibabel
    import numpy as np

    from fuselip_med.data.volumes import Rendering
    from fuselip_med.inference.units import UnitOptions
    from fuselip_med.search.index import ModelId, build_unit_index, open_index
    from fuselip_med.search.query import search
    from tests.test_study_search import BrightnessEncoder

    data = np.zeros((8, 8, 5), np.int16)
    for k in range(5):
        data[:4, :, k] = 100 * k  # half of each slice brighter slice by slice (window 0..500 HU)
    nibabel.save(nibabel.Nifti1Image(data, np.eye(4)), str(tmp_path / "vol.nii.gz"))
    keys = Pseudonyms.fresh()
    model = BrightnessEncoder()
    build_unit_index(tmp_path / "index", find_series(tmp_path / "vol.nii.gz", keys), model, ModelId("planted", "p1"),
                     "series", keys.salt, UnitOptions(slices=5, rendering=Rendering(window=(500.0, 250.0))))
    index = open_index(tmp_path / "index")
    assert list(index.slices["slice"]) == [f"vol.nii.gz#{k}" for k in range(5)]
    [top] = search(index, model, text="bright", k=1)
    assert top.series == "vol.nii.gz" and top.best_slice == "vol.nii.gz#4"
    assert index.thumbnail_path(top.slice_row).is_file()


def test_singular_affine_and_all_nan_volume_are_named_skips(tmp_path):
    """A zero sform (sform_code 1) is ``broken NIfTI header`` (was ValueError: NaN to integer); a volume with no
    finite voxel is ``no finite voxels`` (was a normal-looking vector); NaN slices of a partly-NaN volume are
    left out of its pool, the rest embedded."""
    import struct

    import nibabel
    import numpy as np

    from fuselip_med.inference.units import UnitOptions, embed_series
    from tests.test_study_search import BrightnessEncoder

    singular = tmp_path / "singular.nii"
    image = nibabel.Nifti1Image(np.ones((4, 4, 3), np.float32), np.eye(4))
    image.header.set_qform(None, code=0)
    nibabel.save(image, str(singular))
    raw = bytearray(singular.read_bytes())
    struct.pack_into("<12f", raw, 280, *[0.0] * 12)  # srow_x/y/z (NIfTI-1 header offsets 280..327)
    struct.pack_into("<h", raw, 254, 1)  # sform_code 1
    singular.write_bytes(bytes(raw))
    nan = np.full((4, 4, 3), np.nan, np.float32)
    nibabel.save(nibabel.Nifti1Image(nan, np.eye(4)), str(tmp_path / "nan.nii.gz"))
    partly = np.random.default_rng(0).random((4, 4, 3)).astype(np.float32)
    partly[:, :, 0] = np.nan
    nibabel.save(nibabel.Nifti1Image(partly, np.eye(4)), str(tmp_path / "partly.nii.gz"))

    skips = SkipReport()
    found = find_series(tmp_path, KEYS, skips)
    assert [s.key for s in found] == ["nan.nii.gz", "partly.nii.gz"]
    assert [(e.id, e.reason) for e in skips.entries] == [("singular.nii", "broken NIfTI header")]
    embedded = embed_series(BrightnessEncoder(), found, UnitOptions(slices=3), skips=skips, progress=False)
    assert [(e.id, e.reason) for e in skips.entries[1:]] == [("nan.nii.gz", "no finite voxels")]
    [partial] = embedded
    assert partial.slice_keys == ["partly.nii.gz#1", "partly.nii.gz#2"] and np.isfinite(partial.vector).all()


def test_damaged_dicomdir_is_one_error_and_missing_files_are_counted_quietly(tmp_path):
    """Junk or truncated DICOMDIR: one ``StudiesError`` naming it (was InvalidDicomError / KeyError). A DICOMDIR
    whose files are gone: each a ``missing file`` skip, no pydicom warning (they print the paths)."""
    import shutil
    import warnings

    from pydicom.data import get_testdata_file

    from fuselip_med.data.studies import StudiesError

    source = Path(get_testdata_file("DICOMDIR"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "DICOMDIR").write_bytes(b"\x00" * 128 + b"DICM" + b"junk" * 50)
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "DICOMDIR").write_bytes(source.read_bytes()[:3000])
    for name in ("junk", "cut"):
        with pytest.raises(StudiesError, match=f"^{tmp_path / name / 'DICOMDIR'}: not a readable DICOMDIR"):
            find_series(tmp_path / name / "DICOMDIR", KEYS)
    (tmp_path / "alone" / "Doe_John").mkdir(parents=True)
    shutil.copy(source, tmp_path / "alone" / "Doe_John" / "DICOMDIR")
    skips = SkipReport()
    with warnings.catch_warnings(record=True) as shown, pytest.raises(StudiesError, match="no usable series"):
        warnings.simplefilter("always")
        find_series(tmp_path / "alone" / "Doe_John" / "DICOMDIR", KEYS, skips)
    assert set(_reasons(skips)) == {"missing file"} and skips.total > 20
    pydicom_warnings = [str(w.message) for w in shown if issubclass(w.category, UserWarning)]  # not GC's
    assert not pydicom_warnings, pydicom_warnings
    assert not any("Doe_John" in e.id + e.source + e.detail for e in skips.entries)


def test_nothing_embedded_names_the_series_and_reasons_and_writes_the_list(tmp_path):
    """A series whose sampled slice is truncated: ``index build`` and ``embed`` end with one error line giving the
    reasons with example keys (``SkipReport.summary()``) and the skipped.csv they wrote (was a bare 'no series
    could be embedded; nothing was written.')."""
    import csv

    import torch
    from typer.testing import CliRunner

    from fuselip_med.cli import app
    from fuselip_med.core.fuselip import FuseLIP, FuseLIPConfig
    from fuselip_med.core.pretrained import save_pretrained
    from tests.study_helpers import ct_slice

    made = ct_series(tmp_path / "exam", n=3, study_uid="1.7.1", series_uid="1.7.1.1")
    ct_slice(made["files"][0.0], 0.0, study_uid="1.7.1", series_uid="1.7.1.1", instance_number=3, truncate=True)
    torch.manual_seed(0)
    save_pretrained(FuseLIP(FuseLIPConfig.from_size("tiny")).eval(), tmp_path / "tiny")
    runner = CliRunner()
    common = ["-m", str(tmp_path / "tiny"), "-i", str(tmp_path / "exam"), "--unit", "series", "--slices", "2",
              "--device", "cpu"]
    built = runner.invoke(app, ["index", "build", *common, "-o", str(tmp_path / "index")])
    embedded = runner.invoke(app, ["embed", *common, "-o", str(tmp_path / "vectors.npy")])
    for result, listed in ((built, tmp_path / "index" / "skipped.csv"), (embedded, tmp_path / "vectors.skipped.csv")):
        text = "".join(result.output.split())  # rich wraps the line anywhere
        assert result.exit_code == 1 and "Traceback" not in text, result.output
        [row] = list(csv.DictReader(listed.open()))
        assert row["id"].startswith("se-") and row["reason"] == "truncated image"
        assert f"noseriescouldbeembedded(skipped1of1series:1truncatedimage(e.g.{row['id']}))" in text
        assert f"namedin{listed}" in text

    (tmp_path / "nothing").mkdir()  # no usable series at all: the list is written too
    (tmp_path / "nothing" / "notes.txt").write_text("not DICOM")
    common[3] = str(tmp_path / "nothing")
    built = runner.invoke(app, ["index", "build", *common, "-o", str(tmp_path / "index2")])
    embedded = runner.invoke(app, ["embed", *common, "-o", str(tmp_path / "v2.npy")])
    for result, listed in ((built, tmp_path / "index2" / "skipped.csv"), (embedded, tmp_path / "v2.skipped.csv")):
        text = "".join(result.output.split())
        assert result.exit_code == 1 and "Traceback" not in text, result.output
        [row] = list(csv.DictReader(listed.open()))
        assert row["reason"] == "not a DICOM image"
        assert f"nousableseries(noseriesfound;filesleftout:1notaDICOMimage(e.g.{row['id']})).Namedin{listed}." in text


def test_summary_counts_series_apart_from_slices_and_files_and_keeps_hints(tmp_path):
    """ONE series with a duplicate position and a gap is 1 skipped series plus slices left out (was 'skipped 2 of
    2 series'); files that are not DICOM are not series; the InstanceNumber note shows when nothing is skipped."""
    import pydicom

    from tests.study_helpers import ct_slice

    made = ct_series(tmp_path / "dupgap", n=6, study_uid="1.8.1", series_uid="1.8.1.1")
    ct_slice(tmp_path / "dupgap" / "COPY", 2.5, study_uid="1.8.1", series_uid="1.8.1.1", instance_number=40)
    os.remove(made["files"][5.0])  # 0, 2.5, 7.5, ...: a gap
    (tmp_path / "dupgap" / "notes.txt").write_text("not DICOM")
    skips = SkipReport()
    with pytest.raises(Exception, match="no usable series"):
        find_series(tmp_path / "dupgap", KEYS, skips)
    key = KEYS.key("1.8.1.1", "se-")
    file_key = KEYS.key(os.fspath(tmp_path / "dupgap" / "notes.txt"), "file-")
    assert skips.summary() == (f"skipped 1 of 1 series: 1 gap in slice spacing (e.g. {key}); files left out: 1 not "
                               f"a DICOM image (e.g. {file_key}); slices left out: 1 duplicate slice position "
                               f"(e.g. {key})")

    ct_series(tmp_path / "noipp", n=3, series_uid="1.8.2.1")
    for path in (tmp_path / "noipp").iterdir():
        ds = pydicom.dcmread(path)
        del ds.ImagePositionPatient
        ds.save_as(path)
    skips = SkipReport()
    find_series(tmp_path / "noipp", KEYS, skips)
    assert skips.summary() == (f"no series skipped (1 kept). series {KEYS.key('1.8.2.1', 'se-')}: ordered by "
                               "InstanceNumber: a slice lacks a usable ImagePositionPatient/ImageOrientationPatient")
    only_files = SkipReport()
    only_files.unit = "series"
    only_files.add("file-1", "input", "not a file", part="files")
    assert only_files.summary() == "no series found; files left out: 1 not a file (e.g. file-1)"


def test_duplicate_sop_instance_uid_keeps_one_slice_and_names_the_other(tmp_path):
    """Two files with one SOP Instance UID but other pixels/positions would share a slice key and a thumbnail file:
    the first (in walk order) is kept, the other is ``duplicate SOP Instance UID``; an identical copy likewise."""
    import shutil

    import pydicom

    made = ct_series(tmp_path / "exam", n=4, study_uid="1.9.1", series_uid="1.9.1.1")
    first, second = (made["files"][z] for z in (0.0, 5.0))
    ds = pydicom.dcmread(second)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.dcmread(first).SOPInstanceUID
    ds.save_as(second)
    shutil.copy(made["files"][7.5], tmp_path / "exam" / "ZZCOPY")
    skips = SkipReport()
    [series] = find_series(tmp_path, KEYS, skips)
    kept = sorted([first, second])[0]
    assert len(series) == 3 and len({s.key for s in series.slices}) == 3
    assert kept in [Path(s.source) for s in series.slices]
    assert [(e.id, e.reason, e.part) for e in skips.entries] == [
        (KEYS.key("1.9.1.1", "se-"), "duplicate SOP Instance UID", "slices")]
    assert skips.entries[0].detail.startswith("2 slice(s)")


NIFTI_RUN = """
import nibabel, numpy as np, sys
from fuselip_med.data.phi import Pseudonyms
from fuselip_med.data.studies import find_series
from fuselip_med.data.volumes import render_slice
nibabel.save(nibabel.Nifti1Image(np.arange(60, dtype=np.int16).reshape(3, 4, 5), np.eye(4)), sys.argv[1])
[series] = find_series(sys.argv[1], Pseudonyms.fresh())
print(sorted({render_slice(ref).shape for ref in series.slices}))
"""


def test_reading_a_nifti_series_prints_nothing_but_its_result(tmp_path):
    """No ``nvImageCodec is not available`` line and no raw MONAI UserWarning on a NIfTI run (a fresh process:
    the noise came once per process, from MONAI's reader registration)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", NIFTI_RUN, os.fspath(tmp_path / "v.nii.gz")], capture_output=True,
                          text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert (done.stdout, done.stderr) == ("[(4, 3)]\n", "")


def test_two_nifti_files_of_one_name_keep_one_series_key(tmp_path):
    """NIfTI series are keyed by file name (CT-RATE's VolumeName): a second ``v.nii.gz`` in another folder would
    repeat the series and slice keys (and thumbnail files), so it is named ``duplicate volume name``."""
    import nibabel
    import numpy as np

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        nibabel.save(nibabel.Nifti1Image(np.zeros((4, 4, 3), np.int16), np.eye(4)), str(tmp_path / folder / "v.nii.gz"))
    skips = SkipReport()
    [series] = find_series(tmp_path, KEYS, skips)
    assert series.slices[0].source == os.fspath(tmp_path / "a" / "v.nii.gz")
    assert [(e.id, e.reason) for e in skips.entries] == [("v.nii.gz", "duplicate volume name")]


def test_multi_window_rendering_of_nan_voxels_is_black_without_a_cast_warning(tmp_path):
    """NaN voxels of a NIfTI slice rendered ``multi`` become 0 in every channel (was NaN cast to uint8: undefined
    values and a RuntimeWarning printed mid-run)."""
    import warnings

    import nibabel
    import numpy as np

    from fuselip_med.data.volumes import Rendering, render_slice

    data = np.full((4, 4, 3), 40.0, np.float32)
    data[0, 0, :] = np.nan
    nibabel.save(nibabel.Nifti1Image(data, np.eye(4)), str(tmp_path / "v.nii.gz"))
    [series] = find_series(tmp_path / "v.nii.gz", KEYS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = render_slice(series.slices[1], Rendering.parse("multi"))
    assert image.shape == (4, 4, 3) and (image[3, 3] == 0).all() and (image[0, 0] > 0).all()


def test_a_series_that_fails_is_not_counted_as_embedded_here_or_elsewhere(tmp_path):
    """One good series and one whose sampled slice is truncated: the build said "embedded 2 series (+-1 from an
    interrupted run)" (the failed series was counted as embedded). Now: embedded 1, +0."""
    import torch
    from typer.testing import CliRunner

    from fuselip_med.cli import app
    from fuselip_med.core.fuselip import FuseLIP, FuseLIPConfig
    from fuselip_med.core.pretrained import save_pretrained
    from tests.study_helpers import ct_slice

    ct_series(tmp_path / "exam" / "good", n=3, study_uid="1.8.1", series_uid="1.8.1.1")
    bad = ct_series(tmp_path / "exam" / "bad", n=3, study_uid="1.8.2", series_uid="1.8.2.1")
    ct_slice(bad["files"][0.0], 0.0, study_uid="1.8.2", series_uid="1.8.2.1", instance_number=3, truncate=True)
    torch.manual_seed(0)
    save_pretrained(FuseLIP(FuseLIPConfig.from_size("tiny")).eval(), tmp_path / "tiny")
    built = CliRunner().invoke(app, ["index", "build", "-m", str(tmp_path / "tiny"), "-i", str(tmp_path / "exam"),
                                     "--unit", "series", "--slices", "2", "--device", "cpu", "-o",
                                     str(tmp_path / "index")])
    text = " ".join(built.output.split())
    assert built.exit_code == 0, built.output
    assert "embedded 1 series (+0 from an interrupted run)" in text and "+-" not in text
