"""Series -> the 2-D slices the encoder sees: even sampling along the slice axis and CT rendering.

* ``sample_slices``: N slices spread evenly over the series (first and last included), so a 600-slice series
  costs what a 100-slice one does: only sampled slices are ever read.
* Values: DICOM through ``images.dicom_modality_values`` (modality LUT: HU for CT); NIfTI one slice at a time
  through nibabel's proxy (``read_nifti_slice``: only sampled slices are read) brought to RAS as MONAI's
  ``Orientation("RAS")`` does, values as stored (HU for CT-RATE; scl_slope/scl_inter applied by nibabel), slices
  shown in radiological convention (patient right on the image's left, anterior/superior up).
* ``Rendering``: ``plain`` (the file's own window / VOI LUT for DICOM, a named or (width, level) window when
  given, else min-max) or ``multi`` (three CT windows as the three channels; default lung / mediastinum / bone,
  ``vocab.WINDOW_PRESETS``, as in multi-window CT inputs for 2-D CNNs, e.g. Lee et al., Nat. Biomed. Eng. 2019).
"""
from __future__ import annotations

import functools
import io
import os
from dataclasses import dataclass

import numpy as np

from fuselip_med.data.images import DecodeOptions, ImageDecodeError, apply_window, dicom_modality_values, load_image
from fuselip_med.data.studies import Series, SliceRef
from fuselip_med.errors import first_line, without_paths
from fuselip_med.vocab import WINDOW_PRESETS

__all__ = ["DEFAULT_WINDOWS", "NO_FINITE_VOXELS", "Rendering", "read_nifti_slice", "render_slice", "sample_slices",
           "sampled_indices", "slice_values"]

DEFAULT_WINDOWS = ("lung", "mediastinum", "bone")
#: The reason a NIfTI slice (or a series whose sampled slices are all such) is left out: no voxel is finite.
NO_FINITE_VOXELS = "no finite voxels"


def sampled_indices(n_total: int, n: int) -> np.ndarray:
    """``min(n, n_total)`` indices spread evenly over ``range(n_total)``, first and last included:
    ``round(linspace(0, n_total - 1, n))`` (int64 [k], strictly increasing)."""
    if n < 1 or n_total < 1:
        raise ValueError(f"need at least one slice to sample from and to, got n_total={n_total}, n={n}")
    if n >= n_total:
        return np.arange(n_total, dtype=np.int64)
    return np.unique(np.rint(np.linspace(0, n_total - 1, n)).astype(np.int64))


def sample_slices(series: Series, n: int = 16) -> list[SliceRef]:
    """The ``n`` slices of ``series`` spread evenly along its slice axis (all of them when it has fewer)."""
    return [series.slices[i] for i in sampled_indices(len(series.slices), n)]


@dataclass(frozen=True)
class Rendering:
    """How a slice becomes the encoder's 8-bit image.

    ``mode``: ``plain`` (one window, grey) or ``multi`` (``windows``: three presets as R, G, B).
    ``window``: for ``plain``, a preset name or (width, level) in modality units (HU); None = the DICOM file's
    own window / VOI LUT, else min-max.
    """

    mode: str = "plain"
    window: str | tuple[float, float] | None = None
    windows: tuple[str, str, str] = DEFAULT_WINDOWS

    def __post_init__(self) -> None:
        if self.mode not in ("plain", "multi"):
            raise ValueError(f"rendering {self.mode!r}: choose plain or multi")
        if self.mode == "multi":
            if len(self.windows) != 3:
                raise ValueError(f"multi-window rendering needs three windows, got {len(self.windows)}")
            unknown = [w for w in self.windows if w not in WINDOW_PRESETS]
            if unknown:
                raise ValueError(f"unknown window preset(s) {unknown}; use {sorted(WINDOW_PRESETS)}")
        DecodeOptions(window=self.window)  # validates the plain window

    @classmethod
    def parse(cls, text: str, window: str | None = None) -> Rendering:
        """``plain``, ``multi`` or ``multi:lung,mediastinum,bone`` (``ValueError`` naming the problem)."""
        mode, _, names = text.partition(":")
        if mode == "multi" and names:
            return cls("multi", windows=tuple(n.strip() for n in names.split(",")))  # type: ignore[arg-type]
        if names:
            raise ValueError(f"rendering {text!r}: only multi takes window names (multi:lung,mediastinum,bone)")
        return cls(mode, window=window)

    def describe(self) -> str:
        return f"multi:{','.join(self.windows)}" if self.mode == "multi" else f"plain:{self.window or 'file'}"


