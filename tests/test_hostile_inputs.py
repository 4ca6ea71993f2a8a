"""Faults found by attacking studies, de-identification, PACS options and the page with hostile, malformed and
identifying inputs: identifiers in side doors (library error texts quoting patient-named folders, file meta
information, UIDs dicognito keeps), silent loss in `data deidentify` (duplicate UIDs, reruns, nested folders),
wrong numbers from non-finite headers (slice order, rescale, window), header bombs (frame counts) and tracebacks
from option values (DICOMweb URLs, viewer URL templates)."""
from __future__ import annotations

import nibabel
import numpy as np
import pytest

from fuselip_med.data.images import ImageDecodeError
from fuselip_med.data.phi import Pseudonyms
from fuselip_med.data.skips import SkipReport
from fuselip_med.data.studies import find_series
from fuselip_med.data.volumes import read_nifti_slice

PATIENT_FOLDER = "Doe_John_19230101"


def _broken_niftis(folder):
    folder.mkdir(parents=True)
    nibabel.save(nibabel.Nifti1Image(np.zeros((4, 4, 3), np.float32), np.eye(4)), folder / "whole.nii.gz")
    (folder / "cut.nii.gz").write_bytes((folder / "whole.nii.gz").read_bytes()[:20])
    (folder / "junk.nii").write_bytes(b"x" * 100)
    (folder / "notgz.nii.gz").write_bytes(b"x" * 400)


def test_broken_nifti_header_details_do_not_quote_the_patient_folder(tmp_path):
    _broken_niftis(tmp_path / "export" / PATIENT_FOLDER)
    skips = SkipReport()
    found = find_series(tmp_path / "export", Pseudonyms.fresh(), skips)
    assert [s.key for s in found] == ["whole.nii.gz"]
    written = (tmp_path / "skipped.csv")
    skips.write_csv(written)
    text = written.read_text()
    assert text.count("broken NIfTI header") == 3, text
    assert PATIENT_FOLDER not in text and str(tmp_path) not in text


def test_a_nifti_slice_that_cannot_be_read_does_not_quote_its_path(tmp_path):
    _broken_niftis(tmp_path / PATIENT_FOLDER)
    path = tmp_path / PATIENT_FOLDER / "whole.nii.gz"
    path.unlink()  # removed between listing and reading
    with pytest.raises(ImageDecodeError) as caught:
        read_nifti_slice(str(path), 2, 0)
    assert caught.value.reason == "broken NIfTI" and caught.value.detail
    assert PATIENT_FOLDER not in caught.value.detail


def test_decode_error_details_never_carry_the_path_in_any_spelling(tmp_path):
    folder = tmp_path / PATIENT_FOLDER
    folder.mkdir()
    (tmp_path / "link").symlink_to(folder)
    path = tmp_path / "link" / "IM0001"
    error = ImageDecodeError("unreadable file", str(path), f"[Errno 13] Permission denied: '{folder / 'IM0001'}'")
    assert PATIENT_FOLDER not in error.detail and "<file>" in error.detail
    assert error.__reduce__()[1][2] == error.detail


