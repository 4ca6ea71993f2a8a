"""One metrics schema for every evaluation task, written as ``metrics.json``, ``report.md`` and PNG plots.

``metrics.json``::

    {"model": "<id>", "data": {...}, "created": "<ISO 8601 UTC>", "fuselip_med_version": "...",
     "tasks": {"<task>": {"metrics": {"<name>": number, ...}, "pool_size": N | null, "n_pools": k | null,
                          "seed": s | null, "n": items, "seconds": t, ...task-specific fields}}}

``metrics`` holds only scalars (the numbers in the report tables); task-specific structures sit beside
it: ``recall_curve`` ({direction: [R@1, R@2, ...]}), ``full_pool``, ``confusion_matrix`` ({labels,
counts}), ``per_class``, ``per_kind``, ... Every file is written atomically (temporary file, then rename),
so a reader never sees half a report. The plots are drawn from the same dictionaries that go into
``metrics.json``, and the plotting functions return the arrays they drew.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from fuselip_med.io import atomic_write_bytes, atomic_write_text

__all__ = ["TaskResult", "EvalReport", "package_version", "now_iso", "write_report", "render_markdown",
           "plot_recall_curve", "plot_confusion_matrix", "flatten_metrics"]


class TaskResult(BaseModel):
    """One task's results; extra task-specific fields are allowed and kept."""

    model_config = ConfigDict(extra="allow")

    metrics: dict[str, float]
    pool_size: int | None = None
    n_pools: int | None = None
    seed: int | None = None
    n: int | None = None
    seconds: float | None = None


class EvalReport(BaseModel):
    """What ``eval`` writes to ``report.json``: the model, the data each task read, each task's result, when and
    with which fuselip_med version (unknown keys are refused when a report is read back)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    data: dict[str, Any] = Field(default_factory=dict)
    tasks: dict[str, TaskResult] = Field(default_factory=dict)
    created: str
    fuselip_med_version: str


def package_version() -> str:
    """The installed fuselip_med version (package metadata, else ``fuselip_med.__version__``)."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("fuselip_med")
    except PackageNotFoundError:
        import fuselip_med

        return str(getattr(fuselip_med, "__version__", "unknown"))


