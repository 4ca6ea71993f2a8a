"""DICOM pixel semantics users rely on: padding left out of automatic windowing, modality-unit values (HU),
fallbacks reported once per file, DICOM recognised by content (PS3.10 preamble or none) whatever its name."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from fuselip_med.data.images import (
    DecodeFallbackWarning,
    ImageDecodeError,
    dicom_modality_values,
    image_kind,
    load_image,
    padding_mask,
)

BANDS = (-1000, 0, 1000)  # HU of the three tissue bands


def padded_ct_hu() -> np.ndarray:
    """8x12 CT slice in HU: a 2-pixel border of padding (-2000) around three vertical bands."""
    hu = np.full((8, 12), -2000, np.int32)
    for i, value in enumerate(BANDS):
        hu[2:6, 2 + 3 * i: 5 + 3 * i] = value
    hu[2:6, 11] = -2000
    return hu


def ct_dataset(stored: np.ndarray, *, intercept: float = 0.0, signed: bool = True, frames: int = 1) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.Rows, ds.Columns = stored.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, int(signed)
    ds.RescaleIntercept, ds.RescaleSlope = intercept, 1
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = stored.astype(np.int16 if signed else np.uint16).tobytes()
    return ds


def write(ds: Dataset, path: Path, preamble: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if preamble:
        ds.save_as(path, enforce_file_format=True)
    else:  # a headless data set, as some scanners and PACS exports write them
        del ds.file_meta
        pydicom.dcmwrite(path, ds, enforce_file_format=False, implicit_vr=True, little_endian=True)
    return path


def band_values(image) -> list[int]:
    array = np.asarray(image)
    return [int(array[3, 3 + 3 * i]) for i in range(3)]


def test_padding_value_is_left_out_of_min_max(tmp_path):
    hu = padded_ct_hu()
    ds = ct_dataset(hu)
    ds.add_new(0x00280120, "SS", -2000)  # PixelPaddingValue
    path = write(ds, tmp_path / "padded.dcm")
    image = np.asarray(load_image(path))
    assert band_values(image) == pytest.approx([0, 128, 255], abs=2)
    assert (image[hu == -2000] == 0).all()  # padding shown black
    without = ct_dataset(hu)  # the same slice without the padding declaration: the bands are squeezed up
    assert band_values(load_image(write(without, tmp_path / "plain.dcm"))) == pytest.approx([85, 170, 255], abs=1)


def test_padding_range_limit_in_stored_units(tmp_path):
    hu = padded_ct_hu()
    hu[0, :6] = -1900  # a second padding value inside the declared range
    stored = hu + 1024  # rescale intercept -1024: padding stored as -976 (and -876), bands 24/1024/2024
    ds = ct_dataset(stored, intercept=-1024)
    ds.add_new(0x00280120, "SS", -976)   # PixelPaddingValue (stored units)
    ds.add_new(0x00280121, "SS", -876)   # PixelPaddingRangeLimit
    path = write(ds, tmp_path / "range.dcm")
    assert padding_mask(stored, pydicom.dcmread(path)).sum() == int((hu <= -1900).sum())
    assert band_values(load_image(path)) == pytest.approx([0, 128, 255], abs=2)
    values = dicom_modality_values(path)
    assert values.dtype == np.float32 and values.shape == (8, 12)
    assert [values[3, 3 + 3 * i] for i in range(3)] == [-1000.0, 0.0, 1000.0]  # HU after the rescale
    assert values[1, 0] == -2000.0 and values[0, 1] == -1900.0


def test_modality_values_choose_frames_and_read_bytes_and_colour(tmp_path):
    frames = np.stack([np.full((4, 5), v, np.int16) for v in (10, 20, 30)])
    path = write(ct_dataset(frames, intercept=-5, frames=3), tmp_path / "multi.dcm")
    assert dicom_modality_values(path).tolist() == np.full((4, 5), 15.0).tolist()  # middle frame by default
    assert dicom_modality_values(path.read_bytes(), frame=0)[0, 0] == 5.0
    with pytest.raises(ImageDecodeError, match="frame out of range"):
        dicom_modality_values(path, frame=3)
    rgb = pydicom.data.get_testdata_file("SC_rgb.dcm", download=False)
    if rgb is None:
        pytest.skip("pydicom test file SC_rgb.dcm is not installed")
    colour = dicom_modality_values(rgb)
    assert colour.dtype == np.float32 and colour.shape == (100, 100, 3)
    assert colour.tolist() == pydicom.dcmread(rgb).pixel_array.astype(np.float32).tolist()


def test_unusable_window_falls_back_with_one_warning_per_file(tmp_path):
    ds = ct_dataset(np.arange(16, dtype=np.int16).reshape(4, 4))
    ds.WindowCenter, ds.WindowWidth = 0, 0  # width 0 cannot be used (PS3.3 C.11.2.1.2.1: width >= 1)
    path = write(ds, tmp_path / "badwindow.dcm")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = np.asarray(load_image(path))
        load_image(path)
    fallbacks = [w for w in caught if issubclass(w.category, DecodeFallbackWarning)]
    assert len(fallbacks) == 1 and str(path) in str(fallbacks[0].message) and "window" in str(fallbacks[0].message)
    assert first[0, 0] == 0 and first[3, 3] == 255  # min-max instead


def test_window_given_for_a_colour_dicom_is_reported(tmp_path):
    from fuselip_med.data.images import DecodeOptions

    rgb = pydicom.data.get_testdata_file("SC_rgb.dcm", download=False)
    if rgb is None:
        pytest.skip("pydicom test file SC_rgb.dcm is not installed")
    copy = tmp_path / "colour.dcm"
    copy.write_bytes(Path(rgb).read_bytes())
    with pytest.warns(DecodeFallbackWarning, match="colour.dcm: a window applies to greyscale images only"):
        load_image(copy, DecodeOptions(window="lung"))


@pytest.mark.parametrize("name", ["IM000001", "slice.IMA", "scan.dicom", "ok.dcm"])
def test_dicom_recognised_by_content_whatever_its_name(tmp_path, name):
    path = write(ct_dataset(padded_ct_hu()), tmp_path / name)
    assert image_kind(path) == "dicom"
    assert band_values(load_image(path))[1] > band_values(load_image(path))[0]


def test_dicom_without_preamble_is_found_and_decoded(tmp_path):
    hu = padded_ct_hu()
    path = write(ct_dataset(hu), tmp_path / "IM000002", preamble=False)
    assert path.read_bytes()[128:132] != b"DICM"
    assert image_kind(path) == "dicom"
    assert dicom_modality_values(path).tolist() == hu.astype(np.float32).tolist()
    (tmp_path / "README.txt").write_text("Exported by the PACS.\n")
    assert image_kind(tmp_path / "README.txt") is None