def test_deidentified_files_drop_the_source_file_meta_ae_titles_and_private_information(tmp_path):
    import pydicom
    from typer.testing import CliRunner

    from fuselip_med.cli import app
    from tests.study_helpers import ct_series

    made = ct_series(tmp_path / "in", n=2, canary="QZXCANARY")
    for path in made["files"].values():
        ds = pydicom.dcmread(path)
        ds.file_meta.SourceApplicationEntityTitle = "QZXSTATION"
        ds.file_meta.SendingApplicationEntityTitle = "QZXSENDER"
        ds.file_meta.ImplementationVersionName = "QZXIMPL"
        ds.file_meta.PrivateInformationCreatorUID = "1.2.3.4"
        ds.file_meta.PrivateInformation = b"QZXPRIVATE"
        ds.save_as(path, enforce_file_format=True)
    result = CliRunner().invoke(app, ["data", "deidentify", str(tmp_path / "in"), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    written = sorted((tmp_path / "out").rglob("*.dcm"))
    assert len(written) == 2
    for path in written:
        assert b"QZX" not in path.read_bytes()
        ds = pydicom.dcmread(path)
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
        assert ds.pixel_array.shape == (ds.Rows, ds.Columns)


@pytest.mark.parametrize(("keyword", "value"), [("ImagePositionPatient", ["0", "0", "NaN"]),
                                                ("ImagePositionPatient", ["0", "inf", "0"]),
                                                ("ImageOrientationPatient", ["0", "0", "0", "0", "0", "0"]),
                                                ("ImageOrientationPatient", ["1", "0", "0", "1", "0", "0"])])
def test_a_non_finite_position_or_degenerate_orientation_falls_back_to_instance_number(tmp_path, keyword, value):
    """A NaN position sorted the slices arbitrarily (and hid gaps); zero or parallel cosines put every slice at 0 mm.
    Either is now a slice without a usable position: the InstanceNumber order, named in the hints."""
    import pydicom
    from pydicom.dataelem import DataElement

    from tests.study_helpers import ct_series

    made = ct_series(tmp_path / "series", n=6)
    broken = made["files"][sorted(made["files"])[2]]
    ds = pydicom.dcmread(broken)
    ds[keyword] = DataElement(ds[keyword].tag, "DS", value)
    ds.save_as(broken)
    skips = SkipReport()
    (series,) = find_series(tmp_path / "series", Pseudonyms.fresh(), skips)
    assert series.ordered_by == "InstanceNumber" and len(series) == 6
    assert [s.instance_number for s in series.slices] == [1, 2, 3, 4, 5, 6]
    assert "ordered by InstanceNumber" in skips.summary()


def _ct_with(tmp_path, **header):
    import pydicom
    from pydicom.dataelem import DataElement

    from tests.study_helpers import ct_series

    made = ct_series(tmp_path / "one", n=2)
    path = made["files"][sorted(made["files"])[0]]
    ds = pydicom.dcmread(path)
    for keyword, value in header.items():
        tag = pydicom.datadict.tag_for_keyword(keyword)
        ds[tag] = DataElement(tag, "DS", value)
    ds.save_as(path)
    return str(path)


@pytest.mark.parametrize("header", [{"RescaleSlope": "NaN"}, {"RescaleSlope": "inf"}, {"RescaleIntercept": "NaN"}])
def test_a_non_finite_rescale_is_a_named_corrupt_image_not_a_blank_one(tmp_path, header):
    """A NaN slope made every HU NaN: a black tile was embedded (image unit) and a NaN slice rendered black."""
    from fuselip_med.data.images import dicom_modality_values, load_image

    path = _ct_with(tmp_path, **header)
    for read in (load_image, dicom_modality_values):
        with pytest.raises(ImageDecodeError) as caught:
            read(path)
        assert caught.value.reason == "corrupt image" and "RescaleSlope/RescaleIntercept" in caught.value.detail


def test_a_non_finite_window_falls_back_to_min_max_and_says_so(tmp_path):
    """A NaN WindowWidth windowed every pixel to 0: a black image, silently."""
    from fuselip_med.data.images import DecodeFallbackWarning, load_image

    path = _ct_with(tmp_path, WindowCenter="40", WindowWidth="NaN")
    with pytest.warns(DecodeFallbackWarning, match="not a finite number"):
        pixels = np.asarray(load_image(path).convert("L"))
    assert pixels.min() == 0 and pixels.max() == 255


def test_deidentify_names_a_second_file_with_an_earlier_sop_instance_uid_instead_of_replacing_its_copy(tmp_path):
    """The same export twice, or another image with a reused SOP Instance UID: the copies were written to one name,
    so 'Wrote 7 files' left 3 on disk."""
    import shutil

    import pydicom
    from typer.testing import CliRunner

    from fuselip_med.cli import app
    from tests.study_helpers import ct_series

    made = ct_series(tmp_path / "in" / "a", n=3)
    shutil.copytree(tmp_path / "in" / "a", tmp_path / "in" / "copy")
    ds = pydicom.dcmread(sorted(made["files"].values())[0])
    ds.ImagePositionPatient = [0, 0, 99]
    ds.save_as(tmp_path / "in" / "clash.dcm")
    result = CliRunner().invoke(app, ["data", "deidentify", str(tmp_path / "in"), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "out").rglob("*.dcm"))) == 3
    assert "Wrote 3 de-identified DICOM files" in result.output and "4 duplicate SOP Instance UID" in result.output


@pytest.mark.parametrize("out", [".", "deid", "..", "IM_single_parent"])
def test_deidentify_refuses_an_output_that_overlaps_the_input(tmp_path, out):
    """`data deidentify export export --overwrite` wrote the copies among the identified files (and a folder
    shared as 'de-identified' still held every original); an output inside the input is read again by the next run."""
    from typer.testing import CliRunner

    from fuselip_med.cli import app
    from tests.study_helpers import ct_series

    made = ct_series(tmp_path / "export" / "series", n=2)
    src = tmp_path / "export" / "series"
    if out == "IM_single_parent":
        src, target = sorted(made["files"].values())[0], tmp_path / "export" / "series"
    else:
        target = {".": src, "deid": src / "deid", "..": tmp_path / "export"}[out]
    result = CliRunner().invoke(app, ["data", "deidentify", str(src), str(target), "--overwrite"])
    assert result.exit_code == 1 and result.output.startswith("error: ") and "outside the input" in result.output
    assert not list(target.rglob("*/*/*.dcm"))


def test_deidentify_shows_progress_over_every_file(tmp_path, monkeypatch):
    """A PACS export of thousands of files ran without any sign of progress (the CLI's rule for long work)."""
    from contextlib import contextmanager

    import fuselip_med.data.deidentify as deidentify
    from tests.study_helpers import ct_series

    ct_series(tmp_path / "in", n=3)
    (tmp_path / "in" / "notes.txt").write_text("x")
    seen = []

    class Recorder:
        def advance(self, n: float = 1) -> None:
            seen.append(n)

    @contextmanager
    def recording_bar(total, description, **options):
        seen.append(("total", total))
        yield Recorder()

    monkeypatch.setattr(deidentify, "progress_bar", recording_bar)
    report = deidentify.deidentify_folder(tmp_path / "in", tmp_path / "out")
    assert report.written == 3 and seen == [("total", 4), 1, 1, 1, 1]


@pytest.mark.parametrize("bad", ["s={", "s={study", "s={study!x}", "s={study:{series}}", "s={study:>80}"])
def test_a_viewer_url_with_unbalanced_braces_or_a_field_format_is_one_error_line(tmp_path, bad):
    """Unbalanced braces were a traceback of `serve`; a conversion or format spec passed the check and then failed
    (or changed the UID) when each page link was filled."""
    from typer.testing import CliRunner

    from fuselip_med.cli import app
    from fuselip_med.search.pacs import ViewerUrlError, check_viewer_url

    with pytest.raises(ViewerUrlError):
        check_viewer_url(f"https://pacs.example.org/viewer?{bad}")
    assert check_viewer_url("https://pacs/v?q={{x}}&s={study}").format(study="1.2") == "https://pacs/v?q={x}&s=1.2"
    result = CliRunner().invoke(app, ["serve", "--index", str(tmp_path), "--viewer-url",
                                      f"https://pacs.example.org/viewer?{bad}"])
    assert result.exit_code == 1 and result.output.startswith("error: --viewer-url"), result.output


def test_deidentify_rerun_over_an_earlier_output_needs_its_seed_and_then_rewrites_in_place(tmp_path):
    """An interrupted run rerun with --overwrite (as the message said) and a new random seed wrote every instance
    again under new UIDs beside the first copies: each instance twice, as two studies."""
    from typer.testing import CliRunner

    from fuselip_med.cli import app
    from tests.study_helpers import ct_series

    ct_series(tmp_path / "in", n=3)
    runner = CliRunner()
    command = ["data", "deidentify", str(tmp_path / "in"), str(tmp_path / "out")]
    assert runner.invoke(app, [*command, "--seed", "s3cret"]).exit_code == 0
    result = runner.invoke(app, [*command, "--overwrite"])
    assert result.exit_code == 1 and "pass the same --seed" in result.output
    result = runner.invoke(app, [*command, "--overwrite", "--seed", "s3cret"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "out").rglob("*.dcm"))) == 3


