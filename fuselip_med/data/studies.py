"""Clinical inputs become *series*: DICOM instances grouped by study and series, ordered along the slice normal;
NIfTI volumes; a folder (recursively), a DICOMDIR or a CSV listing any of them.

DICOM (PS3.3 C.7.6.2 Image Plane module):

* instances are grouped by (StudyInstanceUID, SeriesInstanceUID), never by folder;
* slices are ordered by ImagePositionPatient projected on the slice normal, the cross product of the two
  ImageOrientationPatient direction cosines (PS3.3 C.7.6.2.1.1); InstanceNumber only when a slice lacks its
  position or orientation, and that fallback is named in the skip report's hints;
* enhanced multi-frame objects (PS3.3 C.7.6.16) are split into frames through their per-frame functional groups
  (Plane Position / Plane Orientation / Pixel Measures, per frame or shared);
* what is wrong is named per series in the ``SkipReport``: localizer images (ImageType value LOCALIZER) are left
  out of the volume, duplicate SOP Instance UIDs (PS3.3 C.12.1.1.1: unique per instance) and duplicate slice
  positions keep one slice, and a series with a gap in the slice spacing,
  mixed orientations or pixel spacings, or a single slice is skipped.

NIfTI (``.nii``, ``.nii.gz``): the header is read here (nibabel) for the slice count along the chosen axis;
pixels are read by ``data/volumes.py``, one sampled slice at a time, in RAS (nibabel's orientation rule, the one
MONAI's ``Orientation("RAS")`` applies).

Nothing here holds a patient identifier in what it names: series, studies and slices carry salted keys
(``phi.Pseudonyms``); skip entries name those keys, never paths. The reader's entry points are plain
functions over files (``read_series``) and over a folder / DICOMDIR / NIfTI / CSV (``find_series``).
"""
from __future__ import annotations

import csv
import os
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from fuselip_med.data.phi import Pseudonyms, burned_in_risk
from fuselip_med.data.skips import SkipReport
from fuselip_med.errors import InputError, first_line, without_paths

__all__ = [
    "GAP_FACTOR", "MAX_FRAMES", "MAX_NIFTI_SLICE_VOXELS", "MAX_NIFTI_VOXELS", "NIFTI_SUFFIXES", "PLANES", "Series",
    "SliceRef", "StudiesError", "find_series", "is_nifti", "nifti_series", "read_series",
]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: A step between neighbouring slices larger than GAP_FACTOR x the series' median step is a gap.
GAP_FACTOR = 1.5
#: Two slices whose positions along the normal differ by less than this (mm) are duplicates.
DUPLICATE_MM = 1e-3
#: Two direction cosines / pixel spacings that differ by more than this are "mixed".
TOLERANCE = 1e-3
#: Plane -> RAS axis index (voxel axes brought to RAS): sagittal slices stack along x, coronal along y,
#: axial along z.
PLANES = {"sagittal": 0, "coronal": 1, "axial": 2}
#: The most voxels a NIfTI volume may declare (2**30, 4 GiB as float32; a CT-RATE chest CT of 512 x 512 x ~300 has
#: 8e7) and one slice of it (2**26: 8192 x 8192); a header claiming more is ``volume too large``. Slices are read
#: one at a time, so memory holds one slice; the limits bound the time a (compressed) volume may cost.
MAX_NIFTI_VOXELS = 2**30
MAX_NIFTI_SLICE_VOXELS = 2**26
#: The most frames one DICOM object may declare (NumberOfFrames, PS3.3 C.7.6.6): an enhanced fMRI of 64 slices x
#: 300 time points has 19 200; each frame costs a record before any pixel is read, and the bound from the file size
#: (8 bytes per encapsulated frame, PS3.5 A.4) lets an 8 MB file declare a million frames (1 GB, 40 s).
MAX_FRAMES = 2**16
Plane = Literal["acquisition", "axial", "coronal", "sagittal"]


class StudiesError(InputError):
    """No usable series in an input (the message names the input and the reasons counted)."""


