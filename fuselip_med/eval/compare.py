"""Several models, the same tasks and data: one comparison table (markdown + JSON) and one grouped bar plot.

Each model is evaluated in turn with ``run_evaluation`` (same seed, so the same retrieval pools and TGIT
samples for every model) into ``out/<label>/``; then ``out/comparison.json``, ``out/comparison.md`` and
``out/comparison.png`` put the flat metrics side by side. ``comparison.json``::

    {"models": {"<label>": "<checkpoint>"}, "tasks": [...], "metrics": {"<task>/<metric>": {"<label>": value}},
     "created": "<ISO 8601 UTC>", "fuselip_med_version": "..."}
"""
from __future__ import annotations

import gc
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from fuselip_med.errors import InputError
from fuselip_med.eval.report import _pyplot, _save_figure, flatten_metrics, now_iso, package_version
from fuselip_med.eval.runner import run_evaluation
from fuselip_med.io import atomic_write_text

PLOT_FILE = "comparison.png"
MAX_PLOTTED_METRICS = 24


def model_labels(specs: Sequence[str]) -> dict[str, str]:
    """{label: checkpoint} for ``--model`` values: ``LABEL=CHECKPOINT`` keeps LABEL; otherwise the directory
    name (with its parent for ``.../final``), made unique with ``#2``, ``#3``. Raises ValueError for an empty
    label or checkpoint."""
    labels: dict[str, str] = {}
    for spec in specs:
        label, sep, checkpoint = spec.partition("=")
        if not sep:
            path = Path(spec.rstrip("/"))
            label, checkpoint = (f"{path.parent.name}/{path.name}" if path.name == "final" and path.parent.name
                                 else path.name or spec), spec
        if not label or not checkpoint:
            raise InputError(f"--model {spec!r}: expected CHECKPOINT or LABEL=CHECKPOINT.")
        unique, number = label, 2
        while unique in labels:
            unique, number = f"{label}#{number}", number + 1
        labels[unique] = checkpoint
    return labels


def _dir_name(label: str) -> str:
    return re.sub(r"[^\w.-]+", "_", label).strip("_") or "model"


def flat_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """metrics.json content -> {"<task>/<metric>": value} (numbers only; ``report.flatten_metrics`` unprefixed)."""
    return {key.removeprefix("eval/"): value for key, value in flatten_metrics(report).items()}


def run_comparison(
    specs: Sequence[str],
    load: Callable[[str], Any],
    tasks: Sequence[str],
    data: Mapping[str, Any],
    out_dir: str | os.PathLike,
    **eval_options: Any,
) -> dict[str, Any]:
    """Evaluate every ``--model`` value (loaded with ``load(checkpoint)``, one at a time) on ``tasks`` and write
    the comparison files. ``eval_options`` go to ``run_evaluation`` (seed, pool_size, n_pools, ...).
    Returns the comparison.json content. Raises ValueError for bad ``--model`` values and what
    ``run_evaluation`` raises for unknown tasks or missing data.
    """
    out = Path(out_dir)
    labels = model_labels(specs)
    metrics: dict[str, dict[str, float]] = {}
    for label, checkpoint in labels.items():
        model = load(checkpoint)
        report = run_evaluation(model, tasks, data, out / _dir_name(label), model_id=checkpoint, **eval_options)
        for key, value in flat_metrics(report).items():
            metrics.setdefault(key, {})[label] = value
        del model
        gc.collect()
    comparison = {"models": labels, "tasks": list(tasks), "metrics": metrics, "created": now_iso(),
                  "fuselip_med_version": package_version()}
    write_comparison(comparison, out)
    return comparison


def better(key: str) -> Callable[[Sequence[float]], float] | None:
    """How to pick the best value of a ``task/metric``: ``min`` for ranks, none for chance levels and the
    modality-gap geometry (no better direction), ``max`` for the rest (R@k, accuracies, F1, TGIT)."""
    task, _, name = key.partition("/")
    if name.endswith("_rank"):
        return min
    if task == "modality-gap" or name.startswith("chance"):
        return None
    return max


def render_comparison_markdown(comparison: Mapping[str, Any]) -> str:
    """One markdown table: a row per ``task/metric``, a column per model, the best value of each row in bold
    (see ``better``)."""
    labels = list(comparison["models"])
    lines = ["# Model comparison", "", *(f"- **{label}**: `{path}`" for label, path in comparison["models"].items()),
             "", "| metric | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for key, values in comparison["metrics"].items():
        present = [values[label] for label in labels if label in values]
        pick = better(key)
        best = pick(present) if present and pick is not None else None
        cells = []
        for label in labels:
            value = values.get(label)
            text = "-" if value is None else f"{value:.4f}"
            cells.append(f"**{text}**" if value is not None and value == best and len(present) > 1 else text)
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_comparison(comparison: Mapping[str, Any], path: str | os.PathLike) -> dict[str, list[float]]:
    """Grouped bars: one group per metric whose values all lie in [0, 1] (R@k, accuracies; at most 24), one bar
    per model. Returns {label: bar heights as drawn}, in metric order."""
    labels = list(comparison["models"])
    keys = [key for key, values in comparison["metrics"].items()
            if all(label in values and 0.0 <= values[label] <= 1.0 for label in labels)][:MAX_PLOTTED_METRICS]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.4, 0.3 * len(keys) * len(labels) + 2), 4.8))
    drawn: dict[str, list[float]] = {}
    try:
        width = 0.8 / max(1, len(labels))
        for number, label in enumerate(labels):
            positions = [index + (number - (len(labels) - 1) / 2) * width for index in range(len(keys))]
            bars = ax.bar(positions, [comparison["metrics"][key][label] for key in keys], width, label=label)
            drawn[label] = [float(bar.get_height()) for bar in bars]
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels(keys, rotation=60, ha="right", fontsize=7)
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("score")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title("Model comparison")
        _save_figure(fig, path)
    finally:
        plt.close(fig)
    return drawn


def write_comparison(comparison: Mapping[str, Any], out_dir: str | os.PathLike) -> None:
    """Write comparison.json, comparison.md and comparison.png into ``out_dir`` (each atomically)."""
    out = Path(out_dir)
    atomic_write_text(out / "comparison.json", json.dumps(comparison, indent=2))
    atomic_write_text(out / "comparison.md", render_comparison_markdown(comparison))
    plot_comparison(comparison, out / PLOT_FILE)