def test_deidentify_leaves_no_annex_e_uid_unchanged():
    """dicognito keeps some Annex E UIDs as they are (Manufacturer's Device Class UID); the Annex E pass kept every
    UID on the assumption that dicognito had remapped it."""
    from dicognito.anonymizer import Anonymizer
    from pydicom.datadict import dictionary_VR
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import generate_uid

    from fuselip_med.data.deidentify import deidentify_dataset
    from fuselip_med.data.phi import ANNEX_E_TAGS

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    planted = {}
    for tag in ANNEX_E_TAGS:
        try:
            if dictionary_VR(tag) == "UI":
                planted[tag] = generate_uid()
                ds.add_new(tag, "UI", planted[tag])
        except KeyError:  # retired or unknown to pydicom's dictionary
            continue
    assert len(planted) > 50 and 0x0018100B in planted
    deidentify_dataset(ds, Anonymizer())
    assert not [hex(tag) for tag, uid in planted.items() if tag in ds and str(ds[tag].value) == uid]
    assert str(ds.SOPInstanceUID) != planted[0x00080018] and "StudyInstanceUID" in ds


def test_a_header_declaring_more_frames_than_any_object_has_is_a_named_skip_without_a_record_per_frame(tmp_path):
    """An encapsulated object may hold 1 frame per 8 bytes by its size alone: an 8 MB file declaring a million frames
    cost a record each (1 GB, 40 s) and was kept as a million-slice series."""
    import time

    import pydicom
    from pydicom.data import get_testdata_file

    from fuselip_med.data.studies import MAX_FRAMES, StudiesError

    ds = pydicom.dcmread(get_testdata_file("JPEG2000.dcm"))
    ds.PixelData = ds.PixelData + b"\x00" * (8 * (MAX_FRAMES + 8))
    ds.NumberOfFrames = MAX_FRAMES + 1
    (tmp_path / "in").mkdir()
    ds.save_as(tmp_path / "in" / "cine.dcm")
    skips = SkipReport()
    started = time.perf_counter()
    with pytest.raises(StudiesError, match="too many frames"):
        find_series(tmp_path / "in", Pseudonyms.fresh(), skips)
    assert time.perf_counter() - started < 5