def now_iso() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------------------
# plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: str | os.PathLike) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def plot_recall_curve(curves: Mapping[str, Mapping[str, list[float]]], path: str | os.PathLike,
                      title: str = "Recall@k") -> dict[str, dict[str, list[float]]]:
    """Recall@k against k, one line per (pool label, direction). ``curves`` = {pool label: {direction:
    [R@1, R@2, ...]}}. Returns {label: {direction: y values as drawn}} (read back from the plot lines)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    drawn: dict[str, dict[str, list[float]]] = {}
    try:
        for label, by_direction in curves.items():
            for direction, values in by_direction.items():
                ks = list(range(1, len(values) + 1))
                (line,) = ax.plot(ks, values, marker="o", markersize=3, label=f"{direction} ({label})")
                drawn.setdefault(label, {})[direction] = [float(v) for v in line.get_ydata()]
        ax.set_xlabel("k")
        ax.set_ylabel("Recall@k")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.set_title(title)
        ax.legend(fontsize=8)
        _save_figure(fig, path)
    finally:
        plt.close(fig)
    return drawn


def plot_confusion_matrix(labels: list[str], counts: list[list[int]], path: str | os.PathLike,
                          title: str = "Confusion matrix") -> dict[str, Any]:
    """Heat map of ``counts`` (rows = true, columns = predicted) with every count written in its cell.
    Returns {"counts": the matrix as drawn, "annotations": the cell texts row by row}."""
    import numpy as np

    plt = _pyplot()
    n = len(labels)
    side = max(4.0, 0.8 * n + 2)
    fig, ax = plt.subplots(figsize=(side, side * 0.85))
    try:
        image = ax.imshow(np.asarray(counts), cmap="Blues")
        drawn = np.asarray(image.get_array()).astype(int).tolist()
        vmax = max((max(r) for r in counts), default=0)
        annotations: list[list[str]] = []
        for i in range(n):
            row = []
            for j in range(n):
                text = ax.text(j, i, str(counts[i][j]), ha="center", va="center",
                               color="white" if vmax and counts[i][j] > vmax / 2 else "black", fontsize=9)
                row.append(text.get_text())
            annotations.append(row)
        ax.set_xticks(range(n), labels, rotation=45, ha="right")
        ax.set_yticks(range(n), labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        _save_figure(fig, path)
    finally:
        plt.close(fig)
    return {"counts": drawn, "annotations": annotations}


# ---------------------------------------------------------------------------------------------------------
# markdown


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return f"{v:.4f}"
    return str(v)


def _safe_name(task: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in task)


def render_markdown(report: EvalReport, plots: Mapping[str, list[str]] | None = None) -> str:
    """``report.md``: the report's tables as Markdown, with each task's ``plots`` (relative file names) linked."""
    lines = [f"# Evaluation report: {report.model}", "",
             f"- created: {report.created}", f"- fuselip_med version: {report.fuselip_med_version}"]
    for name, desc in report.data.items():
        lines.append(f"- data `{name}`: {desc}")
    for task, res in report.tasks.items():
        lines += ["", f"## {task}", ""]
        setup = [f"{k}: {_fmt(getattr(res, k))}" for k in ("n", "pool_size", "n_pools", "seed", "seconds")
                 if getattr(res, k) is not None]
        extra = res.model_extra or {}
        if "n_listed" in extra:
            setup.append(f"rows listed: {extra['n_listed']}, evaluated: {extra.get('n_evaluated')}")
        skipped, examples = extra.get("skipped"), extra.get("skip_examples") or {}
        if skipped:
            setup.append("skipped: " + ", ".join(
                f"{why} x{n}" + (f" (e.g. {', '.join(examples[why])})" if examples.get(why) else "")
                for why, n in skipped.items()))
        if setup:
            lines += ["; ".join(setup), ""]
        full = (res.model_extra or {}).get("full_pool")
        if isinstance(full, Mapping) and "metrics" in full:
            lines += [f"| metric | pools of {res.pool_size} (mean of {res.n_pools}) | "
                      f"full pool ({full.get('pool_size')}) |", "|---|---:|---:|"]
            for k, v in res.metrics.items():
                lines.append(f"| {k} | {_fmt(v)} | {_fmt(full['metrics'].get(k))} |")
        else:
            lines += ["| metric | value |", "|---|---:|"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in res.metrics.items()]
        per_class = (res.model_extra or {}).get("per_class")
        if isinstance(per_class, Mapping) and per_class:
            lines += ["", "| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
            for c, d in per_class.items():
                lines.append(f"| {c} | {_fmt(d['precision'])} | {_fmt(d['recall'])} | {_fmt(d['f1'])} | "
                             f"{d['support']} |")
        for p in (plots or {}).get(task, []):
            lines += ["", f"![{task}]({p})"]
    return "\n".join(lines) + "\n"


def write_report(report: EvalReport | Mapping[str, Any], out_dir: str | os.PathLike) -> dict[str, Any]:
    """Write ``metrics.json``, the plots (``plots/<task>_*.png``) and ``report.md`` into ``out_dir``.

    Returns {"metrics": path, "report": path, "plots": {task: [paths]}, "drawn": {task: {...}}} where
    ``drawn`` holds the values each plot shows.
    """
    if not isinstance(report, EvalReport):
        report = EvalReport.model_validate(report)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = atomic_write_text(out / "metrics.json",
                                     json.dumps(report.model_dump(mode="json"), indent=2, allow_nan=True) + "\n")
    plots: dict[str, list[str]] = {}
    drawn: dict[str, dict[str, Any]] = {}
    for task, res in report.tasks.items():
        extra = res.model_extra or {}
        stem = _safe_name(task)
        curves: dict[str, dict[str, list[float]]] = {}
        pooled = bool(res.n_pools and res.n_pools > 1)
        if isinstance(extra.get("recall_curve"), Mapping):
            curves[f"pools of {res.pool_size}" if pooled else f"pool of {res.pool_size}"] = dict(extra["recall_curve"])
        full = extra.get("full_pool")
        if pooled and isinstance(full, Mapping) and isinstance(full.get("recall_curve"), Mapping):
            curves[f"full pool of {full.get('pool_size')}"] = dict(full["recall_curve"])
        if curves:
            rel = f"plots/{stem}_recall_at_k.png"
            drawn.setdefault(task, {})["recall_curve"] = plot_recall_curve(curves, out / rel, f"{task}: Recall@k")
            plots.setdefault(task, []).append(rel)
        cm = extra.get("confusion_matrix")
        if isinstance(cm, Mapping) and "labels" in cm and "counts" in cm:
            rel = f"plots/{stem}_confusion_matrix.png"
            drawn.setdefault(task, {})["confusion_matrix"] = plot_confusion_matrix(
                list(cm["labels"]), cm["counts"], out / rel, f"{task}: confusion matrix")
            plots.setdefault(task, []).append(rel)
    report_path = atomic_write_text(out / "report.md", render_markdown(report, plots))
    return {"metrics": str(metrics_path), "report": str(report_path),
            "plots": {t: [str(out / p) for p in ps] for t, ps in plots.items()}, "drawn": drawn}


def flatten_metrics(report: Mapping[str, Any], prefix: str = "eval") -> dict[str, float]:
    """metrics.json content -> flat ``{"<prefix>/<task>/<metric>": value}`` (numbers only) for trackers,
    console tables and summaries."""
    flat = {}
    for task, result in report.get("tasks", {}).items():
        for name, value in (result.get("metrics") or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                flat[f"{prefix}/{task}/{name}"] = float(value)
    return flat
