"""``fuselip-med data deidentify IN OUT``: de-identified copies of the DICOM files under IN, pixel data untouched.

Two steps per file, one ``dicognito.anonymizer.Anonymizer`` for the whole run (so UIDs, names and IDs are
remapped consistently: the slices of one series stay one series, its studies one study):

1. dicognito replaces UIDs (new ones, consistent within the run), person names, IDs, institution and address
   attributes with dummies and shifts dates; it sets PatientIdentityRemoved = YES and records the method;
2. every PS3.15 Annex E attribute (``data.phi``) that dicognito did not replace with a dummy (descriptions,
   comments, dates, ...) is emptied where Annex E allows Z (Type 2 attributes) and removed otherwise; private
   tags are removed; the File Meta Information is written afresh (no sending AE titles, no private information).

Output files are named by their new UIDs (``OUT/<study>/<series>/<instance>.dcm``): input file and folder names
(often patient names in PACS exports) are not copied. Pixel data is not inspected: burned-in text stays (flag:
``phi.burned_in_risk``). Files that are not DICOM, and a second file with an earlier file's SOP Instance UID (it
would replace that file's copy), are counted, not copied. Writes are atomic.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fuselip_med.data.phi import Pseudonyms, emptied_not_removed, is_annex_e
from fuselip_med.data.skips import SkipReport
from fuselip_med.errors import InputError, OutputExistsError
from fuselip_med.io import atomic_write
from fuselip_med.progress import progress_bar

__all__ = ["DeidentifyReport", "deidentify_dataset", "deidentify_folder"]

_DATES = ("DA", "DT", "TM")


@dataclass
class DeidentifyReport:
    """How many files were written and which were not (``skips``: salted file keys and reasons)."""

    written: int
    skips: SkipReport


def _annex_e_elements(ds):
    """(data set, element) for every Annex E element, nested sequences included, outermost first."""
    for element in list(ds):
        if is_annex_e(element.tag):
            yield ds, element
        if element.VR == "SQ" and element.value is not None:
            for item in element.value:
                yield from _annex_e_elements(item)


def deidentify_dataset(ds, anonymizer) -> None:
    """De-identify one pydicom data set in place (see the module docstring); pixel data is left as it is."""
    before = {(id(d), e.tag): repr(e.value) for d, e in _annex_e_elements(ds)}
    anonymizer.anonymize(ds)
    for dataset, element in list(_annex_e_elements(ds)):
        if element.tag not in dataset:  # inside a sequence removed a moment ago
            continue
        original = before.get((id(dataset), element.tag))
        if original is None:
            continue  # added by dicognito (PatientIdentityRemoved, DeidentificationMethod)
        if repr(element.value) != original and element.VR not in _DATES:
            continue  # a consistent new UID, or a dummy name / ID from dicognito (a UID it kept goes, as the rest)
        if emptied_not_removed(element.tag):
            dataset[element.tag].value = [] if element.VR == "SQ" else ""
        else:
            del dataset[element.tag]
    ds.remove_private_tags()
    _rebuild_file_meta(ds)


def _rebuild_file_meta(ds) -> None:
    """File Meta Information (PS3.10 7.1) with only what names the object and its encoding: the source's group 2
    carries the sending station's AE titles (0002,0016-0018), often named after the hospital, and private
    information (0002,0100/0102) that Annex E does not list because it is not part of the data set; the
    implementation class and version are the writer's (pydicom fills them in when the file is saved)."""
    from pydicom.dataset import FileMetaDataset

    old = getattr(ds, "file_meta", None) or FileMetaDataset()
    meta = FileMetaDataset()
    sop_class = ds.get("SOPClassUID") or old.get("MediaStorageSOPClassUID")
    if sop_class is not None:
        meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if "TransferSyntaxUID" in old:
        meta.TransferSyntaxUID = old.TransferSyntaxUID
    ds.file_meta = meta


