"""``volumes``: (sampled slice rendering, report text) training pairs from series and a reports CSV (CT-RATE layout).

``path``: a folder of NIfTI volumes and/or DICOM series (recursive; ``data.studies.find_series``) with a reports
CSV beside them (``reports=`` names it; default: the one ``*reports*.csv`` in the folder). The CSV is keyed by
``VolumeName`` (the NIfTI file name) and holds ``Findings_EN`` and ``Impressions_EN`` (CT-RATE's columns), joined
as the report text. Each series gives ``slices`` samples (evenly sampled slices, rendered by
``data.volumes.render_slice``, in ``__getitem__`` so that DataLoader workers do the reading); the series is the
hard-negative group (its slices share one report, so the sampler keeps them in one batch).

``write_volume_demo`` writes the small synthetic CT-RATE-layout set that the ``ct_rate_demo`` recipe trains on
(``builtin:ct_rate_demo``): volumes with a bright nodule or a dark emphysema-like region, and matching reports.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from ..schema import Sample, SampleSide
from ..skips import SkipReport
from . import DatasetNotFoundError, check_index, register_adapter, require_nonempty

__all__ = ["VolumeSource", "volume_demo_path", "volumes", "write_volume_demo"]

REPORT_COLUMNS = ("Findings_EN", "Impressions_EN")


class VolumeSource:
    """Lazy (slice, report) samples: ``records`` hold (series, slice reference, report)."""

    def __init__(self, *, path: str, split: str, records: list, rendering, skipped: SkipReport):
        self.name = f"volumes/{split}"
        self.path, self.split, self.rendering, self.skipped = path, split, rendering, skipped
        self._records = records
        groups: dict[str, list[int]] = {}
        for index, (series_key, _, _) in enumerate(records):
            groups.setdefault(series_key, []).append(index)
        self._groups = list(groups.values())
        require_nonempty(len(records), path, "volumes with a report", skipped)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> Sample:
        from ..volumes import render_slice

        index = check_index(index, len(self))
        series_key, ref, report = self._records[index]
        return Sample(id=ref.key, source="volumes", query=SampleSide(image=render_slice(ref, self.rendering)),
                      target=SampleSide(text=report),
                      group=f"volumes/{series_key}", meta={"series": series_key, "split": self.split,
                                                            "image_id": ref.key})

    def groups(self) -> list[list[int]]:
        """The sampled slices of each series (one report: hard negatives of each other's series)."""
        return [list(g) for g in self._groups]

    def __repr__(self) -> str:
        return f"VolumeSource(path={self.path!r}, split={self.split!r}, n={len(self)})"


def _reports(folder: Path, reports: str | None) -> Path:
    if reports is not None:
        table = Path(reports) if os.path.isabs(reports) else folder / reports
        if not table.is_file():
            raise DatasetNotFoundError(f"reports CSV {table} does not exist")
        return table
    found = sorted(folder.glob("*reports*.csv"))
    if len(found) != 1:
        raise DatasetNotFoundError(f"{folder}: expected one *reports*.csv beside the volumes, found {len(found)}; "
                                   "name it with the adapter option reports=FILE")
    return found[0]


@register_adapter("volumes")
def volumes(path: str | os.PathLike, split: str = "train", limit: int | None = None, strict: bool = False, *,
            reports: str | None = None, slices: int = 8, rendering: str = "plain", window: str | None = None,
            salt: str | None = None) -> VolumeSource:
    """(slice, report) samples of the series under ``path`` with a report (see the module docstring).

    ``slices`` per series; ``rendering`` ``plain`` or ``multi[:w1,w2,w3]``; ``salt``: keys DICOM series as an
    earlier ``embed --unit series`` did (NIfTI volumes are keyed by file name). Series without a report are
    named in ``skipped`` (``no report``); reports without a series too (``no series``). ``strict`` is accepted for
    the adapter interface; problems are always named, never fatal, until nothing is left.
    """
    from ..phi import Pseudonyms
    from ..studies import find_series
    from ..volumes import Rendering, sample_slices

    folder = Path(path)
    if not folder.is_dir():
        raise DatasetNotFoundError(f"{folder}: no such folder of volumes")
    table = _reports(folder, reports)
    with open(table, newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.DictReader(handle))
    key_column = next((c for c in ("VolumeName", "series") if rows and c in rows[0]), None)
    if key_column is None:
        raise DatasetNotFoundError(f"{table}: no VolumeName or series column")
    texts = {row[key_column]: " ".join((row.get(c) or "").strip() for c in REPORT_COLUMNS).strip() for row in rows}
    skipped = SkipReport()
    series = find_series(folder, Pseudonyms(salt) if salt else Pseudonyms.fresh(), skipped)
    records = []
    for item in series[:limit] if limit else series:
        report = texts.pop(item.key, None)
        if not report:
            skipped.add(item.key, str(table.name), "no report")
            continue
        records += [(item.key, ref, report) for ref in sample_slices(item, slices)]
    for key in texts:
        skipped.add(key, str(table.name), "no series")
    return VolumeSource(path=str(folder), split=split, records=records, rendering=Rendering.parse(rendering, window),
                        skipped=skipped)


def write_volume_demo(out: str | os.PathLike, n: int = 24, seed: int = 0, shape=(48, 48, 12)) -> Path:
    """A synthetic CT-RATE-layout set: ``n`` NIfTI volumes (int16 HU, nibabel) and ``reports.csv``
    (VolumeName, Findings_EN, Impressions_EN). Half show a bright 'nodule', half a dark 'emphysema' region."""
    import nibabel

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        volume = rng.normal(40, 20, shape).astype(np.int16)
        side = max(2, shape[0] // 5)
        x, y = rng.integers(1, shape[0] - side - 1, 2)
        nodule = i % 2 == 0
        volume[x:x + side, y:y + side, :] = 400 if nodule else -900
        name = f"demo_{i}_a_1.nii.gz"
        nibabel.save(nibabel.Nifti1Image(volume, np.diag([1.0, 1.0, 3.0, 1.0])), str(out / name))
        rows.append([name, "A solid pulmonary nodule is seen." if nodule else "Emphysematous areas are seen.",
                     "Lung nodule." if nodule else "Emphysema."])
    with open(out / "reports.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["VolumeName", *REPORT_COLUMNS], *rows])
    return out


def volume_demo_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """The ct_rate_demo data, written on first use under ``<cache>/demo_ct_rate`` (cache root as the ROCOv2
    demo's: ``cache_dir``, else ``$FUSELIP_MED_CACHE``, else ``~/.cache/fuselip_med``)."""
    root = Path(cache_dir or os.environ.get("FUSELIP_MED_CACHE") or Path.home() / ".cache" / "fuselip_med")
    path = root.expanduser() / "demo_ct_rate"
    if not (path / "reports.csv").is_file():
        write_volume_demo(path)
    return path