@functools.lru_cache(maxsize=1)
def _nifti_image(path: str):
    """The nibabel image of ``path`` (header and affine read, voxels left on disk behind ``dataobj``); the last
    one is kept, as the slices of one series are read one after another."""
    import nibabel

    return nibabel.load(path)


def read_nifti_slice(path: str, axis: int, index: int) -> np.ndarray:
    """Slice ``index`` along RAS axis ``axis`` of a NIfTI volume: float32 [a, b] over the two other RAS axes (in
    increasing RAS order, each increasing), values as stored (HU for CT; scl_slope/scl_inter applied by nibabel).

    Only that slice is read (nibabel ``dataobj`` proxy slicing): memory holds one slice, whatever the volume's
    size. The voxel axes are brought to RAS with nibabel's ``io_orientation`` / ``apply_orientation``, the rule
    MONAI's ``Orientation("RAS")`` applies to a whole volume. Raises ``ImageDecodeError`` (reason ``broken NIfTI``)
    when the file cannot be read (truncated, corrupt)."""
    import nibabel.orientations as orientations

    try:
        image = _nifti_image(path)
        ornt = orientations.io_orientation(image.affine)  # voxel axis i -> RAS axis ornt[i, 0], flipped if -1
        voxel_axis = int(np.flatnonzero(ornt[:, 0] == axis)[0])
        stored = image.shape[voxel_axis] - 1 - index if ornt[voxel_axis, 1] < 0 else index
        where = [slice(None)] * 3
        where[voxel_axis] = slice(stored, stored + 1)
        slab = np.asarray(image.dataobj[tuple(where)], dtype=np.float32)
    except Exception as error:  # nibabel raises many types for damaged files (EOFError, zlib.error, OSError, ...)
        raise ImageDecodeError("broken NIfTI", os.path.basename(path),
                              without_paths(first_line(error), path)[:200]) from error
    slab = slab.reshape(slab.shape[:3])  # trailing length-1 axes (a [X, Y, Z, 1] file)
    return np.take(orientations.apply_orientation(slab, ornt), 0, axis=axis)


def _dicom_source(source):
    """A path stays a path; an in-memory pydicom Dataset becomes its Part 10 bytes (what images.py reads)."""
    if isinstance(source, (str, os.PathLike)):
        return source
    buffer = io.BytesIO()
    source.save_as(buffer, enforce_file_format=False)
    return buffer.getvalue()


def _nifti_slice(ref: SliceRef) -> np.ndarray:
    plane = read_nifti_slice(os.fspath(ref.source), ref.axis, ref.frame)  # [a, b]: the two other RAS axes
    if not np.isfinite(plane).any():
        raise ImageDecodeError(NO_FINITE_VOXELS, ref.key, "every voxel of the slice is NaN or infinite")
    return np.ascontiguousarray(plane.T[::-1, ::-1])   # rows: superior/anterior up; columns: patient right left


def slice_values(ref: SliceRef) -> np.ndarray:
    """The slice's values in modality units (HU for CT): float32 [H, W]. Raises ``ImageDecodeError`` (for a NIfTI
    slice without one finite voxel: reason ``NO_FINITE_VOXELS``)."""
    if ref.axis is not None:
        return _nifti_slice(ref)
    return dicom_modality_values(_dicom_source(ref.source), frame=ref.frame)


def render_slice(ref: SliceRef, rendering: Rendering = Rendering()) -> np.ndarray:
    """The slice as the encoder's input image: uint8 [H, W] (plain) or [H, W, 3] (multi-window).

    Plain DICOM without a window uses the file's own window / VOI LUT exactly as ``images.load_image`` does;
    NIfTI without a window is min-max scaled. Raises ``ImageDecodeError`` (truncated, corrupt, unsupported).
    """
    if rendering.mode == "multi":
        values = slice_values(ref)
        channels = [apply_window(values, *WINDOW_PRESETS[name]) for name in rendering.windows]
        unit = np.nan_to_num(np.stack(channels, axis=-1), nan=0.0)  # NaN voxels black, as min-max makes them
        return np.rint(unit * 255.0).astype(np.uint8)
    if ref.axis is None:
        image = load_image(_dicom_source(ref.source), DecodeOptions(window=rendering.window, frame=ref.frame))
        return np.asarray(image)
    return np.asarray(load_image(_nifti_slice(ref), DecodeOptions(window=rendering.window)))  # window or min-max