@dataclass(frozen=True)
class SliceRef:
    """One 2-D slice of a series.

    ``source``: the DICOM file (or a pydicom ``Dataset`` held in memory) or the NIfTI file; never written out.
    ``frame``: the frame of a multi-frame object (None for single-frame files); for NIfTI the index along the
    RAS axis ``axis``. ``position``: mm along the slice normal (DICOM) or along the axis (NIfTI); None when
    the file has no position. ``key``: the slice's salted key (SOP Instance UID [+ frame]) or ``<volume>#<i>``.
    """

    source: object
    frame: int | None
    position: float | None
    instance_number: int | None
    key: str
    axis: int | None = None


@dataclass
class Series:
    """An ordered stack of slices that can become a volume.

    ``key``: salted key of the SeriesInstanceUID (``se-…``), or the NIfTI file name (e.g. ``train_1_a_1.nii.gz``,
    CT-RATE's VolumeName). ``study_key``: salted StudyInstanceUID (``st-…``); for NIfTI the volume name.
    ``ordered_by``: ``ImagePositionPatient``, ``InstanceNumber`` (fallback) or ``NIfTI axis``.
    ``spacing_mm``: median step between neighbouring slices (None when ordered by InstanceNumber).
    ``burned_in``: some slice may carry burned-in text (``phi.burned_in_risk``).
    """

    key: str
    study_key: str
    modality: str
    kind: Literal["dicom", "nifti"]
    slices: list[SliceRef]
    ordered_by: str
    spacing_mm: float | None = None
    burned_in: bool = False
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.slices)


@dataclass
class _Instance:
    source: object
    frame: int | None
    study_uid: str
    series_uid: str
    sop_uid: str
    modality: str
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    shape: tuple[int, int]
    instance_number: int | None
    localizer: bool
    burned_in: bool


def _floats(value, n: int) -> tuple[float, ...] | None:
    """``n`` finite floats from a multi-valued DS attribute, else None: a NaN or infinite position, cosine or
    spacing (a DS of "NaN" / "inf" parses as a float) would sort slices arbitrarily, so it counts as absent."""
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(np.isfinite(out)) else None


def _item(sequence, keyword: str):
    """The first item of ``sequence[0].<keyword>`` (a functional-group macro), or None."""
    if not sequence:
        return None
    macro = sequence[0].get(keyword) if hasattr(sequence[0], "get") else None
    return macro[0] if macro else None


def _int_or_none(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


class _Unusable(Exception):
    """One data set cannot give slices: ``reason`` (the skip report's key) and ``detail``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


#: Bytes of the smallest encapsulated frame: one Item tag + length (PS3.5 A.4), so an encapsulated Pixel Data
#: element of n bytes holds at most n // 8 frames.
_ITEM_HEADER_BYTES = 8


def _frames_held(ds, source) -> int | None:
    """The most frames the Pixel Data of ``ds`` can hold, from its byte length (an in-memory data set) or the
    file size (an upper bound: the header is read without pixels); None when unknown.

    Native: bytes // (Rows x Columns x SamplesPerPixel x BitsAllocated / 8) (PS3.5 8.1.1); encapsulated (or no
    Transfer Syntax UID known): bytes // 8, one Item header per frame at least (PS3.5 A.4)."""
    if isinstance(source, (str, os.PathLike)):
        try:
            size = os.path.getsize(source)
        except OSError:
            return None
    elif "PixelData" in ds:
        size = len(ds.PixelData or b"")
    else:
        return None
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or syntax.is_encapsulated:  # unknown syntax: the bound that holds for both
        return size // _ITEM_HEADER_BYTES
    bits = (_int_or_none(ds.get("Rows")) or 0) * (_int_or_none(ds.get("Columns")) or 0) \
        * (_int_or_none(ds.get("SamplesPerPixel")) or 1) * (_int_or_none(ds.get("BitsAllocated")) or 0)
    return size * 8 // bits if bits > 0 else None


