"""Decode PNG/JPEG/DICOM (and in-memory images) into the (3, S, S) float tensor FuseLIP's tokenizer expects.

Two stages:

* ``load_image`` turns any image input into an 8-bit PIL image at native size. Ordinary 8-bit files pass
  through untouched; 16-bit/float images and DICOM are windowed to 8 bits first.
* ``decode_image`` applies the reference preprocessing (``core.image_preprocess.ImagePreprocess``: PIL
  bicubic resize in the image's own mode, *then* RGB, then ToTensor) to that image, so that for an ordinary
  8-bit file ``decode_image(path)`` equals ``ImagePreprocess()(PIL.Image.open(path))`` bit for bit (for a file
  with an EXIF orientation, with ``DecodeOptions(exif="ignore")``: by default it is turned upright first).

DICOM order of operations: pixel array -> frame choice (middle frame by default) -> modality LUT (rescale
slope/intercept -> HU) -> window (explicit preset/(width, level); else the file's VOI LUT or window; else
min-max of the frame's non-padding pixels: PixelPaddingValue / PixelPaddingRangeLimit, PS3.3 C.7.5.1.1.2, are
left out of the range and shown black) -> [0, 1] -> MONOCHROME1 inverted -> uint8 "L" (colour DICOM: RGB, YBR
converted by pydicom) -> the reference resize/ToTensor path. Grey images become 3 channels by replication.

Users who window themselves get the modality-unit values (HU for CT) from ``dicom_modality_values``. Every
fallback the decoder takes (a window or VOI LUT in the file it cannot use, a window given for a colour image)
is reported once per file as a ``DecodeFallbackWarning`` naming the file. DICOM is recognised by content (the
Part 10 magic, or a preamble-less data set), whatever the file is called.
"""
from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pydicom
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from pydicom.multival import MultiValue
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi_lut,
    pixel_array,
)
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from fuselip_med.core.image_preprocess import ImagePreprocess
from fuselip_med.data.schema import ImageInput
from fuselip_med.errors import UserError, without_paths
from fuselip_med.vocab import WINDOW_PRESETS

_DICOM_SUFFIXES = (".dcm", ".dicom", ".dic", ".ima")
# (implicit VR, little endian) -> transfer syntax, for files whose file meta lacks one
_NATIVE_SYNTAXES = {
    (True, True): ImplicitVRLittleEndian,
    (False, True): ExplicitVRLittleEndian,
    (False, False): ExplicitVRBigEndian,
}
# Pillow modes holding more than 8 bits per sample: windowed to 8-bit "L" before the reference pipeline.
_WIDE_MODES = ("I", "F")
_HINTS = {
    "missing file": "check the path",
    "empty file": "the file has zero bytes; re-download or drop it",
    "unsupported transfer syntax": "install pylibjpeg with pylibjpeg-libjpeg/pylibjpeg-openjpeg (or gdcm), "
    "or decompress the file first (e.g. dcmdjpeg/gdcmconv --raw)",
    "truncated image": "the file is cut short; re-download it",
    "frame out of range": "pick a frame index below the file's number of frames",
}


class DecodeFallbackWarning(UserWarning):
    """The decoder could not use something in a file (its window, its VOI LUT) and took a fallback."""


_WARNED: set[tuple[str, str]] = set()


def _fallback(label: str, what: str) -> None:
    """Warn once per (file, fallback) in this process, as ``<file>: <what was ignored and what was done>``."""
    if (label, what) in _WARNED:
        return
    _WARNED.add((label, what))
    warnings.warn(f"{label}: {what}", DecodeFallbackWarning, stacklevel=3)


class ImageDecodeError(UserError, ValueError):
    """An image that cannot be decoded. ``reason`` is short and machine-friendly (used to count skips).

    ``detail`` (written to skip reports) never quotes the file's path: the library messages it comes from often do
    (``errors.without_paths``); the message names ``source`` for the one who asked for that file."""

    def __init__(self, reason: str, source: str, detail: str = "") -> None:
        self.reason = reason
        self.source = source
        self.detail = without_paths(detail, source) if detail and not source.startswith("<") else detail
        message = f"cannot decode image {source}: {reason}"
        if detail:
            message += f" ({detail})"
        if reason in _HINTS:
            message += f"; {_HINTS[reason]}"
        super().__init__(message)

    def __reduce__(self):  # keep reason/source when pickled across DataLoader workers
        return (type(self), (self.reason, self.source, self.detail))


