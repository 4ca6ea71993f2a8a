"""One skip report for every entry point: each row an adapter, ``embed``, ``eval`` or the trainer does not use is
named here with its ID (or line), where it came from and why.

``SkipReport`` is a ``collections.Counter`` of reasons (so ``report["missing image"]`` and ``dict(report)`` give
the counts per reason) that also keeps every entry ``(id, source, reason, detail)``. The console gets
``summary()`` (counts per reason and a few example IDs), the output folder gets ``write_csv`` (``skipped.csv``:
the full list), and ``metrics.json`` gets ``as_dict()``.
"""
from __future__ import annotations

import collections
import csv
import io
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fuselip_med.io import atomic_write_bytes

__all__ = ["SKIPPED_CSV_COLUMNS", "SkipEntry", "SkipReport"]

SKIPPED_CSV_COLUMNS = ("id", "source", "reason", "detail")
SKIPPED_CSV = "skipped.csv"
"""The name of the full skip list inside an output folder (an evaluation's, an index's)."""


@dataclass(frozen=True)
class SkipEntry:
    """One row not used: ``id`` (the row's ID, or ``line N`` / the file when it has none), ``source`` (the file
    and line, or the dataset), ``reason`` (short, the key counts are kept under) and an optional ``detail``.
    ``part``: empty when a whole unit (row, series) is skipped; else what was left out instead, in the plural
    (``slices`` of a series, ``files`` of an input), which the summary does not count as skipped units."""

    id: str
    source: str
    reason: str
    detail: str = ""
    part: str = ""


class SkipReport(collections.Counter):
    """Counts per reason (a ``Counter``) plus every named entry (``entries``) and the number of rows kept.

    ``add`` is the one way to record a skip; plain ``report[reason] += 1`` still counts but names nothing.
    ``total`` (a property, unlike ``Counter.total()``) is the number of skips; ``kept`` is set by whoever
    knows how many rows were used.
    """

    unit = "rows"  # what summary() calls the things counted

    def __init__(self, counts: Any = None, *, max_examples: int = 3):
        super().__init__()
        self.entries: list[SkipEntry] = []
        self.kept = 0
        self.max_examples = max_examples
        self.hints: list[str] = []
        if counts:
            collections.Counter.update(self, counts)

    def __reduce__(self):  # Counter's own drops the entries (DataLoader workers pickle sources)
        return type(self), (dict(self),), dict(self.__dict__)

    def add(self, id: object, source: object, reason: str, detail: str = "", *, part: str = "") -> None:
        """Record one skipped row under ``reason``; with ``part`` (plural: ``slices``, ``files``) a part of a unit
        or of the input left out, not a unit (``id`` may then name the unit it belongs to)."""
        self[reason] += 1
        self.entries.append(SkipEntry(str(id), str(source), reason, detail, part))

    def hint(self, text: str) -> None:
        """Attach advice shown after the summary (e.g. the encoding a table looks like); kept once."""
        if text not in self.hints:
            self.hints.append(text)

    def extend(self, other: SkipReport | collections.Counter | None) -> SkipReport:
        """Add another report's entries (or a plain Counter's counts) to this one; returns self."""
        if other is None:
            return self
        if isinstance(other, SkipReport):
            for entry in other.entries:
                self.add(entry.id, entry.source, entry.reason, entry.detail, part=entry.part)
            unnamed = collections.Counter(other) - collections.Counter(e.reason for e in other.entries)
            for text in other.hints:
                self.hint(text)
        else:
            unnamed = collections.Counter(other)
        collections.Counter.update(self, unnamed)
        return self

    @property
    def total(self) -> int:  # type: ignore[override]
        return sum(self.values())

    @property
    def counts(self) -> collections.Counter:
        """The counts per reason as a plain ``Counter``."""
        return collections.Counter(dict(self))

    @property
    def examples(self) -> dict[str, list[str]]:
        """Per reason, the first ``max_examples`` distinct IDs of its entries."""
        out: dict[str, list[str]] = {}
        for entry in self.entries:
            ids = out.setdefault(entry.reason, [])
            if len(ids) < self.max_examples and entry.id not in ids:
                ids.append(entry.id)
        return out

    def by_reason(self) -> dict[str, int]:
        """{reason: count}, most frequent first."""
        return dict(self.most_common())

    def as_dict(self) -> dict[str, Any]:
        """``{"kept", "skipped", "by_reason", "examples"}`` for metrics files."""
        examples = self.examples
        out = {"kept": self.kept, "skipped": self.total, "by_reason": self.by_reason(),
               "examples": {reason: examples.get(reason, []) for reason in self.by_reason()}}
        if self.hints:
            out["hints"] = list(self.hints)
        return out

    def summary(self) -> str:
        """One line: ``skipped 4 of 5 rows: 3 missing image (e.g. a, b, c); 1 empty caption (e.g. d)``, then the
        parts left out (``slices left out: 1 duplicate slice position (e.g. se-…)``), then the hints. Only
        entries without ``part`` (and unnamed counts) are skipped units."""
        examples = self.examples
        parts: dict[str, collections.Counter] = {}
        for entry in self.entries:
            if entry.part:
                parts.setdefault(entry.part, collections.Counter())[entry.reason] += 1
        units = self.counts - sum(parts.values(), collections.Counter())

        def listed(counts: collections.Counter) -> str:
            return "; ".join(f"{count} {reason}" + (f" (e.g. {', '.join(examples[reason])})"
                                                    if examples.get(reason) else "")
                             for reason, count in counts.most_common())

        skipped = sum(units.values())
        if skipped:
            head = f"skipped {skipped} of {skipped + self.kept} {self.unit}: {listed(units)}"
        else:
            head = f"no {self.unit} found" if parts and not self.kept else f"no {self.unit} skipped ({self.kept} kept)"
        tail = "".join(f"; {part} left out: {listed(counts)}" for part, counts in parts.items())
        return head + tail + "".join(f". {text}" for text in self.hints)

    def csv_text(self) -> str:
        """The entries as CSV text with the header ``id,source,reason,detail``."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(SKIPPED_CSV_COLUMNS)
        writer.writerows((e.id, e.source, e.reason, e.detail) for e in self.entries)
        return buffer.getvalue()

    def write_csv(self, path: str | os.PathLike) -> Path:
        """Write the full list to ``path`` (UTF-8, atomically: temporary file then rename); returns the path."""
        return atomic_write_bytes(path, self.csv_text().encode("utf-8", "backslashreplace"))

    @classmethod
    def merged(cls, reports: Iterable[SkipReport | collections.Counter | None]) -> SkipReport:
        """A new report holding the entries of all ``reports``."""
        out = cls()
        for report in reports:
            out.extend(report)
        return out
