"""What the toolkit may write about a patient's data: the one gate every writer goes through.

Rules (DICOM PS3.15 Annex E, the Basic Application Level Confidentiality Profile):

* no attribute of Annex E table E.1-1 is copied into anything written (``ANNEX_E_TAGS``, read from the
  ``dicom-anonymizer`` package's transcription of the 2026c edition of that table; 655 attributes: names, IDs,
  birth dates, accession numbers, institution and physician names, descriptions and comments, UIDs, ...);
* Study / Series / SOP Instance UIDs become salted hashes (``Pseudonyms``): one random salt per output (index,
  embedding file), stored in that output so rebuilds give the same keys, never printed or served;
* file paths of DICOM inputs are not written (PACS exports name folders after patients) unless the user asks
  (``PrivacyOptions.keep_paths``); even then the page shows keys unless ``show_paths``;
* images whose pixels may carry text (BurnedInAnnotation (0028,0301) = YES, PS3.3 C.7.6.1.1.7; and by default
  ultrasound and secondary-capture images, which often carry it without the flag) are embedded but get no
  thumbnail unless ``allow_burned_in``.

Burned-in text is flagged, never removed: pixels are not inspected.
"""
from __future__ import annotations

import functools
import hashlib
import hmac
import secrets
from dataclasses import dataclass

__all__ = [
    "ANNEX_E_TAGS", "INSTANCE_PREFIX", "PrivacyOptions", "Pseudonyms", "burned_in_risk", "emptied_not_removed",
    "instance_key", "is_annex_e", "is_instance_key", "new_salt",
]

#: SOP Class UID prefix of the Secondary Capture Image Storage classes (PS3.4 B.5: 1.2.840.10008.5.1.4.1.1.7[.n]).
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
#: Prefix of the salted key that names one DICOM file (an image-unit row) in every output.
INSTANCE_PREFIX = "im-"
#: Modalities whose images often carry burned-in text even without the flag (PS3.15 E.3.1 "Clean Pixel Data").
BURNED_IN_MODALITIES = frozenset({"US", "SC", "OT", "DOC", "XC"})


@functools.lru_cache(maxsize=1)
def _annex_e() -> tuple[frozenset[int], tuple[tuple[int, int], ...]]:
    """(exact tags ``0xGGGGEEEE``, (value, mask) pairs of the repeating groups such as overlays 60xx,3000)."""
    from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector

    table = dicom_anonymization_database_selector("dicomfields_2026c")["ALL_TAGS"]
    exact = frozenset((entry[0] << 16) | entry[1] for entry in table if len(entry) == 2)
    masked = tuple(((g << 16) | e, (gm << 16) | em) for g, e, gm, em in (x for x in table if len(x) == 4))
    return exact, masked


class _AnnexETags:
    """The Annex E tags as ints (``0xGGGGEEEE``), loaded on first use; ``in`` also matches repeating groups."""

    def __contains__(self, tag: object) -> bool:
        exact, masked = _annex_e()
        value = int(tag)  # type: ignore[call-overload]
        return value in exact or any(value & mask == pattern for pattern, mask in masked)

    def __iter__(self):
        return iter(sorted(_annex_e()[0]))

    def __len__(self) -> int:
        return len(_annex_e()[0]) + len(_annex_e()[1])


ANNEX_E_TAGS = _AnnexETags()


@functools.lru_cache(maxsize=1)
def _emptied() -> frozenset[int]:
    from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector

    table = dicom_anonymization_database_selector("dicomfields_2026c")
    return frozenset((g << 16) | e for name in ("Z_TAGS", "Z_D_TAGS", "X_Z_TAGS", "X_Z_D_TAGS") for g, e in table[name])


def emptied_not_removed(tag: int) -> bool:
    """True when Annex E's action for ``tag`` may be Z (replace with a zero-length value: the attribute is Type 2
    and must stay present); every other Annex E attribute may be removed (X) when not replaced by a dummy."""
    return int(tag) in _emptied()


