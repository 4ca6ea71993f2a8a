"""Search results back into the PACS: a DICOM Key Object Selection (KOS) document that references the hit
instances, written with highdicom and optionally stored with STOW-RS.

The document (PS3.3 A.35.4 Key Object Selection Document IOD; content TID 2010) is titled "Of Interest"
(CID 7010, DCM 113000), carries the Key Object Description (DCM 113012) "Similar cases: <query>" and the
series description "Similar cases", so a viewer lists it as similar cases in the query's study. It belongs to
the query study (the query image's, when that is DICOM; else the top hit's) and inherits its patient module.

A KOS references instances by their real UIDs (its purpose), read from the hit files; it is the one output of the
toolkit that carries them, and it is written only when asked for (``search --export-kos`` / ``--stow``).

highdicom 0.28 places only one study's references in the Current Requested Procedure Evidence Sequence
(``sr.utils.collect_evidence``: references to a second other study are refused). Similar cases come from many
studies, and PS3.3 C.17.6.2 asks that sequence to list every instance the content references, so the document is
built by highdicom over stand-ins in the document's study and the sequence is then replaced by the full
hierarchical reference (PS3.3 Table 10-4) of the real hits.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from fuselip_med.errors import UserError

__all__ = ["KosError", "SIMILAR_CASES", "check_kos_target", "similar_cases_kos", "stow_kos", "write_kos"]

SIMILAR_CASES = "Similar cases"
# Patient and study attributes highdicom copies from the first evidence item (highdicom.ko.sop).
_INHERITED = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
              "StudyDate", "StudyTime", "ReferringPhysicianName", "SpecificCharacterSet")


class KosError(UserError, ValueError):
    """No hit is a DICOM instance (nothing a KOS could reference), the query image cannot be read, or the file to
    write is a folder, the query image or (without ``force``) an existing file."""


def check_kos_target(path: str | os.PathLike, query_image: str | os.PathLike | None = None,
                     force: bool = False) -> None:
    """Refuse, before any search work, a KOS target that would destroy data: a folder, the query image itself
    (even with ``force``), or any other existing file unless ``force`` (it would be replaced). Raises
    ``KosError`` naming the target."""
    from fuselip_med.io import same_file

    path = Path(path)
    if path.is_dir():
        raise KosError(f"--export-kos {path} is a folder; name the .dcm file to write.")
    if not path.exists():
        return
    if query_image is not None and same_file(path, query_image):
        raise KosError(f"--export-kos {path} is the query image; name another file (--force never replaces it).")
    if not force:
        raise KosError(f"--export-kos {path} exists; name a new file, or pass --force to replace it.")


def _header(path: str | os.PathLike):
    import pydicom

    return pydicom.dcmread(path, stop_before_pixels=True)


def _stand_in(source, study_uid: str, patient_from=None):
    """The attributes highdicom reads from an evidence item, in the document's study."""
    from pydicom.dataset import Dataset

    item = Dataset()
    for keyword in _INHERITED:
        setattr(item, keyword, getattr(patient_from or source, keyword, None))
    item.StudyInstanceUID = study_uid
    item.SeriesInstanceUID, item.SOPInstanceUID, item.SOPClassUID = (source.SeriesInstanceUID,
                                                                      source.SOPInstanceUID, source.SOPClassUID)
    for keyword in ("Rows", "Columns"):  # images are referenced as IMAGE content items, others as COMPOSITE
        if keyword in source:
            setattr(item, keyword, getattr(source, keyword))
    return item


def _hierarchical_references(datasets) -> list:
    """PS3.3 Table 10-4 Hierarchical SOP Instance Reference Macro items: study -> series -> SOP instances."""
    from pydicom.dataset import Dataset

    studies: dict[str, dict[str, list]] = {}
    for ds in datasets:
        studies.setdefault(ds.StudyInstanceUID, {}).setdefault(ds.SeriesInstanceUID, []).append(ds)
    items = []
    for study_uid, series in studies.items():
        study = Dataset()
        study.StudyInstanceUID = study_uid
        study.ReferencedSeriesSequence = []
        for series_uid, instances in series.items():
            item = Dataset()
            item.SeriesInstanceUID = series_uid
            item.ReferencedSOPSequence = []
            for ds in instances:
                ref = Dataset()
                ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
                item.ReferencedSOPSequence.append(ref)
            study.ReferencedSeriesSequence.append(item)
        items.append(study)
    return items


def similar_cases_kos(hit_paths: Sequence[str | os.PathLike], query: str, *,
                      query_image: str | os.PathLike | None = None):
    """A ``highdicom.ko.KeyObjectSelectionDocument`` referencing the DICOM files ``hit_paths`` (in rank order).

    ``query``: the query as text (the instruction, and/or "query image": never the image's file name, which PACS
    exports make of patient names); it goes into the Key Object Description. ``query_image``: the query image
    when it is a DICOM file; its study (and patient) hold the document, else the top hit's do. Raises
    ``KosError`` when ``hit_paths`` is empty.
    """
    from highdicom.ko import KeyObjectSelection, KeyObjectSelectionDocument
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    hits = [_header(path) for path in hit_paths]
    if not hits:
        raise KosError("no hit is a DICOM instance, so there is nothing for a Key Object Selection to reference.")
    anchor = _header(query_image) if query_image is not None else hits[0]
    study_uid = anchor.StudyInstanceUID
    stand_ins = [_stand_in(hit, study_uid, patient_from=anchor if n == 0 else None) for n, hit in enumerate(hits)]
    content = KeyObjectSelection(document_title=codes.DCM.OfInterest, referenced_objects=stand_ins,
                                 description=f"{SIMILAR_CASES}: {query}")
    document = KeyObjectSelectionDocument(evidence=stand_ins, content=content, series_instance_uid=generate_uid(),
                                          series_number=990, sop_instance_uid=generate_uid(), instance_number=1,
                                          manufacturer="fuselip-med")
    document.SeriesDescription = SIMILAR_CASES
    document.CurrentRequestedProcedureEvidenceSequence = _hierarchical_references(hits)
    return document


def write_kos(document, path: str | os.PathLike) -> Path:
    """Write ``document`` as a DICOM Part 10 file, atomically (``fuselip_med.io``)."""
    from fuselip_med.io import atomic_write

    return atomic_write(path, lambda tmp: document.save_as(tmp, enforce_file_format=True))


def stow_kos(document, server) -> None:
    """Store ``document`` on ``server`` (a ``data.adapters.dicomweb.DicomwebServer``) with STOW-RS (PS3.18 10.5);
    raises ``DicomwebError``/``DicomwebAuthError``."""
    server.call("storing the Key Object Selection with STOW-RS", lambda client: client.store_instances([document]),
                then="nothing was stored; rerun the search with --stow to store it")
