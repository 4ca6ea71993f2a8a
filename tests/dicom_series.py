"""Small CT and MR series written with pydicom for the DICOMweb tests: real image storage classes, one study and
series UID per series, slices along z with ImagePositionPatient / ImageOrientationPatient, distinct pixels."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

SOP_CLASS = {"CT": CTImageStorage, "MR": MRImageStorage}


def write_series(folder: Path, modality: str, n: int = 3, *, study_uid: str | None = None, seed: int = 0,
                 size: int = 32, study_date: str = "20240315", description: str = "TEST STUDY") -> list[Path]:
    """``n`` slices of one ``modality`` ("CT" or "MR") series in ``folder`` (``IM0000.dcm``, ...); pixels are a
    seeded block pattern per slice (int16; CT with HU = stored - 1024 and a soft-tissue window)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    paths = []
    for number in range(n):
        meta = FileMetaDataset()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.MediaStorageSOPClassUID = SOP_CLASS[modality]
        meta.MediaStorageSOPInstanceUID = generate_uid()
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.PatientName, ds.PatientID = "Test^Patient", "TEST-0001"
        ds.StudyDate, ds.StudyTime, ds.StudyDescription = study_date, "101500", description
        ds.AccessionNumber, ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "ACC1", "1", 1, number + 1
        ds.Modality = modality
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0, 0, 2.5 * number]
        ds.PixelSpacing, ds.SliceThickness = [0.8, 0.8], 2.5
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        blocks = rng.random((4, 4)) < 0.5
        pixels = np.kron(blocks, np.ones((size // 4, size // 4))).astype(np.int16)
        if modality == "CT":
            ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
            ds.WindowWidth, ds.WindowCenter = 400, 40
            pixels = pixels * 1000 + 24  # -1000 HU (air) and 0..  HU blocks
        else:
            pixels = pixels * 800 + 100
        ds.PixelData = pixels.astype("<i2").tobytes()
        path = folder / f"IM{number:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