def is_annex_e(tag: int) -> bool:
    """True when ``tag`` (``pydicom.tag.Tag`` or int ``0xGGGGEEEE``) is in PS3.15 table E.1-1, or is a private
    tag (odd group: Annex E removes private attributes unless a retention option applies)."""
    tag = int(tag)
    return tag in ANNEX_E_TAGS or bool((tag >> 16) & 1)


def new_salt() -> str:
    """A fresh random salt (128 bits, hex) for one output."""
    return secrets.token_hex(16)


@dataclass(frozen=True)
class Pseudonyms:
    """Salted hashes for DICOM UIDs: ``key(uid)`` = first 20 hex digits of HMAC-SHA256(salt, uid).

    The same salt gives the same key for the same UID (rebuilds and incremental updates match); without the
    salt a key cannot be tested against a guessed UID. ``repr`` never shows the salt.
    """

    salt: str

    def __post_init__(self) -> None:
        if not self.salt or len(self.salt) < 16:
            raise ValueError("a pseudonym salt needs at least 16 characters; use phi.new_salt()")

    def __repr__(self) -> str:
        return "Pseudonyms(salt=<hidden>)"

    @classmethod
    def fresh(cls) -> Pseudonyms:
        return cls(new_salt())

    def key(self, uid: str, prefix: str = "") -> str:
        """``prefix`` + 20 hex digits for ``uid`` (a UID, or any identifying string such as a path)."""
        digest = hmac.new(self.salt.encode(), str(uid).encode("utf-8", "surrogatepass"), hashlib.sha256)
        return prefix + digest.hexdigest()[:20]


@dataclass(frozen=True)
class PrivacyOptions:
    """What the user opted in to: store DICOM paths (``keep_paths``), show them on the page (``show_paths``,
    needs ``keep_paths``), show thumbnails of images that may carry burned-in text (``allow_burned_in``)."""

    keep_paths: bool = False
    show_paths: bool = False
    allow_burned_in: bool = False

    def __post_init__(self) -> None:
        if self.show_paths and not self.keep_paths:
            raise ValueError("--show-paths needs --keep-paths (paths are only shown where they were stored)")

    def written_path(self, path: str | None, dicom: bool) -> str | None:
        """The path to store for an input: ``None`` for DICOM unless ``keep_paths``; other files keep theirs."""
        if path is None or (dicom and not self.keep_paths):
            return None
        return path


def instance_key(pseudonyms: Pseudonyms, path) -> str | None:
    """The salted key (``im-`` + 20 hex digits) of the DICOM file at ``path``: of its SOP Instance UID
    (0008,0018), else (header without one, or unreadable) of its content hash; None when ``path`` is not a DICOM
    Part 10 file (PNG/JPEG keep their paths as ids)."""
    from fuselip_med.data.images import is_dicom

    if not is_dicom(path):
        return None
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).get("SOPInstanceUID", "") or "")
    except (OSError, ValueError, InvalidDicomError):
        uid = ""
    if not uid:
        from fuselip_med.data.hashing import content_hash

        uid = "sha256:" + content_hash(path)
    return pseudonyms.key(uid, INSTANCE_PREFIX)


def is_instance_key(id: str) -> bool:
    """True for an id made by ``instance_key`` (a keyed DICOM row, whose path the page never shows unless
    ``show_paths``)."""
    return len(id) == len(INSTANCE_PREFIX) + 20 and id.startswith(INSTANCE_PREFIX)


def burned_in_risk(dataset) -> bool:
    """True when a DICOM data set's pixels may carry text: BurnedInAnnotation = YES (PS3.3 C.7.6.1.1.7), or
    (flag absent or not NO) an ultrasound / secondary-capture / document image. ``dataset``: pydicom Dataset
    (a header read with ``stop_before_pixels`` suffices)."""
    flag = str(dataset.get("BurnedInAnnotation", "") or "").strip().upper()
    if flag == "YES":
        return True
    if flag == "NO":
        return False
    modality = str(dataset.get("Modality", "") or "").strip().upper()
    sop_class = str(dataset.get("SOPClassUID", "") or "")
    return modality in BURNED_IN_MODALITIES or sop_class.startswith(SECONDARY_CAPTURE_PREFIX)