@dataclass(frozen=True)
class DecodeOptions:
    """How to turn an image into pixels; see the module docstring for the order of operations.

    ``window`` applies to greyscale DICOM and to 16-bit/float images and arrays; 8-bit image files, uint8
    arrays and colour images are never windowed. ``frame`` picks a DICOM frame (default: the middle one) or a
    page of a multi-page Pillow file (default: the first, as the reference); out of range is an error.
    ``exif``: ``apply`` (default) turns a PNG/JPEG/TIFF upright by its EXIF Orientation tag (0x0112, as every
    viewer shows it; ``PIL.ImageOps.exif_transpose``); ``ignore`` keeps the stored pixel order, as the
    reference preprocessing does (for bit parity with the official FuseLIP code on such files).
    """

    image_size: int = 256
    resize: Literal["squash", "pad", "center_crop"] = "squash"
    window: str | tuple[float, float] | None = None
    frame: int | None = None
    exif: Literal["apply", "ignore"] = "apply"

    def __post_init__(self) -> None:
        if self.image_size <= 0:
            raise ValueError(f"DecodeOptions.image_size must be positive, got {self.image_size}")
        if self.resize not in ("squash", "pad", "center_crop"):
            raise ValueError(f"DecodeOptions.resize must be squash, pad or center_crop, got {self.resize!r}")
        if self.exif not in ("apply", "ignore"):
            raise ValueError(f"DecodeOptions.exif must be apply or ignore, got {self.exif!r}")
        if self.frame is not None and self.frame < 0:
            raise ValueError(f"DecodeOptions.frame must be >= 0 or None, got {self.frame}")
        _resolve_window(self.window)  # raises on unknown presets / non-positive widths


def _resolve_window(window: str | tuple[float, float] | None) -> tuple[float, float] | None:
    if window is None:
        return None
    if isinstance(window, str):
        key = window.strip().lower().replace(" ", "_").replace("-", "_")
        if key not in WINDOW_PRESETS:
            raise ValueError(
                f"unknown window preset {window!r}; use one of {sorted(WINDOW_PRESETS)} or (width, level)"
            )
        return WINDOW_PRESETS[key]
    width, level = (float(v) for v in window)
    if not width > 0:
        raise ValueError(f"window width must be positive, got {width}")
    return width, level


def apply_window(values: np.ndarray, width: float, level: float) -> np.ndarray:
    """Map [level - width/2, level + width/2] linearly to [0, 1], clipping outside; float32."""
    out = (np.asarray(values, dtype=np.float32) - np.float32(level - width / 2)) / np.float32(width)
    return np.clip(out, 0.0, 1.0, out=out)


def _min_max(values: np.ndarray, exclude: np.ndarray | None = None) -> np.ndarray:
    """Scale to [0, 1] by the finite min and max of the pixels not in ``exclude`` (a bool mask, e.g. padding;
    those pixels become 0); a constant image becomes black."""
    values = np.asarray(values, dtype=np.float32)
    keep = np.isfinite(values) if exclude is None else np.isfinite(values) & ~exclude
    if not keep.all():
        values = np.where(keep, values, np.nan)
    if not keep.any():
        return np.zeros(values.shape, np.float32)
    lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
    if hi <= lo:
        return np.zeros(values.shape, np.float32)
    return np.nan_to_num(apply_window(values, hi - lo, (hi + lo) / 2), nan=0.0)


def padding_mask(stored: np.ndarray, ds: pydicom.Dataset) -> np.ndarray | None:
    """Pixels that are padding (PS3.3 C.7.5.1.1.2): stored value equal to PixelPaddingValue, or between it and
    PixelPaddingRangeLimit (inclusive) when that is present. Compared in stored units (before the modality LUT).
    Returns a bool array shaped like ``stored``, or None when the file declares no padding."""
    value = ds.get("PixelPaddingValue")
    if value is None:
        return None
    try:
        low = high = int(value)
        limit = ds.get("PixelPaddingRangeLimit")
        if limit is not None:
            low, high = sorted((low, int(limit)))
    except (TypeError, ValueError):
        return None
    return (stored >= low) & (stored <= high)


