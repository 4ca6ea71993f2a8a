"""The paper's results table (FuseLIP README column order): MMEB Classification, VQA, Retrieval and
Grounding, ImageNet, VG-Crop, OI-Crop, OI-Pos, TGIT, then SugarCrepe (mean over its seven subsets).

Values are percentages (100 x the task's metric, as the paper prints them); a column whose task did not
run is left empty (``null`` in JSON). Written as ``paper_table.md``, ``paper_table.json`` and
``plots/paper_table.png`` beside ``metrics.json``; the per-subtask details stay in ``metrics.json``.
"""
from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fuselip_med.io import atomic_write_bytes, atomic_write_text

from .tasks import TABLE

__all__ = ["PAPER_COLUMNS", "paper_table", "column_protocols", "write_suite_table"]

PAPER_COLUMNS: tuple[str, ...] = ("MMEB Classification", "MMEB VQA", "MMEB Retrieval", "MMEB Grounding",
                                  "ImageNet", "VG-Crop", "OI-Crop", "OI-Pos", "TGIT", "SugarCrepe")
_SOURCES: dict[str, tuple[str, str]] = {column: (t.name, metric) for t in TABLE for column, metric in t.columns}
_SOURCES["SugarCrepe"] = ("sugarcrepe", "mean_accuracy")


def paper_table(report: Mapping[str, Any]) -> dict[str, float | None]:
    """{column: percentage or None} for the columns of :data:`PAPER_COLUMNS`, from metrics.json content."""
    tasks = report.get("tasks", {})
    out: dict[str, float | None] = {}
    for column in PAPER_COLUMNS:
        task, metric = _SOURCES[column]
        value = (tasks.get(task) or {}).get("metrics", {}).get(metric)
        out[column] = None if value is None else round(100.0 * float(value), 2)
    return out


def column_protocols(report: Mapping[str, Any]) -> dict[str, str]:
    """{column: the protocol its task recorded} for the columns whose task states one (VG-Crop's image selection,
    TGIT's flip pools and rows), so a reader sees what each number was computed on."""
    tasks = report.get("tasks", {})
    out = {}
    for column in PAPER_COLUMNS:
        protocol = (tasks.get(_SOURCES[column][0]) or {}).get("protocol")
        if protocol:
            out[column] = str(protocol)
    return out


def write_suite_table(report: Mapping[str, Any], out_dir: str | os.PathLike) -> dict[str, str] | None:
    """Write the paper table files when at least one of its tasks ran; returns {kind: path} or None."""
    row = paper_table(report)
    if all(v is None for v in row.values()):
        return None
    out = Path(out_dir)
    present = {k: v for k, v in row.items() if v is not None}
    md = ["| model | " + " | ".join(PAPER_COLUMNS) + " |", "|---|" + "---:|" * len(PAPER_COLUMNS),
          f"| {report.get('model', '?')} | " + " | ".join("" if row[c] is None else f"{row[c]:.1f}"
                                                          for c in PAPER_COLUMNS) + " |"]
    protocols = column_protocols(report)
    if protocols:
        md += [""] + [f"- {column}: {protocol}" for column, protocol in protocols.items()]
    paths = {"markdown": str(atomic_write_text(out / "paper_table.md", "\n".join(md) + "\n")),
             "json": str(atomic_write_text(out / "paper_table.json",
                                           json.dumps({"model": report.get("model"), "columns": row,
                                                       "protocols": protocols}, indent=2)))}
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(present) + 2), 3.6))
    try:
        ax.bar(list(present), list(present.values()), color="#4477aa")
        ax.set_ylabel("score (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"{report.get('model', '')}: paper suite")
        ax.tick_params(axis="x", rotation=45)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    paths["plot"] = str(atomic_write_bytes(out / "plots" / "paper_table.png", buf.getvalue()))
    return paths
