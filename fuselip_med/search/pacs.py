"""The search index's side of DICOMweb: index entries from the instances a PACS sync fetched into the index's
cache (``<index>/.dicomweb``), the real UIDs of hits read back from those cached files (for a KOS or a viewer
link), and viewer links from a ``--viewer-url`` template.

The index itself keeps only salted instance keys and cache paths (content hashes); the real Study / Series / SOP
Instance UIDs stay in the cached DICOM files and are read only for the outputs that exist to carry them.
"""
from __future__ import annotations

import collections
import os
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fuselip_med.errors import UserError
from fuselip_med.search.index import IndexEntry

__all__ = ["DICOMWEB_SOURCE", "HitUids", "ViewerUrlError", "check_viewer_url", "dicomweb_entries", "hit_uids",
           "viewer_link"]

DICOMWEB_SOURCE = "dicomweb"
VIEWER_FIELDS = ("study", "series", "instance")


class ViewerUrlError(UserError, ValueError):
    """A ``--viewer-url`` template with a field other than {study}, {series}, {instance}."""


def dicomweb_entries(url: str, out: str | os.PathLike, *, limit: int | None = None, process=None,
                     progress: bool = True, **options: Any):
    """(index entries, listing skip counts, ``SyncReport`` or None) for ``index build --dicomweb``.

    The main process (``process``: an Accelerate ``PartialState``, or None for one process) syncs the index's
    cache with the server (``data.adapters.dicomweb.sync_instances``); the others wait and read the cache.
    One entry per instance: id = salted instance key, image = cached file, source ``dicomweb``. Raises
    ``DicomwebError``/``DicomwebAuthError`` from the sync.
    """
    from fuselip_med.data.adapters.dicomweb import (
        INDEX_CACHE,
        DicomwebError,
        DicomwebOptions,
        DicomwebQuery,
        cached_instances,
        display_url,
        open_server,
        sync_instances,
    )

    cache = Path(out) / INDEX_CACHE
    settings = DicomwebOptions(cache=str(cache), **options)
    query = DicomwebQuery(settings.modality, settings.study_date, settings.study_description, limit)
    report = None
    if process is None or process.is_main_process:
        report = sync_instances(open_server(url, settings), query, cache, max_concurrent=settings.max_concurrent,
                                progress=progress)
    if process is not None:
        process.wait_for_everyone()
    instances = report.instances if report is not None else cached_instances(cache)
    if not instances:
        raise DicomwebError(f"{display_url(url)}: no instance matches ({query.describe()}); nothing to index.")
    entries = [IndexEntry(i.key, str(i.path), None, DICOMWEB_SOURCE) for i in instances]
    return entries, collections.Counter(), report


@dataclass(frozen=True)
class HitUids:
    """The real UIDs of one indexed DICOM instance, read from its file (PS3.3 C.7.2.1, C.7.3.1, C.12.1)."""

    study: str
    series: str
    instance: str
    sop_class: str


def hit_uids(path: str | os.PathLike | None) -> HitUids | None:
    """UIDs of the DICOM file at ``path`` (header only), or None for a missing, non-DICOM or UID-less file."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    if not path:
        return None
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return HitUids(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID),
                       str(ds.SOPClassUID))
    except (InvalidDicomError, OSError, AttributeError):
        return None


def check_viewer_url(template: str) -> str:
    """``template`` when its fields are among {study}, {series}, {instance}, each plain (no ``!conversion`` or
    ``:format``, which fail or change a UID when a link is filled) and its braces balanced (``{{`` / ``}}`` for
    literal ones); else ``ViewerUrlError``."""
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
    except ValueError:  # "Single '{' encountered", "expected '}' before end of string"
        fields = [("", "", "unbalanced")]
    unknown = [name for name, spec, conversion in fields if name not in VIEWER_FIELDS or spec or conversion]
    if unknown or not template.startswith(("http://", "https://")):
        raise ViewerUrlError(f"--viewer-url {template!r}: give an http(s) URL whose fields are among "
                             "{study}, {series}, {instance} (plain, without !conversion or :format; {{ and }} for "
                             "literal braces), e.g. https://pacs/viewer?StudyInstanceUIDs={study}.")
    return template


def viewer_link(template: str, path: str | None, index_dir: str | os.PathLike) -> str | None:
    """The viewer URL of a hit whose file was fetched from DICOMweb into the index ``index_dir`` (its
    ``.dicomweb`` cache), filled from that file's UIDs; None for any other hit (a page never links a file path)."""
    from fuselip_med.data.adapters.dicomweb import INDEX_CACHE

    cache = Path(index_dir).resolve() / INDEX_CACHE
    if not path or cache not in Path(path).resolve().parents:
        return None
    uids = hit_uids(path)
    if uids is None:
        return None
    return template.format(study=uids.study, series=uids.series, instance=uids.instance)
