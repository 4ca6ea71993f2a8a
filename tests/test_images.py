"""fuselip_med.data.images: reference parity for 8-bit files, DICOM (real pydicom test files in many transfer
syntaxes, synthetic CT for windowing), 16-bit/float inputs, resize modes and decode errors."""
from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image, ImageFile
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_modality_lut, get_decoder, pixel_array
from pydicom.uid import (
    MPEG4HP41,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from fuselip_med.core.image_preprocess import ImagePreprocess
from fuselip_med.data.images import (
    WINDOW_PRESETS,
    DecodeOptions,
    ImageDecodeError,
    apply_window,
    decode_image,
    is_dicom,
    load_image,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about its odd test files


def dicom_file(name: str) -> str:
    """A pydicom (or pydicom-data) test file, never downloaded; skip where it is not installed."""
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not installed (pip install pydicom-data)")
    return path


def pixels(source, **options) -> np.ndarray:
    """load_image as an int array (native size, 8-bit)."""
    return np.asarray(load_image(source, DecodeOptions(**options))).astype(np.int64)


def assert_model_input(tensor: torch.Tensor, size: int = 256) -> None:
    assert tensor.shape == (3, size, size) and tensor.dtype == torch.float32
    assert float(tensor.min()) >= 0.0 and float(tensor.max()) <= 1.0


# ------------------------------------------------------------------------------------ reference parity
def _rng_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, width, dtype=np.float64)[None, :, None] * np.ones((height, 1, 3))
    return np.clip(base + rng.normal(0, 40, (height, width, 3)), 0, 255).astype(np.uint8)


def _write_8bit(tmp_path, kind: str):
    rgb = _rng_rgb(90, 130)
    if kind == "L.png":
        image = Image.fromarray(rgb[:, :, 0])
    elif kind == "RGB.png":
        image = Image.fromarray(rgb)
    elif kind == "RGBA.png":
        alpha = np.tile(np.linspace(0, 255, 130, dtype=np.uint8), (90, 1))
        image = Image.fromarray(np.dstack([rgb, alpha]))
    elif kind == "LA.png":
        image = Image.fromarray(np.dstack([rgb[:, :, 0], rgb[:, :, 1]]), "LA")
    elif kind == "P.png":
        image = Image.fromarray(rgb).quantize(colors=37)
        image.info["transparency"] = 3
    elif kind == "1.png":
        image = Image.fromarray(rgb[:, :, 0]).convert("1")
    elif kind == "RGB.jpg":
        image = Image.fromarray(rgb)
    elif kind == "L.jpg":
        image = Image.fromarray(rgb[:, :, 1])
    else:  # pragma: no cover
        raise AssertionError(kind)
    path = tmp_path / f"image_{kind}"
    image.save(path)
    with Image.open(path) as check:
        assert check.mode == kind.split(".")[0]  # the file really stores the mode under test
    return path


KINDS = ["L.png", "RGB.png", "RGBA.png", "LA.png", "P.png", "1.png", "RGB.jpg", "L.jpg"]


@pytest.mark.parametrize("kind", KINDS)
def test_8bit_files_match_the_reference_pipeline_bit_for_bit(tmp_path, kind):
    path = _write_8bit(tmp_path, kind)
    reference = ImagePreprocess()(Image.open(path))
    assert torch.equal(decode_image(path), reference)
    assert torch.equal(decode_image(str(path)), reference)
    assert torch.equal(decode_image(path.read_bytes()), reference)
    assert torch.equal(decode_image(Image.open(path)), reference)
    assert_model_input(reference)


@pytest.mark.parametrize("kind", ["RGB.png", "P.png", "RGBA.png"])
def test_training_crop_matches_the_reference_with_the_same_generator(tmp_path, kind):
    path = _write_8bit(tmp_path, kind)
    ours = decode_image(path, train=True, generator=torch.Generator().manual_seed(7))
    reference = ImagePreprocess(train=True)(Image.open(path), torch.Generator().manual_seed(7))
    assert torch.equal(ours, reference)
    assert not torch.equal(ours, decode_image(path))


def test_palette_and_rgba_are_resized_in_their_own_mode_not_converted_first(tmp_path):
    # Converting first would give a different (bicubic instead of nearest / non-premultiplied) result.
    for kind in ("P.png", "RGBA.png"):
        path = _write_8bit(tmp_path, kind)
        converted_first = ImagePreprocess()(Image.open(path).convert("RGB"))
        assert not torch.equal(decode_image(path), converted_first)


def test_uint8_arrays_match_the_reference_on_the_same_pil_image():
    rgb = _rng_rgb(70, 50)
    for array, image in ((rgb, Image.fromarray(rgb)), (rgb[:, :, 0], Image.fromarray(rgb[:, :, 0])),
                         (rgb[:, :, :1], Image.fromarray(rgb[:, :, 0]))):
        assert torch.equal(decode_image(array), ImagePreprocess()(image))


def test_load_image_returns_8bit_l_or_rgb_at_native_size(tmp_path):
    for kind, mode in [("L.png", "L"), ("1.png", "L"), ("LA.png", "L"), ("P.png", "RGB"), ("RGBA.png", "RGB")]:
        image = load_image(_write_8bit(tmp_path, kind))
        assert (image.mode, image.size) == (mode, (130, 90))
    ct = load_image(dicom_file("CT_small.dcm"))
    assert (ct.mode, ct.size) == ("L", (128, 128))


# ------------------------------------------------------------------------------------ 16-bit and float
def test_16bit_png_is_windowed_not_clipped(tmp_path):
    values = np.tile(np.arange(0, 4096, 16, dtype=np.uint16), (20, 1)) + 1000  # 1000..5080: all > 255
    path = tmp_path / "wide.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    out = pixels(path)
    assert out.min() == 0 and out.max() == 255  # min-max of the image, not a clip at 255
    expected = np.rint((values.astype(np.float64) - 1000) / 4080 * 255)
    assert np.abs(out - expected).max() <= 1
    assert np.all(np.diff(out[0]) >= 0) and len(np.unique(out)) > 200
    # an explicit window in stored units: [2000, 3000] -> [0, 255]
    windowed = pixels(path, window=(1000.0, 2500.0))
    assert windowed[0, values[0] <= 2000].max() == 0 and windowed[0, values[0] >= 3000].min() == 255
    assert_model_input(decode_image(path))


def test_float_images_and_arrays_are_windowed():
    values = np.linspace(-1000.0, 1000.0, 64 * 64, dtype=np.float32).reshape(64, 64)
    for source in (values, Image.fromarray(values, "F"), values.astype(np.int16)):
        out = pixels(source)
        assert out.min() == 0 and out.max() == 255
        lung = pixels(source, window="lung")  # [-1350, 150]: -1000 -> 0.233, 150+ -> 1
        assert abs(lung[0, 0] - round((-1000 + 1350) / 1500 * 255)) <= 1 and lung[-1, -1] == 255
    assert pixels(np.full((8, 8), 7.0)).max() == 0  # a constant image is black, no division by zero


# ------------------------------------------------------------------------------------ DICOM: real files
# One image stored in six transfer syntaxes: lossless decodes must be identical.
MR_SMALL = {
    "MR_small.dcm": "Explicit VR Little Endian",
    "MR_small_implicit.dcm": "Implicit VR Little Endian",
    "MR_small_bigendian.dcm": "Explicit VR Big Endian",
    "MR_small_RLE.dcm": "RLE Lossless",
    "MR_small_jp2klossless.dcm": "JPEG 2000 Image Compression (Lossless Only)",
    "MR_small_jpeg_ls_lossless.dcm": "JPEG-LS Lossless Image Compression",
}


@pytest.mark.parametrize("name", list(MR_SMALL))
def test_dicom_transfer_syntaxes_decode_identically(name):
    path = dicom_file(name)
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID.name == MR_SMALL[name]
    tensor = decode_image(path)
    assert_model_input(tensor)
    assert torch.equal(tensor, decode_image(dicom_file("MR_small.dcm")))
    assert torch.equal(tensor, decode_image(Path(path).read_bytes()))  # bytes sniffed as DICOM


# (file, reference file, max difference in 8-bit levels, syntax of the first file)
PAIRS = [
    ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb.dcm", 0, "JPEG Lossless, Non-Hierarchical, First-Order Prediction"),
    ("SC_rgb_rle.dcm", "SC_rgb.dcm", 0, "RLE Lossless"),
    ("SC_rgb_gdcm_KY.dcm", "SC_rgb.dcm", 0, "JPEG 2000 Image Compression"),
    ("SC_rgb_16bit.dcm", "SC_rgb.dcm", 0, "Explicit VR Little Endian"),  # 16-bit colour scaled to 8 bits
    ("SC_rgb_rle_32bit.dcm", "SC_rgb.dcm", 0, "RLE Lossless"),
    ("SC_rgb_jpeg.dcm", "SC_rgb_jpeg_dcmd.dcm", 1, "JPEG Baseline (Process 1)"),  # vs dcmtk's decode
    ("SC_rgb_dcmtk_+eb+cy+s4.dcm", "SC_rgb_dcmtk_ebcys4_dcmd.dcm", 1, "JPEG Baseline (Process 1)"),  # YBR
    ("SC_rgb_jls_lossy_line.dcm", "SC_rgb.dcm", 2, "JPEG-LS Lossy (Near-Lossless) Image Compression"),
    ("SC_ybr_full_uncompressed.dcm", "SC_rgb.dcm", 8, "Explicit VR Little Endian"),  # YBR_FULL -> RGB
    ("SC_ybr_full_422_uncompressed.dcm", "SC_rgb.dcm", 8, "Explicit VR Little Endian"),
    ("US1_J2KR.dcm", "US1_UNCR.dcm", 0, "JPEG 2000 Image Compression (Lossless Only)"),  # YBR_RCT
    ("US1_J2KI.dcm", "US1_UNCI.dcm", 0, "JPEG 2000 Image Compression"),  # YBR_ICT, same lossy data
    ("693_J2KR.dcm", "693_UNCR.dcm", 0, "JPEG 2000 Image Compression (Lossless Only)"),  # CT, signed
    ("693_J2KI.dcm", "693_UNCI.dcm", 0, "JPEG 2000 Image Compression"),
    ("MR2_J2KR.dcm", "MR2_UNCR.dcm", 0, "JPEG 2000 Image Compression (Lossless Only)"),
    ("JPEG2000.dcm", "JPEG2000_UNC.dcm", 0, "JPEG 2000 Image Compression"),
    ("OBXXXX1A_rle.dcm", "OBXXXX1A.dcm", 0, "RLE Lossless"),  # PALETTE COLOR
    ("OBXXXX1A_expb.dcm", "OBXXXX1A.dcm", 0, "Explicit VR Big Endian"),  # big-endian palette
]


@pytest.mark.parametrize("name,reference,tolerance,syntax", PAIRS, ids=[p[0] for p in PAIRS])
def test_dicom_variants_of_one_image_agree(name, reference, tolerance, syntax):
    path, reference_path = dicom_file(name), dicom_file(reference)
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID.name.startswith(syntax)
    ours, theirs = pixels(path), pixels(reference_path)
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= tolerance
    assert ours.max() - ours.min() > 100  # a real image, not a black frame


@pytest.mark.parametrize(
    "name", ["JPGExtended.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm", "image_dfl.dcm", "examples_ybr_color.dcm",
             "mlut_18.dcm", "vlut_04.dcm", "eCT_Supplemental.dcm", "gdcm-US-ALOKA-16.dcm"]
)
def test_other_dicom_syntaxes_and_luts_decode(name):
    # JPEG Extended 12-bit, 8-bit JPEG lossless, deflated, YBR_FULL_422 JPEG multi-frame, modality LUT,
    # VOI LUT, enhanced CT (functional groups), 16-bit segmented palette.
    image = load_image(dicom_file(name))
    assert image.mode in ("L", "RGB")
    spread = np.asarray(image).astype(int)
    assert spread.max() - spread.min() > 100
    assert_model_input(decode_image(dicom_file(name)))


def test_enhanced_ct_takes_rescale_from_the_functional_groups():
    path = dicom_file("eCT_Supplemental.dcm")  # enhanced CT: rescale only in SharedFunctionalGroupsSequence
    ds = pydicom.dcmread(path)
    assert "RescaleIntercept" not in ds
    transform = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    assert (float(transform.RescaleSlope), float(transform.RescaleIntercept)) == (1.0, -1024.0)
    hu = pixel_array(ds, index=1).astype(np.float64) - 1024.0  # 2 frames: middle = index 1
    expected = np.rint(np.clip((hu - (50 - 200)) / 400, 0, 1) * 255)
    assert np.abs(pixels(path, window="abdomen") - expected).max() <= 1


def test_monochrome1_is_inverted_after_windowing(tmp_path):
    path = dicom_file("RG3_UNCR.dcm")  # a real MONOCHROME1 radiograph with a window in the header
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    ds.PhotometricInterpretation = "MONOCHROME2"
    flipped = tmp_path / "rg3_mono2.dcm"
    ds.save_as(flipped)
    mono1, mono2 = pixels(path), pixels(flipped)
    assert np.abs(mono1 + mono2 - 255).max() <= 1
    assert mono1.std() > 20
    for window in ("bone", (4000.0, 2000.0)):  # explicit windows are inverted too
        assert np.abs(pixels(path, window=window) + pixels(flipped, window=window) - 255).max() <= 1


def test_multiframe_uses_the_middle_frame_by_default_and_honours_frame():
    path = dicom_file("emri_small.dcm")  # 10 frames, no window: min-max per frame
    ds = pydicom.dcmread(path)
    assert ds.NumberOfFrames == 10

    def expected(index):
        frame = pixel_array(ds, index=index).astype(np.float64)
        return np.rint((frame - frame.min()) / (frame.max() - frame.min()) * 255)

    assert np.array_equal(pixels(path), expected(5))
    assert np.array_equal(pixels(path, frame=0), expected(0))
    assert np.array_equal(pixels(path, frame=9), expected(9))
    assert not np.array_equal(pixels(path, frame=0), pixels(path))
    for variant in ("emri_small_RLE.dcm", "emri_small_big_endian.dcm", "emri_small_jpeg_2k_lossless.dcm",
                    "emri_small_jpeg_ls_lossless.dcm"):
        assert np.array_equal(pixels(dicom_file(variant), frame=3), expected(3))
    with pytest.raises(ImageDecodeError) as info:
        load_image(path, DecodeOptions(frame=10))
    assert info.value.reason == "frame out of range"


def test_multipage_pillow_files_use_the_first_page_unless_frame_is_given(tmp_path):
    pages = [Image.fromarray(np.full((20, 30), value, np.uint8)) for value in (10, 120, 240)]
    path = tmp_path / "pages.tif"
    pages[0].save(path, save_all=True, append_images=pages[1:])
    assert torch.equal(decode_image(path), ImagePreprocess()(Image.open(path)))  # reference: page 0
    assert pixels(path).max() == 10 and pixels(path, frame=2).max() == 240
    assert reason_of(path, frame=3) == "frame out of range"


def test_colour_multiframe_picks_the_frame():
    path = dicom_file("SC_rgb_rle_2frame.dcm")
    frames = pixel_array(pydicom.dcmread(path))
    assert frames.shape == (2, 100, 100, 3) and not np.array_equal(frames[0], frames[1])
    assert np.array_equal(pixels(path), frames[1])  # middle of 2 frames = index 1
    assert np.array_equal(pixels(path, frame=0), frames[0])
    assert np.array_equal(pixels(dicom_file("SC_rgb_2frame.dcm"), frame=0), frames[0])


# ------------------------------------------------------------------------------------ DICOM: synthetic CT
def write_ct(path, stored: np.ndarray, slope=1.0, intercept=-1024.0, photometric="MONOCHROME2",
             window=None, transfer_syntax=ExplicitVRLittleEndian, pixel_data: bytes | None = None):
    """A minimal CT written with pydicom; ``stored`` int16 values, HU = stored * slope + intercept."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = transfer_syntax
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowWidth, ds.WindowCenter = window
    ds.PixelData = pixel_data if pixel_data is not None else stored.astype("<i2").tobytes()
    if pixel_data is not None:
        ds["PixelData"].VR = "OB"
    if meta.TransferSyntaxUID.is_private:  # a made-up syntax: say how the data set itself is encoded
        ds.save_as(path, enforce_file_format=True, implicit_vr=False, little_endian=True)
    else:
        ds.save_as(path, enforce_file_format=True)
    return path


def hu_row(hu: list[float], slope=1.0, intercept=-1024.0) -> np.ndarray:
    return np.array([[(h - intercept) / slope for h in hu]] * 4, dtype=np.int16)


def test_window_presets_have_the_published_values():
    assert WINDOW_PRESETS == {
        "lung": (1500, -600), "mediastinum": (400, 40), "soft_tissue": (400, 40), "abdomen": (400, 50),
        "liver": (150, 30), "brain": (80, 40), "bone": (1800, 400),
    }
    values = np.array([-150.0, 50.0, 250.0, -1000.0, 1000.0])
    assert np.allclose(apply_window(values, 400, 50), [0.0, 0.5, 1.0, 0.0, 1.0])
    assert apply_window(values, 400, 50).dtype == np.float32


@pytest.mark.parametrize("preset", sorted(WINDOW_PRESETS))
@pytest.mark.parametrize("slope,intercept", [(1.0, -1024.0), (0.5, -1024.0)])
def test_presets_map_window_edges_to_black_and_white(tmp_path, preset, slope, intercept):
    width, level = WINDOW_PRESETS[preset]
    hu = [level - width / 2, level, level + width / 2, level - width, level + width]
    path = write_ct(tmp_path / "ct.dcm", hu_row(hu, slope, intercept), slope, intercept)
    row = pixels(path, window=preset)[0]
    assert row[0] == 0 and row[2] == 255  # level - width/2 -> black, level + width/2 -> white
    assert abs(row[1] - 127.5) <= 1  # level -> 0.5 (+-1/255)
    assert row[3] == 0 and row[4] == 255  # clipped outside the window
    inverted = pixels(write_ct(tmp_path / "ct1.dcm", hu_row(hu, slope, intercept), slope, intercept,
                               photometric="MONOCHROME1"), window=preset)[0]
    assert inverted[0] == 255 and inverted[2] == 0 and abs(inverted[1] - 127.5) <= 1
    tensor = decode_image(path, DecodeOptions(window=preset))
    assert_model_input(tensor)


def test_rescale_is_applied_before_windowing(tmp_path):
    hu = [-160.0, 40.0, 240.0]
    stored = hu_row(hu, slope=1.0, intercept=0.0)  # the same stored values read with an intercept...
    plain = pixels(write_ct(tmp_path / "a.dcm", stored, 1.0, 0.0), window=(400.0, 40.0))[0]
    shifted = pixels(write_ct(tmp_path / "b.dcm", stored, 1.0, -1024.0), window=(400.0, 40.0))[0]
    assert list(plain) == [0, 128, 255]
    assert list(shifted) == [0, 0, 0]  # ...are 1024 HU lower: all below the window
    ds = pydicom.dcmread(tmp_path / "b.dcm")
    assert np.allclose(apply_modality_lut(ds.pixel_array, ds)[0], [h - 1024 for h in hu])


def test_window_choice_explicit_then_file_then_min_max(tmp_path):
    hu = [-1000.0, -100.0, 0.0, 100.0, 1000.0]
    with_window = write_ct(tmp_path / "w.dcm", hu_row(hu), window=(200.0, 0.0))
    without = write_ct(tmp_path / "n.dcm", hu_row(hu))
    file_window = pixels(with_window)[0]  # the header's window (DICOM linear: c - 0.5, w - 1)
    assert file_window[0] == 0 and file_window[1] == 0 and abs(file_window[2] - 128) <= 1
    assert file_window[3] == 255 and file_window[4] == 255
    assert list(pixels(without)[0]) == [0, 115, 128, 140, 255]  # min-max of the frame
    explicit = pixels(with_window, window="lung")[0]  # an explicit window wins over the header
    assert explicit[0] == round((-1000 + 1350) / 1500 * 255) and explicit[4] == 255


def test_dicom_without_preamble_or_file_meta_is_read_by_its_suffix(tmp_path):
    path = write_ct(tmp_path / "ct.dcm", hu_row([-100.0, 100.0]))
    ds = pydicom.dcmread(path)
    ds.preamble = None
    ds.file_meta = FileMetaDataset()
    headless = tmp_path / "headless.dcm"
    pydicom.dcmwrite(headless, ds, implicit_vr=False, little_endian=True)
    assert is_dicom(path) and is_dicom(path.read_bytes()) and not is_dicom(headless)
    assert list(pixels(headless)[0]) == list(pixels(path)[0]) == [0, 255]
    assert np.asarray(load_image(dicom_file("OT-PAL-8-face.dcm"))).std() > 20  # a real headless palette file


# ------------------------------------------------------------------------------------ errors
def reason_of(source, **options) -> str:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(source, DecodeOptions(**options))
    return info.value.reason


@pytest.mark.parametrize("uid", ["1.2.3.4.5.6.7.8.9", MPEG4HP41])
def test_unsupported_transfer_syntax(tmp_path, uid):
    path = write_ct(tmp_path / "odd.dcm", hu_row([0.0, 1.0]), transfer_syntax=uid,
                    pixel_data=encapsulate([b"\x00" * 64]))
    assert reason_of(path) == "unsupported transfer syntax"


def test_known_syntax_with_its_plugin_missing_is_unsupported(monkeypatch):
    # What a user without pylibjpeg-openjpeg sees: pydicom knows JPEG 2000 but has no decoder for it.
    monkeypatch.setattr(get_decoder(JPEG2000Lossless), "_available", {})
    assert reason_of(dicom_file("MR_small_jp2klossless.dcm")) == "unsupported transfer syntax"
    assert_model_input(decode_image(dicom_file("MR_small.dcm")))


def test_bad_files_give_their_reason(tmp_path):
    jpeg = tmp_path / "cut.jpg"
    Image.fromarray(_rng_rgb(200, 200)).save(jpeg)
    jpeg.write_bytes(jpeg.read_bytes()[: len(jpeg.read_bytes()) // 2])
    png = tmp_path / "cut.png"
    Image.fromarray(_rng_rgb(200, 200)).save(png)
    png.write_bytes(png.read_bytes()[:-2000])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    noise = np.random.default_rng(0).bytes(4096)
    (tmp_path / "noise.dcm").write_bytes(noise)
    (tmp_path / "noise.png").write_bytes(noise)
    (tmp_path / "notes.txt").write_text("not an image at all\n")
    ct = Path(dicom_file("CT_small.dcm")).read_bytes()
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # truncation must not be padded silently

    assert reason_of(jpeg) == "truncated image"
    assert reason_of(png) == "truncated image"
    assert reason_of(empty) == "empty file"
    assert reason_of(b"") == "empty file"
    assert reason_of(tmp_path / "noise.dcm") == "corrupt image"
    assert reason_of(tmp_path / "noise.png") == "corrupt image"
    assert reason_of(tmp_path / "notes.txt") == "not an image"
    assert reason_of(noise) == "not an image"
    assert reason_of(tmp_path / "missing.png") == "missing file"
    assert reason_of(tmp_path) == "not a file"
    assert reason_of(dicom_file("MR_truncated.dcm")) == "truncated image"  # opens fine, fails on pixels
    assert reason_of(ct[:-1000]) == "truncated image"  # cut inside the pixel data
    assert reason_of(ct[:3000]) == "truncated image"  # cut inside the header
    assert reason_of(dicom_file("emri_small_jpeg_2k_lossless_too_short.dcm")) == "truncated image"
    assert reason_of(dicom_file("test-SR.dcm")) == "no pixel data"
    assert reason_of(dicom_file("JPEG-lossy.dcm")) == "corrupt image"  # a broken JPEG stream


def test_decode_error_carries_reason_source_and_survives_pickling(tmp_path):
    with pytest.raises(ImageDecodeError) as info:
        load_image(tmp_path / "gone.dcm")
    error = info.value
    assert isinstance(error, ValueError)
    assert (error.reason, error.source) == ("missing file", str(tmp_path / "gone.dcm"))
    assert str(tmp_path / "gone.dcm") in str(error)
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.reason, copy.source, str(copy)) == (error.reason, error.source, str(error))


# ------------------------------------------------------------------------------------ resize modes and inputs
def test_pad_letterboxes_with_black_and_center_crop_keeps_the_middle(tmp_path):
    wide = np.zeros((100, 200, 3), np.uint8)
    wide[:, :, :] = 200
    wide[:, :50] = (255, 0, 0)  # a red left quarter, cut away by the centre crop
    path = tmp_path / "wide.png"
    Image.fromarray(wide).save(path)

    padded = decode_image(path, DecodeOptions(resize="pad"))
    canvas = Image.new("RGB", (200, 200))
    canvas.paste(Image.fromarray(wide), (0, 50))
    assert torch.equal(padded, ImagePreprocess()(canvas))
    assert float(padded[:, :60].max()) == 0.0 and float(padded[:, -60:].max()) == 0.0  # black bars

    cropped = decode_image(path, DecodeOptions(resize="center_crop"))
    assert torch.equal(cropped, ImagePreprocess()(Image.fromarray(wide[:, 50:150])))
    assert float(cropped[1].min()) > 0.7  # no red quarter left (green channel stays high)

    squashed = decode_image(path)
    assert torch.equal(squashed, ImagePreprocess()(Image.open(path)))
    square = _write_8bit(tmp_path, "P.png")  # already square after crop -> palette parity kept
    assert torch.equal(decode_image(square, DecodeOptions(resize="center_crop")),
                       ImagePreprocess()(Image.open(square).crop((20, 0, 110, 90))))


def test_tensor_inputs(tmp_path):
    ready = torch.rand(3, 256, 256)
    assert torch.equal(decode_image(ready), ready)
    small = torch.rand(3, 40, 60)
    assert_model_input(decode_image(small))
    assert torch.equal(decode_image(small), ImagePreprocess()(load_image(small)))
    assert load_image(small).size == (60, 40)
    assert_model_input(decode_image(torch.rand(1, 30, 30)))
    assert reason_of(torch.rand(3, 8, 8) * 3) == "tensor out of range"
    assert reason_of(torch.zeros(3, 8, 8, dtype=torch.uint8)) == "unsupported tensor"
    assert reason_of(np.zeros((4, 4, 5), np.uint8)) == "unsupported array"


def test_options_are_validated():
    with pytest.raises(ValueError, match="unknown window preset"):
        DecodeOptions(window="kidney")
    with pytest.raises(ValueError):
        DecodeOptions(window=(0.0, 40.0))
    with pytest.raises(ValueError):
        DecodeOptions(resize="stretch")
    assert DecodeOptions(window="Soft Tissue").window == "Soft Tissue"
    with pytest.raises(TypeError):
        decode_image(12345)


def test_image_size_option(tmp_path):
    path = _write_8bit(tmp_path, "RGB.png")
    assert torch.equal(decode_image(path, DecodeOptions(image_size=64)), ImagePreprocess(64)(Image.open(path)))
    assert_model_input(decode_image(dicom_file("CT_small.dcm"), DecodeOptions(image_size=64)), 64)


def test_dicom_copies_and_bytes_decode_the_same(tmp_path):
    copy = tmp_path / "copy.dcm"
    shutil.copy(dicom_file("CT_small.dcm"), copy)
    assert torch.equal(decode_image(copy), decode_image(dicom_file("CT_small.dcm")))
    assert torch.equal(decode_image(copy.read_bytes()), decode_image(copy))