def deidentify_folder(src: str | os.PathLike, dst: str | os.PathLike, *, seed: str | None = None,
                      overwrite: bool = False, progress: bool = True) -> DeidentifyReport:
    """De-identified copies of every DICOM file under ``src`` (recursively) into ``dst``.

    ``seed``: makes dicognito's replacements repeatable across runs (keep it secret; default: random). Raises
    ``InputError`` when ``src`` has no DICOM file or ``src`` and ``dst`` overlap (one is, or is inside, the other:
    de-identified copies would sit among identified files, even with ``overwrite``), and ``OutputExistsError``
    when ``dst`` is not empty (unless ``overwrite`` with a ``seed``: the same seed gives the same UIDs, so an
    interrupted run is finished by rerunning it). ``progress``: a bar on stderr (``fuselip_med.progress``: only
    on a terminal, not with ``-q``).
    """
    import pydicom
    from dicognito.anonymizer import Anonymizer

    from fuselip_med.data.images import image_kind

    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise InputError(f"{src}: no such file or folder.")
    inside = _nested(src, dst)
    if inside is not None:  # copies among the identified files, or identified files read from the copies' folder
        raise InputError(f"{dst} and {src}: {inside}; write the de-identified copies to a folder outside the "
                         "input (and the input outside the output), so that the output holds only de-identified files.")
    if dst.exists() and any(dst.iterdir()):
        if not overwrite:
            raise OutputExistsError(f"{dst} is not empty; choose an empty folder or pass --overwrite (with the "
                                    "earlier run's --seed).")
        if seed is None:  # a random seed gives every instance new UIDs: the earlier copies would stay beside them
            raise OutputExistsError(f"{dst} holds an earlier run's files, and without that run's --seed every file "
                                    "would be written again under new UIDs next to them (each instance twice, as "
                                    "another study); pass the same --seed to rewrite them, or choose an empty folder.")
    files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
    anonymizer = Anonymizer(seed=seed)
    keys = Pseudonyms.fresh()
    skips = SkipReport()
    skips.unit = "files"
    written = 0
    targets: set[Path] = set()
    with progress_bar(len(files), "de-identifying", unit="file", enabled=progress) as bar:
        for path in files:
            bar.advance()
            if image_kind(path) != "dicom":
                skips.add(keys.key(os.fspath(path), "file-"), "input", "not a DICOM image")
                continue
            key = keys.key(os.fspath(path), "file-")
            damage = _damage(path)
            if damage is not None:  # a cut or corrupt file is not copied as if it were whole
                skips.add(key, "input", damage)
                continue
            try:
                ds = pydicom.dcmread(path, force=True)
                if "SOPInstanceUID" not in ds:
                    skips.add(key, "input", "no SOP Instance UID")
                    continue
                deidentify_dataset(ds, anonymizer)
                sop_instance_uid = str(ds.SOPInstanceUID)
            except Exception as error:  # a damaged file fails the parser (and the anonymizer) in many ways
                skips.add(key, "input", "unreadable DICOM", type(error).__name__)
                continue
            target = dst / str(ds.get("StudyInstanceUID", "study")) / str(ds.get("SeriesInstanceUID", "series")) / \
                f"{sop_instance_uid}.dcm"
            if target in targets:  # PS3.3 C.12.1.1.1: one UID, one instance; a second file would replace the first
                skips.add(key, "input", "duplicate SOP Instance UID", "an earlier file has the same SOP Instance UID")
                continue
            targets.add(target)
            atomic_write(target, lambda tmp, ds=ds: ds.save_as(tmp, enforce_file_format=True))
            written += 1
    skips.kept = written
    if not written:
        raise InputError(f"{src}: no DICOM file to de-identify ({skips.summary()}).")
    return DeidentifyReport(written, skips)


def _nested(src: Path, dst: Path) -> str | None:
    """How ``dst`` and ``src`` overlap (symlinks resolved), or None when they are apart."""
    src, dst = src.resolve(), dst.resolve()
    if dst == src or (src.is_file() and dst == src.parent):
        return "the output folder is the input"
    if dst.is_relative_to(src):
        return "the output folder is inside the input"
    if src.is_relative_to(dst):
        return "the input is inside the output folder"
    return None


def _damage(path: Path) -> str | None:
    """``truncated image`` or ``corrupt image`` for a DICOM file cut short or damaged (as ``data.images.decode_image``
    names them everywhere in the toolkit), None otherwise: an object without pixel data (a structured report, a
    KOS) or with a compression no decoder here reads is de-identified from its header as usual."""
    from fuselip_med.data.images import ImageDecodeError, decode_image

    try:
        decode_image(path)
    except ImageDecodeError as error:
        return error.reason if error.reason in ("truncated image", "corrupt image") else None
    return None