def _instances(ds, source) -> list[_Instance]:
    """The frames of one data set as ``_Instance`` records (one for a single-frame image).

    Raises ``_Unusable`` before any record is made when the declared frames do not fit the pixel data
    (``truncated image``: a 9 KB file declaring a million frames), when they fit but are more than ``MAX_FRAMES``
    (``too many frames``), or when the Per-Frame Functional Groups Sequence does not have one item per frame
    (``frame count mismatch``, PS3.3 C.7.6.16)."""
    declared = max(_int_or_none(ds.get("NumberOfFrames")) or 1, 1)
    held = _frames_held(ds, source)
    if held is not None and declared > held:
        raise _Unusable("truncated image", f"{declared} frame(s) declared, the pixel data holds at most {held}")
    if declared > MAX_FRAMES:
        raise _Unusable("too many frames", f"{declared} frame(s) declared, more than the {MAX_FRAMES} read per object")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and len(per_frame) != declared:
        raise _Unusable("frame count mismatch", f"{len(per_frame)} per-frame functional groups for {declared} frame(s)")
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    common = dict(source=source, study_uid=str(ds.get("StudyInstanceUID", "")),
                  series_uid=str(ds.get("SeriesInstanceUID", "")), sop_uid=str(ds.get("SOPInstanceUID", "")),
                  modality=str(ds.get("Modality", "") or ""), shape=(int(ds.get("Rows") or 0),
                                                                    int(ds.get("Columns") or 0)),
                  instance_number=_int_or_none(ds.get("InstanceNumber")), localizer="LOCALIZER" in image_type,
                  burned_in=burned_in_risk(ds))
    if per_frame:
        shared = ds.get("SharedFunctionalGroupsSequence")
        out = []
        for index, group in enumerate(per_frame):
            groups = [group, shared[0]] if shared else [group]
            position = orientation = spacing = None
            for g in groups:
                plane = _item([g], "PlanePositionSequence")
                position = position or (_floats(plane.get("ImagePositionPatient"), 3) if plane else None)
                orient = _item([g], "PlaneOrientationSequence")
                orientation = orientation or (_orientation(orient.get("ImageOrientationPatient")) if orient else None)
                measures = _item([g], "PixelMeasuresSequence")
                spacing = spacing or (_floats(measures.get("PixelSpacing"), 2) if measures else None)
            out.append(_Instance(frame=index, position=position, orientation=orientation, pixel_spacing=spacing,
                                 **common))
        return out
    return [_Instance(frame=index if declared > 1 else None,
                      position=_floats(ds.get("ImagePositionPatient"), 3),
                      orientation=_orientation(ds.get("ImageOrientationPatient")),
                      pixel_spacing=_floats(ds.get("PixelSpacing"), 2), **common)
            for index in range(declared)]


