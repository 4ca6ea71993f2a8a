"""DICOM series and NIfTI volumes written by the tests in the published formats (pydicom, nibabel): CT series
with shuffled file names and InstanceNumbers that disagree with positions, localizers, duplicates, gaps, an
enhanced multi-frame MR; every patient attribute can carry a canary string."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, EnhancedMRImageStorage, ExplicitVRLittleEndian, generate_uid

SIZE = 16
#: Annex E attributes the canary test plants (PS3.15 table E.1-1), beside the three UIDs.
PATIENT_ATTRIBUTES = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName",
                      "ReferringPhysicianName", "OperatorsName", "StudyID", "StudyDescription", "SeriesDescription",
                      "ImageComments")


def slice_pixels(z: float, size: int = SIZE) -> np.ndarray:
    """Stored int16 values (HU + 1024) of the slice at ``z`` mm: a bright square whose place and brightness
    follow ``z``, so every position has its own image."""
    stored = np.full((size, size), -1000 + 1024, dtype=np.int16)
    step = int(z) % (size - 4)
    stored[step:step + 4, 2:size - 2] = 1024 + 40 + int(z) * 7 % 900
    return stored


def _patient(ds: Dataset, canary: str | None, study_uid: str, series_uid: str) -> None:
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    for keyword in PATIENT_ATTRIBUTES:
        value = f"{canary}{keyword[:4]}" if canary else ""
        if keyword == "PatientBirthDate":
            value = "19230101" if canary else ""
        setattr(ds, keyword, value)


def _meta(sop_class: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    return meta


def ct_slice(path: Path, z: float, *, study_uid: str, series_uid: str, instance_number: int,
             image_type=("ORIGINAL", "PRIMARY", "AXIAL"), orientation=(1, 0, 0, 0, 1, 0), spacing=(0.7, 0.7),
             canary: str | None = None, burned_in: str | None = None, truncate: bool = False) -> Path:
    """One CT Image Storage slice at (0, 0, z) mm, written with pydicom."""
    ds = Dataset()
    ds.file_meta = _meta(CTImageStorage)
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.ImageType, ds.InstanceNumber = "CT", list(image_type), instance_number
    _patient(ds, canary, study_uid, series_uid)
    ds.FrameOfReferenceUID = series_uid + ".9"
    ds.ImagePositionPatient = [0.0, 0.0, float(z)]
    ds.ImageOrientationPatient = list(orientation)
    ds.PixelSpacing = list(spacing)
    if burned_in is not None:
        ds.BurnedInAnnotation = burned_in
    ds.Rows = ds.Columns = SIZE
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = 1.0, -1024.0
    ds.WindowWidth, ds.WindowCenter = 400, 40
    data = slice_pixels(z).astype("<i2").tobytes()
    ds.PixelData = data[: len(data) // 3] if truncate else data
    ds.save_as(path, enforce_file_format=True)
    return path


def ct_series(folder: Path, n: int = 8, *, spacing_mm: float = 2.5, shuffle_seed: int | None = 0,
              study_uid: str | None = None, series_uid: str | None = None, canary: str | None = None,
              z0: float = 0.0, **slice_options) -> dict:
    """A CT series of ``n`` slices written as ``IM<random>`` files; InstanceNumbers are the reverse of the
    position order (they disagree with positions). Returns {"study", "series", "files": {z: path}}."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = study_uid or generate_uid(), series_uid or generate_uid()
    order = list(range(n))
    names = [f"IM{100000 + i}" for i in range(n)]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(names)
    files = {}
    for i in order:
        z = z0 + i * spacing_mm
        files[z] = ct_slice(folder / names[i], z, study_uid=study_uid, series_uid=series_uid,
                            instance_number=n - i, canary=canary, **slice_options)
    return {"study": study_uid, "series": series_uid, "files": files}


def enhanced_mr(path: Path, n_frames: int = 5, *, spacing_mm: float = 3.0, study_uid: str | None = None,
                reverse: bool = True) -> dict:
    """An Enhanced MR Image Storage object: ``n_frames`` frames whose per-frame Plane Position Sequence puts
    them at z = i * spacing (stored in reverse order when ``reverse``); orientation and pixel measures shared."""
    ds = Dataset()
    ds.file_meta = _meta(EnhancedMRImageStorage)
    ds.SOPClassUID, ds.SOPInstanceUID = EnhancedMRImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.ImageType, ds.InstanceNumber = "MR", ["ORIGINAL", "PRIMARY", "M", "NONE"], 1
    study_uid, series_uid = study_uid or generate_uid(), generate_uid()
    _patient(ds, None, study_uid, series_uid)
    ds.NumberOfFrames = n_frames
    ds.Rows = ds.Columns = SIZE
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    shared = Dataset()
    orientation, measures = Dataset(), Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    measures.PixelSpacing, measures.SliceThickness = [1.0, 1.0], spacing_mm
    shared.PlaneOrientationSequence, shared.PixelMeasuresSequence = Sequence([orientation]), Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames, zs = [], []
    for stored_index in range(n_frames):
        z = (n_frames - 1 - stored_index if reverse else stored_index) * spacing_mm
        group, plane = Dataset(), Dataset()
        plane.ImagePositionPatient = [0.0, 0.0, z]
        group.PlanePositionSequence = Sequence([plane])
        frames.append(group)
        zs.append(z)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = np.stack([np.abs(slice_pixels(z)).astype("<u2") for z in zs]).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return {"study": study_uid, "series": series_uid, "z": zs}


def nifti_volume(path: Path, shape=(12, 10, 6), zooms=(1.0, 1.0, 2.0), seed: int = 0) -> np.ndarray:
    """A NIfTI-1 volume written with nibabel (int16 HU, RAS affine with ``zooms``); returns the data."""
    import nibabel

    data = np.random.default_rng(seed).integers(-1000, 1000, shape).astype(np.int16)
    nibabel.save(nibabel.Nifti1Image(data, np.diag([*zooms, 1.0])), str(path))
    return data
