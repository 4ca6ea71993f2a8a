"""The suites' tables.

The paper's results table (FuseLIP README column order): MMEB Classification, VQA, Retrieval and
Grounding, ImageNet, VG-Crop, OI-Crop, OI-Pos, TGIT, then SugarCrepe (mean over its seven subsets).

Values are percentages (100 x the task's metric, as the paper prints them); a column whose task did not
run is left empty (``null`` in JSON). Written as ``paper_table.md``, ``paper_table.json`` and
``plots/paper_table.png`` beside ``metrics.json``; the per-subtask details stay in ``metrics.json``.
A column whose mean covers fewer subsets than it stands for (the task's ``coverage``) is labelled with the count,
``SugarCrepe (4/7)``, and the subsets left out are listed under the table with their reasons.

The radiology table (``--suite radiology``): one row per number of the radiology tasks that ran (and of their
``(leaked excluded)`` reruns, and the leakage check): task, metric, value, 95% interval and the rows it counts, from
each task's ``metrics``, ``intervals`` and ``counts``. Written as ``radiology_table.md``, ``radiology_table.json``
and ``radiology_table.png`` (each value with its interval as an error bar) beside ``metrics.json``.
"""
from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fuselip_med.io import atomic_write_bytes, atomic_write_text

from .tasks import SUITES, TABLE

__all__ = ["PAPER_COLUMNS", "paper_table", "column_labels", "column_protocols", "missing_subsets",
           "write_suite_table"]

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


def column_labels(report: Mapping[str, Any]) -> dict[str, str]:
    """{column: label}: the column name, with ``(scored/total)`` subsets when its mean covers fewer than all."""
    tasks = report.get("tasks", {})
    out = {}
    for column in PAPER_COLUMNS:
        task, metric = _SOURCES[column]
        scored, total = ((tasks.get(task) or {}).get("coverage") or {}).get(metric, (0, 0))
        out[column] = f"{column} ({scored}/{total})" if scored < total else column
    return out


def missing_subsets(report: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """{task: {subset: reason}} of the multi-subset tasks that left subsets out."""
    return {name: dict(task["missing_subsets"]) for name, task in report.get("tasks", {}).items()
            if isinstance(task, Mapping) and isinstance(task.get("missing_subsets"), Mapping)
            and task["missing_subsets"]}


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
    labels, missing = column_labels(report), missing_subsets(report)
    md = ["| model | " + " | ".join(labels[c] for c in PAPER_COLUMNS) + " |", "|---|" + "---:|" * len(PAPER_COLUMNS),
          f"| {report.get('model', '?')} | " + " | ".join("" if row[c] is None else f"{row[c]:.1f}"
                                                          for c in PAPER_COLUMNS) + " |"]
    protocols = column_protocols(report)
    if protocols:
        md += [""] + [f"- {column}: {protocol}" for column, protocol in protocols.items()]
    if missing:
        md += [""] + [f"- {task} left out {subset}: {reason}" for task, subsets in missing.items()
                      for subset, reason in subsets.items()]
    paths = {"markdown": str(atomic_write_text(out / "paper_table.md", "\n".join(md) + "\n")),
             "json": str(atomic_write_text(out / "paper_table.json",
                                           json.dumps({"model": report.get("model"), "columns": row,
                                                       "labels": labels, "missing_subsets": missing,
                                                       "protocols": protocols}, indent=2)))}
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(present) + 2), 3.6))
    try:
        ax.bar([labels[c] for c in present], list(present.values()), color="#4477aa")
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


_LEAKED_SUFFIX = " (leaked excluded)"


def radiology_table(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows ``{"task", "metric", "value", "ci": [low, high], "n"}`` of the radiology tasks in metrics.json content
    (task order of the suite; intervals and counts as each task reported them)."""
    order = {name: k for k, name in enumerate((*SUITES["radiology"], "leakage"))}
    rows = []
    tasks = report.get("tasks", {})
    for task in sorted((t for t in tasks if t.removesuffix(_LEAKED_SUFFIX) in order),
                       key=lambda t: (order[t.removesuffix(_LEAKED_SUFFIX)], t)):
        res = tasks[task]
        metrics, counts = res.get("metrics", {}), res.get("counts", {})
        for metric, ci in (res.get("intervals") or {}).items():
            if metric in metrics:
                rows.append({"task": task, "metric": metric, "value": metrics[metric],
                             "ci": [float(ci[0]), float(ci[1])], "n": counts.get(metric, res.get("n"))})
    return rows


def write_radiology_table(report: Mapping[str, Any], out_dir: str | os.PathLike) -> dict[str, str] | None:
    """Write ``radiology_table.md``/``.json``/``.png`` when a radiology task ran; returns {kind: path} or None."""
    rows = radiology_table(report)
    if not rows:
        return None
    out = Path(out_dir)
    md = [f"# Radiology evaluation: {report.get('model', '?')}", "",
          "| task | metric | value | 95% interval | rows |", "|---|---|---:|---|---:|"]
    md += [f"| {r['task']} | {r['metric']} | {r['value']:.4f} | [{r['ci'][0]:.4f}, {r['ci'][1]:.4f}] | {r['n']} |"
           for r in rows]
    paths = {"markdown": str(atomic_write_text(out / "radiology_table.md", "\n".join(md) + "\n")),
             "json": str(atomic_write_text(out / "radiology_table.json",
                                           json.dumps({"model": report.get("model"), "rows": rows}, indent=2)))}
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    labels = [f"{r['task']}: {r['metric']} (n={r['n']})" for r in rows]
    values = [r["value"] for r in rows]
    errors = [[max(0.0, r["value"] - r["ci"][0]) for r in rows], [max(0.0, r["ci"][1] - r["value"]) for r in rows]]
    fig, ax = plt.subplots(figsize=(8.0, 0.35 * len(rows) + 1.2))
    try:
        ax.errorbar(values, range(len(rows)), xerr=errors, fmt="o", color="#4477aa", capsize=3)
        ax.set_yticks(range(len(rows)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("value with 95% interval")
        ax.grid(axis="x", alpha=0.3)
        ax.set_title(f"{report.get('model', '')}: radiology suite")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    paths["plot"] = str(atomic_write_bytes(out / "radiology_table.png", buf.getvalue()))
    return paths