def _read_header(source):
    """pydicom Dataset without pixel data, or None when ``source`` is not a readable DICOM image.

    Only a file that starts like DICOM is parsed: the Part 10 magic (``images.is_dicom``, PS3.10 7.1) or the
    first tag of a preamble-less data set (``images._starts_like_headless_dicom``, PS3.5 7.1); pydicom is never
    forced onto other bytes (it would parse a large zero-filled file for minutes)."""
    import pydicom

    if isinstance(source, pydicom.Dataset):
        return source
    from fuselip_med.data.images import _starts_like_headless_dicom, is_dicom

    try:
        with open(source, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return None
    part10 = is_dicom(head)
    if not (part10 or _starts_like_headless_dicom(head)):
        return None
    try:
        ds = pydicom.dcmread(os.fspath(source), stop_before_pixels=True, force=not part10)
    except Exception:  # arbitrary bytes fail the parser in many ways: then it is not DICOM
        return None
    return ds if "Rows" in ds and "Columns" in ds else None


def _normal(orientation: tuple[float, ...]) -> np.ndarray:
    """Slice normal = row cosines x column cosines (PS3.3 C.7.6.2.1.1), float64 [3]."""
    return np.cross(np.asarray(orientation[:3]), np.asarray(orientation[3:]))


def _orientation(value) -> tuple[float, ...] | None:
    """ImageOrientationPatient as 6 finite floats, or None when absent or degenerate (zero or parallel cosines,
    whose normal is ~0: every slice would project to one position); unit orthogonal cosines give a unit normal."""
    cosines = _floats(value, 6)
    return cosines if cosines is not None and np.linalg.norm(_normal(cosines)) > 0.5 else None


def _slice_key(pseudonyms: Pseudonyms, instance: _Instance) -> str:
    uid = instance.sop_uid if instance.frame is None else f"{instance.sop_uid}#{instance.frame}"
    return pseudonyms.key(uid, "sl-")


def _mixed(values: list[tuple[float, ...] | None]) -> bool:
    known = [v for v in values if v is not None]
    return bool(known) and any(not np.allclose(v, known[0], atol=TOLERANCE) for v in known[1:])


def _build(instances: list[_Instance], pseudonyms: Pseudonyms, skips: SkipReport) -> Series | None:
    """One series from its instances, or None (the reason recorded in ``skips``)."""
    first = instances[0]
    key = pseudonyms.key(first.series_uid, "se-")
    study = pseudonyms.key(first.study_uid, "st-")
    where = f"study {study}"
    unique = {(i.sop_uid, i.frame): i for i in reversed(instances)}  # the first instance of each UID (+ frame)
    if len(unique) < len(instances):
        skips.add(key, where, "duplicate SOP Instance UID",
                  f"{len(instances) - len(unique)} slice(s) left out: their SOP Instance UID (+ frame) is an earlier "
                  "file's", part="slices")
        instances = [i for i in instances if unique[(i.sop_uid, i.frame)] is i]
    localizers = [i for i in instances if i.localizer]
    volume = [i for i in instances if not i.localizer]
    if localizers:
        skips.add(key, where, "localizer left out", f"{len(localizers)} localizer image(s) (ImageType LOCALIZER)",
                  part="slices")
    if not volume:
        return None
    if len(volume) == 1:
        skips.add(key, where, "single-slice series", "one image cannot become a volume")
        return None
    if _mixed([i.orientation for i in volume]):
        skips.add(key, where, "mixed orientations", "ImageOrientationPatient differs between slices")
        return None
    if _mixed([i.pixel_spacing for i in volume]) or len({i.shape for i in volume}) > 1:
        skips.add(key, where, "mixed pixel spacings", "PixelSpacing or Rows/Columns differ between slices")
        return None
    notes: list[str] = []
    if all(i.position is not None and i.orientation is not None for i in volume):
        normal = _normal(volume[0].orientation)
        placed = sorted(((float(np.dot(i.position, normal)), i) for i in volume),
                        key=lambda p: (p[0], p[1].instance_number if p[1].instance_number is not None else 0))
        ordered_by = "ImagePositionPatient"
    else:
        placed = sorted(((None, i) for i in volume),
                        key=lambda p: (p[1].instance_number is None, p[1].instance_number or 0, p[1].frame or 0))
        ordered_by = "InstanceNumber"
        notes.append("ordered by InstanceNumber: a slice lacks a usable ImagePositionPatient/ImageOrientationPatient")
        skips.hint(f"series {key}: {notes[-1]}")
    kept: list[tuple[float | None, _Instance]] = []
    duplicates = 0
    for position, instance in placed:
        if kept and position is not None and abs(position - kept[-1][0]) < DUPLICATE_MM:
            duplicates += 1
            continue
        kept.append((position, instance))
    if duplicates:
        skips.add(key, where, "duplicate slice position", f"{duplicates} slice(s) at an occupied position left out",
                  part="slices")
    if len(kept) == 1:
        skips.add(key, where, "single-slice series", "one distinct position cannot become a volume")
        return None
    spacing = None
    if ordered_by == "ImagePositionPatient":
        steps = np.diff([p for p, _ in kept])
        spacing = float(statistics.median(steps))
        if float(steps.max()) > GAP_FACTOR * spacing:
            skips.add(key, where, "gap in slice spacing",
                      f"a step of {float(steps.max()):.3g} mm where the median step is {spacing:.3g} mm")
            return None
    slices = [SliceRef(i.source, i.frame, p, i.instance_number, _slice_key(pseudonyms, i)) for p, i in kept]
    return Series(key, study, first.modality, "dicom", slices, ordered_by, spacing,
                  any(i.burned_in for _, i in kept), notes)


def _file_key(source, ds) -> str:
    """What a skipped instance is named by (salted): its path, or its SOP Instance UID when held in memory."""
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else str(ds.get("SOPInstanceUID", ""))


def read_series(inputs: Iterable, pseudonyms: Pseudonyms, skips: SkipReport | None = None) -> list[Series]:
    """DICOM instances -> series, grouped by (StudyInstanceUID, SeriesInstanceUID), ordered along the normal.

    ``inputs``: file paths (DICOM by content, any name) or pydicom ``Dataset``s (with pixel data, e.g. read from
    a network source). Files that are not DICOM images are counted in ``skips`` (reason ``not a DICOM image``,
    named by a salted key of the path), as are instances whose declared frames the pixel data cannot hold
    (``truncated image``) or whose per-frame groups do not match their frames (``frame count mismatch``).
    Returns the usable series sorted by (study key, series key); every problem is named in ``skips`` per
    series key.
    """
    skips = skips if skips is not None else SkipReport()
    groups: dict[tuple[str, str], list[_Instance]] = {}
    for source in inputs:
        ds = _read_header(source)
        if ds is None:
            skips.add(pseudonyms.key(os.fspath(source), "file-"), "input", "not a DICOM image", part="files")
            continue
        try:
            instances = _instances(ds, source)
        except _Unusable as problem:
            where = f"series {pseudonyms.key(str(ds.get('SeriesInstanceUID', '')), 'se-')}"
            skips.add(pseudonyms.key(_file_key(source, ds), "file-"), where, problem.reason, problem.detail,
                      part="files")
            continue
        for instance in instances:
            groups.setdefault((instance.study_uid, instance.series_uid), []).append(instance)
    out = [s for s in (_build(group, pseudonyms, skips) for group in groups.values()) if s is not None]
    return sorted(out, key=lambda s: (s.study_key, s.key))


def is_nifti(path: str | os.PathLike) -> bool:
    """True for ``.nii`` / ``.nii.gz`` file names."""
    return os.fspath(path).lower().endswith(NIFTI_SUFFIXES)


def nifti_series(path: str | os.PathLike, plane: Plane = "acquisition",
                 skips: SkipReport | None = None) -> Series | None:
    """A NIfTI volume as a series of slices along ``plane`` (``acquisition``: the RAS axis nearest the file's
    third voxel axis; else axial/coronal/sagittal for isotropic volumes), read from the header only (nibabel).

    The key is the file name (CT-RATE's ``VolumeName``). A broken header, a volume that is not 3-D or one over
    ``MAX_NIFTI_VOXELS`` / ``MAX_NIFTI_SLICE_VOXELS`` is named in ``skips`` (reasons ``broken NIfTI header``,
    ``not a 3-D volume``, ``volume too large``) and gives None.
    """
    import nibabel

    name = Path(path).name
    skips = skips if skips is not None else SkipReport()
    try:
        image = nibabel.load(os.fspath(path))
        shape = tuple(int(n) for n in image.shape)
        affine = image.affine
        zooms = image.header.get_zooms()
    except Exception as error:  # nibabel raises several types for damaged headers (HeaderDataError, EOFError, ...)
        skips.add(name, "input", "broken NIfTI header", without_paths(first_line(error), path)[:200])
        return None
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3 or min(shape) < 1:
        skips.add(name, "input", "not a 3-D volume", f"shape {shape}")
        return None
    ornt = nibabel.orientations.io_orientation(affine)  # voxel axis i -> RAS axis ornt[i, 0]
    if not np.isfinite(ornt).all():  # a zero or NaN sform/qform: no axis maps to RAS
        skips.add(name, "input", "broken NIfTI header", "singular or non-finite affine (sform/qform)")
        return None
    axis = int(ornt[2, 0]) if plane == "acquisition" else PLANES[plane]
    voxel_axis = int(np.flatnonzero(ornt[:, 0] == axis)[0])
    count, step = shape[voxel_axis], float(zooms[voxel_axis])
    voxels = int(np.prod(shape, dtype=object))
    if voxels > MAX_NIFTI_VOXELS or voxels // count > MAX_NIFTI_SLICE_VOXELS:
        skips.add(name, "input", "volume too large",
                  f"shape {shape}: over {MAX_NIFTI_VOXELS} voxels or {MAX_NIFTI_SLICE_VOXELS} per slice")
        return None
    if count < 2:
        skips.add(name, "input", "single-slice series", f"{count} slice along the chosen axis")
        return None
    slices = [SliceRef(os.fspath(path), index, index * step, None, f"{name}#{index}", axis) for index in range(count)]
    return Series(name, name, "", "nifti", slices, "NIfTI axis", step)


def _is_dicomdir(path: Path) -> bool:
    return path.name.upper() == "DICOMDIR"


def _dicomdir_files(path: Path, pseudonyms: Pseudonyms, skips: SkipReport) -> list[str]:
    """The instance files a DICOMDIR (PS3.10 File-set) references, read with pydicom's ``FileSet``.

    A referenced file that is absent is named in ``skips`` (``missing file``, by a salted key of its path; pydicom's
    per-file warnings, which print the paths, are silenced); one whose link leaves the DICOMDIR's folder, or that
    is not a regular file, gets the image unit's reason (``adapters.check_image_path``). Raises
    ``StudiesError`` naming ``path`` when it is not a readable DICOMDIR (junk, truncated records)."""
    import warnings

    import pydicom
    from pydicom.fileset import FileSet

    from fuselip_med.data.adapters import check_image_path

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "The referenced SOP Instance ... does not exist: <path>"
            ds = pydicom.dcmread(os.fspath(path))
            found = {os.path.abspath(instance.path) for instance in FileSet(ds)}
    except Exception as error:  # pydicom fails a damaged DICOMDIR in many ways (InvalidDicomError, KeyError, ...)
        detail = f"{type(error).__name__}: {first_line(error, 200)}" if str(error).strip() else type(error).__name__
        raise StudiesError(f"{path}: not a readable DICOMDIR ({detail}).") from None
    folder = path.parent.resolve()
    for record in ds.get("DirectoryRecordSequence") or []:
        file_id = record.get("ReferencedFileID")  # PS3.3 F.3.2.2: path components below the DICOMDIR's folder
        if file_id is None:
            continue
        file = os.path.abspath(os.path.join(folder, *([file_id] if isinstance(file_id, str) else list(file_id))))
        if file not in found:  # FileSet leaves out the instances whose file does not exist
            skips.add(pseudonyms.key(file, "file-"), "DICOMDIR", "missing file", part="files")
    out = []
    for file in sorted(found):
        problem = check_image_path(file, [os.fspath(folder)])
        if problem is not None:
            skips.add(pseudonyms.key(file, "file-"), "DICOMDIR", problem[0], part="files")
        else:
            out.append(file)
    return out


def _walk(folder: Path, pseudonyms: Pseudonyms, skips: SkipReport) -> tuple[list[str], list[str]]:
    """(DICOM candidate files, NIfTI files) under ``folder``, recursively, sorted; DICOMDIR files are not
    instances (the files they reference are found by the walk itself), nor are the CSV/TSV tables kept beside
    volumes (reports, labels).

    Every file passes the image unit's path rule (``adapters.check_image_path``, nothing opened): a link
    resolving outside ``folder``, a symlink loop, a dangling link or a non-regular file (FIFO, socket, device)
    is named in ``skips`` (``outside image root``, ``symlink loop``, ``missing image``, ``not a file``) by a
    salted key of its path, never read; a linked folder is not followed (``symlinked folder``), as in the
    image unit."""
    from fuselip_med.data.adapters import check_image_path

    roots = [os.path.realpath(folder)]
    candidates, volumes = [], []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for linked in [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:  # os.walk skips them
            skips.add(pseudonyms.key(os.path.join(dirpath, linked), "file-"), "input", "symlinked folder",
                      "not followed", part="files")
        for filename in sorted(filenames):
            path = os.path.join(dirpath, filename)
            if _is_dicomdir(Path(filename)) or filename.startswith(".") or filename.lower().endswith((".csv", ".tsv")):
                continue
            problem = check_image_path(path, roots)
            if problem is not None:
                skips.add(pseudonyms.key(path, "file-"), "input", problem[0], part="files")
            elif is_nifti(filename):
                volumes.append(path)
            else:
                candidates.append(path)
    return candidates, volumes


def _csv_paths(table: Path, path_column: str) -> list[Path]:
    with open(table, newline="", encoding="utf-8-sig") as handle:
        dialect = csv.excel_tab if table.suffix.lower() == ".tsv" else csv.excel
        reader = csv.DictReader(handle, dialect=dialect)
        if path_column not in (reader.fieldnames or []):
            raise StudiesError(f"{table}: no column {path_column!r} (columns: {', '.join(reader.fieldnames or [])}); "
                               "name the column of files/folders with --path-column.")
        rows = [row[path_column] for row in reader if row.get(path_column)]
    return [(table.parent / row).resolve() if not os.path.isabs(row) else Path(row) for row in rows]


def find_series(input: str | os.PathLike, pseudonyms: Pseudonyms, skips: SkipReport | None = None, *,
                plane: Plane = "acquisition", path_column: str = "path") -> list[Series]:
    """Every usable series under ``input``: a folder (recursive), a DICOMDIR, a NIfTI file, a DICOM file, or a
    CSV/TSV whose ``path_column`` lists any of those (relative to the table's folder).

    Returns the series sorted by (study key, series key). Raises ``StudiesError`` naming ``input`` when it does
    not exist or holds no usable series (the skip counts in the message); skipped series are named in ``skips``
    (a second NIfTI file of an already-read name: ``duplicate volume name``, as its key would repeat).
    """
    skips = skips if skips is not None else SkipReport()
    skips.unit = "series"
    root = Path(input)
    if not root.exists():
        raise StudiesError(f"{root}: no such file or folder.")
    targets = _csv_paths(root, path_column) if root.suffix.lower() in (".csv", ".tsv") else [root]
    dicom: list[str] = []
    volumes: list[str] = []
    for target in targets:
        if target.is_dir():
            found, nifti = _walk(target, pseudonyms, skips)
            dicom += found
            volumes += nifti
        elif _is_dicomdir(target):
            dicom += _dicomdir_files(target, pseudonyms, skips)
        elif is_nifti(target):
            volumes.append(os.fspath(target))
        elif target.is_file():
            dicom.append(os.fspath(target))
        else:
            skips.add(pseudonyms.key(os.fspath(target), "file-"), "input", "missing file", part="files")
    series = read_series(dict.fromkeys(dicom), pseudonyms, skips)
    names: set[str] = set()
    for volume in dict.fromkeys(volumes):
        found = nifti_series(volume, plane, skips)
        if found is not None and found.key in names:  # the key is the file name: one series per name
            skips.add(found.key, "input", "duplicate volume name", "another NIfTI file of this name was read first")
        elif found is not None:
            names.add(found.key)
            series.append(found)
    if not series:
        raise StudiesError(f"{root}: no usable series ({skips.summary()}).")
    skips.kept = len(series)
    return sorted(series, key=lambda s: (s.study_key, s.key))