def _window_or_min_max(values: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    return apply_window(values, *window) if window is not None else _min_max(values)


def _to_uint8(unit: np.ndarray) -> np.ndarray:
    return np.rint(unit * 255.0).astype(np.uint8)


# --------------------------------------------------------------------------------------------- sources
def is_dicom(path_or_bytes) -> bool:
    """True when the data carries the DICOM Part 10 magic ("DICM" after the 128-byte preamble, PS3.10 7.1)."""
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        return bytes(path_or_bytes[128:132]) == b"DICM"
    try:
        with open(path_or_bytes, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def _starts_like_headless_dicom(head: bytes) -> bool:
    """A data set written without preamble and file meta (older scanners, some PACS exports) starts with a
    little-endian tag of group 0x0002 or 0x0008 (PS3.5 7.1); a cheap test before letting pydicom try."""
    return len(head) >= 8 and head[:2] in (b"\x02\x00", b"\x08\x00")


def _headless_dicom(path: str) -> bool:
    """True when pydicom reads ``path`` (with ``force``) as a data set that describes an image (Rows/Columns)."""
    try:
        with open(path, "rb") as handle:
            if not _starts_like_headless_dicom(handle.read(8)):
                return False
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        return "Rows" in ds and "Columns" in ds
    except Exception:  # arbitrary bytes can fail the parser in many ways: then it is not DICOM
        return False


def image_kind(path: str | os.PathLike) -> Literal["dicom", "image"] | None:
    """What a file holds, by its content (never its name): ``"dicom"`` (Part 10 magic, or a preamble-less data
    set pydicom can read), ``"image"`` (a format Pillow identifies) or None (not an image, unreadable).

    Used to list scanner/PACS folders, whose files are often named ``IM000001`` or ``*.IMA``. Reads the
    header only (Pillow opens lazily; pydicom stops before the pixel data).
    """
    path = os.fspath(path)
    if is_dicom(path):
        return "dicom"
    try:
        with Image.open(path):
            return "image"
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError):
        pass
    return "dicom" if _headless_dicom(path) else None


def _describe(source: object) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    if isinstance(source, Image.Image):
        return f"<PIL image {source.mode} {source.width}x{source.height}>"
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return f"<{type(source).__name__} {tuple(source.shape)} {source.dtype}>"
    return f"<{type(source).__name__}>"


def _check_frame(frame: int | None, n_frames: int, default: int, label: str) -> int:
    index = default if frame is None else frame
    if not 0 <= index < n_frames:
        raise ImageDecodeError("frame out of range", label, f"frame {index} of {n_frames}")
    return index


# --------------------------------------------------------------------------------------------- Pillow
def _pillow_error(exc: BaseException, label: str, suffix: str) -> ImageDecodeError:
    if isinstance(exc, Image.DecompressionBombError):
        return ImageDecodeError("image too large", label, str(exc))
    if isinstance(exc, UnidentifiedImageError):
        # An image-like name with unreadable content is corrupt; anything else is simply not an image.
        reason = "corrupt image" if suffix in Image.registered_extensions() else "not an image"
        return ImageDecodeError(reason, label)
    text = str(exc)
    if isinstance(exc, EOFError) or "truncated" in text.lower():
        return ImageDecodeError("truncated image", label, text)
    return ImageDecodeError("corrupt image", label, text)


def _finish_pillow(image: Image.Image, options: DecodeOptions) -> Image.Image:
    """Window wide (16-bit/float) images to 8-bit "L"; leave every 8-bit mode untouched (reference parity)."""
    if image.mode in _WIDE_MODES or image.mode.startswith("I;"):
        values = np.asarray(image)
        return Image.fromarray(_to_uint8(_window_or_min_max(values, _resolve_window(options.window))))
    return image


def _open_pillow(fp, options: DecodeOptions, label: str, suffix: str) -> Image.Image:
    try:
        with Image.open(fp) as image:
            if options.frame is not None:  # multi-page files: first frame by default, as the reference
                image.seek(_check_frame(options.frame, getattr(image, "n_frames", 1), 0, label))
            image.load()  # decode now so that truncation surfaces here, not inside the resize
            if options.exif == "apply":
                image = ImageOps.exif_transpose(image)  # upright as viewers show it; a copy either way
            return _finish_pillow(image, options)
    except ImageDecodeError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise _pillow_error(exc, label, suffix) from exc


# --------------------------------------------------------------------------------------------- DICOM
def _lift_functional_groups(ds: pydicom.Dataset, index: int) -> None:
    """Enhanced multi-frame objects keep rescale and window per frame (or shared): copy them to the top level
    where pydicom's LUT functions look. ``ds`` is ours (read for this decode), so mutating it is safe."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared = ds.get("SharedFunctionalGroupsSequence")
    groups = ([per_frame[min(index, len(per_frame) - 1)]] if per_frame else []) + ([shared[0]] if shared else [])
    for macro, keywords in (
        ("PixelValueTransformationSequence", ("RescaleSlope", "RescaleIntercept")),
        ("FrameVOILUTSequence", ("WindowCenter", "WindowWidth", "VOILUTFunction")),
    ):
        if any(k in ds for k in keywords[:2]):
            continue
        for group in groups:
            items = group.get(macro)
            if items:
                for keyword in keywords:
                    if keyword in items[0]:
                        setattr(ds, keyword, items[0][keyword].value)
                break


def _finite(ds: pydicom.Dataset, *keywords: str) -> bool:
    """False when a numeric header attribute present in ``ds`` holds a NaN, an infinity or no number at all (a DS
    of "NaN" / "inf" parses as a float, and one such value turns every pixel it scales into NaN)."""
    for keyword in keywords:
        value = ds.get(keyword)
        if value is None:
            continue
        try:
            numbers = np.asarray([float(v) for v in (value if isinstance(value, (MultiValue, list, tuple))
                                                     else [value])])
        except (TypeError, ValueError):
            return False
        if not np.isfinite(numbers).all():
            return False
    return True


def _modality_values(pixels: np.ndarray, ds: pydicom.Dataset, label: str) -> np.ndarray:
    """Stored values -> modality units (HU for CT) with pydicom's ``apply_modality_lut`` (PS3.3 C.11.1).

    Raises ``ImageDecodeError`` (``corrupt image``) for a RescaleSlope / RescaleIntercept (0028,1053 / 1052) that
    is not a finite number: every pixel would be NaN or infinite and the image a blank tile."""
    if "ModalityLUTSequence" not in ds and not _finite(ds, "RescaleSlope", "RescaleIntercept"):
        raise ImageDecodeError("corrupt image", label, "RescaleSlope/RescaleIntercept is not a finite number")
    return apply_modality_lut(pixels, ds)


def _file_voi(values: np.ndarray, ds: pydicom.Dataset, label: str) -> np.ndarray | None:
    """The file's own VOI LUT / window (pydicom's apply_voi_lut) scaled to [0, 1]; None if it has none or it
    cannot be used (then a ``DecodeFallbackWarning`` names the file)."""
    voi_items = ds.get("VOILUTSequence")
    has_lut = bool(voi_items) and "LUTDescriptor" in voi_items[0] and "LUTData" in voi_items[0]
    has_window = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
    if not (has_lut or has_window):
        return None
    if not has_lut and not _finite(ds, "WindowCenter", "WindowWidth"):
        _fallback(label, "ignoring the file's window (not a finite number); using min-max")
        return None
    try:
        if has_lut:
            if not np.issubdtype(values.dtype, np.integer):
                values = np.rint(values).astype(np.int64)  # LUT inputs are integers (after an integral rescale)
            entries, first_map = voi_items[0].LUTDescriptor[:2]
            table = apply_voi_lut(np.arange(first_map, first_map + (entries or 2**16)), ds)
            lo, hi = float(table.min()), float(table.max())  # the LUT's own output range
        else:
            # Windowing outputs [y_min, y_max] (set by bits stored and rescale); probe both ends to get it.
            lo, hi = (float(v) for v in apply_voi_lut(np.array([-np.inf, np.inf]), ds))
        mapped = apply_voi_lut(values, ds)
    except (ValueError, TypeError, NotImplementedError, AttributeError, IndexError) as exc:
        # an unusable window in the header: fall back to min-max rather than drop the image, and say so
        _fallback(label, f"ignoring the file's {'VOI LUT' if has_lut else 'window'} ({exc}); using min-max")
        return None
    if hi <= lo:
        _fallback(label, f"ignoring the file's {'VOI LUT' if has_lut else 'window'} (empty output range); "
                         "using min-max")
        return None
    return apply_window(mapped, hi - lo, (hi + lo) / 2)


def _palette_to_little_endian(ds: pydicom.Dataset) -> None:
    """pydicom 3.0's apply_color_lut reads 16-bit (non-segmented) palette data in little-endian byte order
    even from big-endian files (black images otherwise): swap such data in place first."""
    if ds.original_encoding[1] is not False or "RedPaletteColorLookupTableDescriptor" not in ds:
        return
    entries = ds.RedPaletteColorLookupTableDescriptor[0] or 2**16
    for colour in ("Red", "Green", "Blue", "Alpha"):
        keyword = f"{colour}PaletteColorLookupTableData"
        if keyword in ds and len(ds[keyword].value) == 2 * entries:
            ds[keyword].value = np.frombuffer(ds[keyword].value, ">u2").astype("<u2").tobytes()


def _read_dicom_pixels(ds: pydicom.Dataset, index: int, label: str) -> np.ndarray:
    try:
        return pixel_array(ds, index=index)
    except NotImplementedError as exc:
        raise ImageDecodeError("unsupported transfer syntax", label, str(exc).splitlines()[0]) from exc
    except RuntimeError as exc:
        text = str(exc)
        if "missing dependencies" in text:
            raise ImageDecodeError("unsupported transfer syntax", label, text.splitlines()[0]) from exc
        raise ImageDecodeError("corrupt image", label, " ".join(text.split())[:200]) from exc
    except (ValueError, AttributeError, KeyError, TypeError, EOFError, OSError) as exc:
        text = str(exc)
        reason = "truncated image" if "less than expected" in text or isinstance(exc, EOFError) else "corrupt image"
        raise ImageDecodeError(reason, label, text.splitlines()[0] if text else type(exc).__name__) from exc


def _read_dicom(fp, label: str, force: bool) -> pydicom.Dataset:
    """The data set with its pixel data, or ImageDecodeError (corrupt, truncated, no pixel data)."""
    try:
        ds = pydicom.dcmread(fp, force=force)
    except Exception as exc:  # arbitrary bytes can fail the parser in many ways (struct, unicode, ...)
        raise ImageDecodeError("corrupt image", label, str(exc).splitlines()[0] if str(exc) else "") from exc
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        # pydicom stops quietly at the end of a short file: an image object without pixels was cut off.
        sop_class = ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID")
        if "Rows" in ds or (sop_class is not None and "Image Storage" in getattr(sop_class, "name", "")):
            raise ImageDecodeError("truncated image", label, "the file ends before its pixel data")
        if force or "TransferSyntaxUID" not in ds.file_meta:
            raise ImageDecodeError("corrupt image", label, "no readable DICOM data set")
        raise ImageDecodeError("no pixel data", label)
    if "TransferSyntaxUID" not in ds.file_meta:  # no file meta (headless file): use the encoding pydicom found
        ds.file_meta.TransferSyntaxUID = _NATIVE_SYNTAXES.get(tuple(ds.original_encoding), ExplicitVRLittleEndian)
    return ds


def _frame(ds: pydicom.Dataset, frame: int | None, label: str) -> tuple[np.ndarray, int]:
    """(stored pixel values of the chosen frame, its index); default: the middle frame."""
    try:
        n_frames = max(int(ds.get("NumberOfFrames") or 1), 1)
    except (TypeError, ValueError):
        n_frames = 1
    index = _check_frame(frame, n_frames, n_frames // 2, label)
    return _read_dicom_pixels(ds, index, label), index


def _open_dicom(fp, options: DecodeOptions, label: str, force: bool) -> Image.Image:
    ds = _read_dicom(fp, label, force)
    pixels, index = _frame(ds, options.frame, label)
    try:
        return _dicom_to_image(ds, pixels, index, options, label)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, NotImplementedError) as exc:
        raise ImageDecodeError("corrupt image", label, f"bad LUT or pixel description: {exc}") from exc


def _colour_values(ds: pydicom.Dataset, pixels: np.ndarray) -> np.ndarray | None:
    """RGB values of a colour frame (palette applied), or None for a greyscale one."""
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "PALETTE COLOR":
        _palette_to_little_endian(ds)
        return apply_color_lut(pixels, ds)  # uint8 or uint16 by the palette's entry size
    return pixels if pixels.ndim == 3 else None  # pydicom has already converted YBR_FULL(_422)/ICT/RCT to RGB


def _dicom_to_image(ds: pydicom.Dataset, pixels: np.ndarray, index: int, options: DecodeOptions,
                    label: str) -> Image.Image:
    window = _resolve_window(options.window)
    rgb = _colour_values(ds, pixels)
    if rgb is not None:
        if window is not None:
            _fallback(label, "a window applies to greyscale images only; showing the colour image as stored")
        if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "PALETTE COLOR":
            return Image.fromarray(_to_uint8(rgb / float(np.iinfo(rgb.dtype).max)), "RGB")
        if rgb.dtype == np.uint8:
            return Image.fromarray(np.ascontiguousarray(rgb), "RGB")
        bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 8)
        return Image.fromarray(_to_uint8(np.clip(rgb / float(2**bits - 1), 0.0, 1.0)), "RGB")

    _lift_functional_groups(ds, index)
    values = _modality_values(pixels, ds, label)  # stored values -> HU (or the modality's real-world units)
    unit = apply_window(values, *window) if window is not None else _file_voi(values, ds, label)
    if unit is None:
        padding = padding_mask(pixels, ds)
        unit = _min_max(values, padding)
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
        unit = 1.0 - unit  # high values are dark: invert after windowing
    return Image.fromarray(_to_uint8(unit), "L")


def dicom_modality_values(source: str | os.PathLike | bytes, frame: int | None = None) -> np.ndarray:
    """A DICOM file's pixel values in modality units, for users who window themselves.

    Greyscale: the chosen frame (default: the middle one, as ``decode_image``) after the modality LUT or
    rescale slope/intercept (PS3.3 C.11.1; enhanced multi-frame objects: their per-frame or shared pixel
    value transformation), i.e. Hounsfield units for CT: ``float32 [H, W]``. Colour (RGB, YBR converted by
    pydicom, palette applied): ``float32 [H, W, 3]`` in the stored range. No VOI LUT/window, no padding
    removal (``padding_mask`` gives the padding pixels).

    ``source``: a path (DICOM by content, any file name) or the file's bytes. Raises ``ImageDecodeError``
    (reason ``missing file``, ``corrupt image``, ``truncated image``, ``no pixel data``, ``frame out of range``,
    ``unsupported transfer syntax``) naming the file.
    """
    label = _describe(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        fp, force = io.BytesIO(bytes(source)), not is_dicom(source)
    else:
        fp = os.fspath(source)
        if not os.path.isfile(fp):
            raise ImageDecodeError("missing file", label)
        force = not is_dicom(fp)
    ds = _read_dicom(fp, label, force)
    pixels, index = _frame(ds, frame, label)
    try:
        rgb = _colour_values(ds, pixels)
        if rgb is not None:
            return np.asarray(rgb, dtype=np.float32)
        _lift_functional_groups(ds, index)
        return np.asarray(_modality_values(pixels, ds, label), dtype=np.float32)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, NotImplementedError) as exc:
        raise ImageDecodeError("corrupt image", label, f"bad LUT or pixel description: {exc}") from exc


# --------------------------------------------------------------------------------------------- arrays
def _from_array(array: np.ndarray, options: DecodeOptions, label: str) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)) or array.size == 0:
        raise ImageDecodeError("unsupported array", label, "expected HxW, HxWx1, HxWx3 or HxWx4")
    if array.dtype != np.uint8:
        if array.ndim == 3 and array.shape[2] == 4:
            raise ImageDecodeError("unsupported array", label, "4-channel arrays must be uint8")
        if array.dtype.kind not in "biuf":
            raise ImageDecodeError("unsupported array", label, f"dtype {array.dtype}")
        array = _to_uint8(_window_or_min_max(array, _resolve_window(options.window)))
    return Image.fromarray(np.ascontiguousarray(array))


def _check_tensor(tensor: torch.Tensor, label: str) -> torch.Tensor:
    """(3, H, W) / (1, H, W) / (H, W) floating tensor in [0, 1] -> float32 (3, H, W) on the CPU."""
    if not torch.is_floating_point(tensor):
        raise ImageDecodeError("unsupported tensor", label, "expected a float tensor in [0, 1]")
    tensor = tensor.detach().to("cpu", torch.float32)
    if tensor.ndim == 2:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 3 or tensor.shape[0] not in (1, 3) or tensor.numel() == 0:
        raise ImageDecodeError("unsupported tensor", label, "expected (3, H, W), (1, H, W) or (H, W)")
    if not bool(torch.isfinite(tensor).all()) or tensor.min() < -1e-4 or tensor.max() > 1 + 1e-4:
        raise ImageDecodeError("tensor out of range", label, "pixel tensors must hold values in [0, 1]")
    return tensor.clamp(0.0, 1.0).expand(3, -1, -1)


def _tensor_image(tensor: torch.Tensor) -> Image.Image:
    return Image.fromarray(tensor.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy(), "RGB")


# --------------------------------------------------------------------------------------------- public API
def _load_native(source: ImageInput, options: DecodeOptions) -> Image.Image:
    """An 8-bit PIL image in its own mode (P, RGBA, 1, ... kept as they are, for reference parity)."""
    label = _describe(source)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        suffix = os.path.splitext(path)[1].lower()
        try:
            size = os.path.getsize(path)
        except FileNotFoundError as exc:
            raise ImageDecodeError("missing file", label) from exc
        except OSError as exc:
            raise ImageDecodeError("unreadable file", label, str(exc)) from exc
        if os.path.isdir(path):
            raise ImageDecodeError("not a file", label)
        if size == 0:
            raise ImageDecodeError("empty file", label)
        has_magic = is_dicom(path)
        if has_magic or suffix in _DICOM_SUFFIXES:
            return _open_dicom(path, options, label, force=not has_magic)
        try:
            return _open_pillow(path, options, label, suffix)
        except ImageDecodeError as error:  # IM000001 & co: DICOM without preamble and without a DICOM suffix
            if error.reason in ("not an image", "corrupt image") and _headless_dicom(path):
                return _open_dicom(path, options, label, force=True)
            raise
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise ImageDecodeError("empty file", label)
        if is_dicom(data):
            return _open_dicom(io.BytesIO(data), options, label, force=False)
        return _open_pillow(io.BytesIO(data), options, label, "")
    if isinstance(source, Image.Image):
        try:
            source.load()
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise _pillow_error(exc, label, "") from exc
        return _finish_pillow(source, options)
    if isinstance(source, np.ndarray):
        return _from_array(source, options, label)
    if isinstance(source, torch.Tensor):
        return _tensor_image(_check_tensor(source, label))
    raise TypeError(
        f"unsupported image input type {type(source).__name__}; expected a path, bytes, PIL image, "
        "numpy array or tensor"
    )


def _display(image: Image.Image, label: str) -> Image.Image:
    """8-bit "L" (grey modes) or "RGB" (everything else), as load_image promises."""
    if image.mode in ("L", "RGB"):
        return image
    try:
        return image.convert("L" if image.mode in ("1", "LA", "La") else "RGB")
    except (ValueError, OSError) as exc:
        raise ImageDecodeError("unsupported image", label, f"mode {image.mode}: {exc}") from exc


def load_image(source: ImageInput, options: DecodeOptions = DecodeOptions()) -> Image.Image:
    """Decoded, windowed 8-bit "L" or "RGB" PIL image at native size (not resized)."""
    return _display(_load_native(source, options), _describe(source))


def _square(image: Image.Image, mode: str, label: str) -> Image.Image:
    """Make the image square before the reference squash: letterbox with black, or a centre crop."""
    width, height = image.size
    if mode == "squash" or width == height:
        return image
    if mode == "center_crop":  # crop keeps the mode, so palette/alpha images still resize as the reference
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        return image.crop((left, top, left + side, top + side))
    image = _display(image, label)  # pad: fill black, which needs a plain L/RGB image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), 0)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def decode_image(
    source: ImageInput,
    options: DecodeOptions = DecodeOptions(),
    *,
    train: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """float32 (3, S, S) in [0, 1]: the reference preprocessing applied to ``load_image``'s result.

    For DICOM pixel values in modality units (HU for CT) rather than display pixels, use
    ``dicom_modality_values`` (same frame choice, no windowing); ``padding_mask`` gives the padding pixels.
    Raises ``ImageDecodeError`` (its ``reason`` names the problem) for inputs that cannot be decoded."""
    size, label = options.image_size, _describe(source)
    if isinstance(source, torch.Tensor):
        tensor = _check_tensor(source, label)
        if not train and tensor.shape[1:] == (size, size):  # already model-sized: resizing is the identity
            return tensor.contiguous()
        native = _tensor_image(tensor)
    else:
        native = _load_native(source, options)
    image = _square(native, options.resize, label)
    try:
        return ImagePreprocess(image_size=size, train=train)(image, generator)
    except (ValueError, OSError) as exc:  # e.g. an exotic mode Pillow cannot convert to RGB
        raise ImageDecodeError("unsupported image", label, f"mode {image.mode}: {exc}") from exc
