"""What a training run prints: the plan, metric tables, the progress bar and the closing summary (rich).

Only the main process prints; every function here is a no-op elsewhere (``TrainConsole(enabled=False)``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from fuselip_med.progress import new_progress

SUMMARY_METRICS = {"image_to_text_R@1", "image_to_text_R@5", "image_to_text_R@10", "text_to_image_R@1",
                   "text_to_image_R@5", "text_to_image_R@10", "accuracy", "macro_f1", "mean"}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


class TrainConsole:
    """The main process's console output for one run."""

    def __init__(self, console: Console, enabled: bool, progress: bool):
        self.console = console
        self.enabled = enabled
        self.show_progress = progress and enabled

    def say(self, message: str) -> None:
        """One line (rich markup allowed)."""
        if self.enabled:
            self.console.print(message, highlight=False)

    def progress(self) -> Progress:
        """The step bar: loss, learning rate and samples/s are refreshed at the logging cadence."""
        return new_progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("lr {task.fields[lr]:.2e}"),
            TextColumn("{task.fields[rate]:.1f} samples/s"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=self.console, enabled=self.show_progress,
        )

    def plan(self, rows: list[tuple[str, str]], title: str) -> None:
        """The table printed before training (model, data, steps, optimisation, run directory)."""
        if not self.enabled:
            return
        table = Table(title=title, show_header=False)
        for label, value in rows:
            table.add_row(label, value)
        self.console.print(table)

    def metrics(self, title: str, metrics: dict[str, float]) -> None:
        """A two-column table of flat ``eval/<task>/<metric>`` values."""
        if not self.enabled or not metrics:
            return
        table = Table(title=title)
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key, value in metrics.items():
            table.add_row(key.removeprefix("eval/"), f"{value:.4f}")
        self.console.print(table)

    def summary(self, *, steps: int, interrupted: bool, seconds: float, samples: int, losses: list[float],
                bad_steps: int, skips: str, before: dict[str, float], after: dict[str, float],
                final_dir: Path | None, checkpoints: Path) -> None:
        """The closing table: length, speed, first/last loss, skips, headline metrics before -> after."""
        if not self.enabled:
            return
        table = Table(title="Summary", show_header=False)
        table.add_row("steps", str(steps) + (" (interrupted)" if interrupted else ""))
        table.add_row("time", f"{seconds:.1f} s ({samples / max(seconds, 1e-9):.1f} samples/s)")
        if losses:
            table.add_row("loss first -> last", f"{losses[0]:.4f} -> {losses[-1]:.4f}")
        table.add_row("skipped steps (non-finite loss)", str(bad_steps))
        table.add_row("skipped samples", skips)
        for key in sorted(set(before) | set(after)):
            if key.split("/")[-1] in SUMMARY_METRICS:
                table.add_row(key.removeprefix("eval/"), f"{_fmt(before.get(key))} -> {_fmt(after.get(key))}")
        table.add_row("final model", str(final_dir) if final_dir else "not written")
        table.add_row("checkpoints", str(checkpoints))
        self.console.print(table)


def plan_rows(recipe: Any, model: Any, data: Any, total_steps: int, init: str | None, lora_weights: int | None,
              accelerator: Any, run_dir: Path, resume_from: Path | None) -> list[tuple[str, str]]:
    """The rows of the plan table for a recipe, its (unwrapped) model and ``TrainData``."""
    train = recipe.train
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora = f" + LoRA r={recipe.model.lora.r} ({lora_weights:,} adapter weights)" if lora_weights is not None else ""
    rows = [("model", f"{recipe.model.arch} {recipe.model.size} from {init or 'scratch'}{lora}"),
            ("trainable parameters", f"{trainable:,}")]
    rows += [(f"data: {label}", f"{size:,} samples, weight {weight:g}") for label, size, weight in data.describe()]
    if data.load_skips:
        rows.append(("skipped while loading", ", ".join(f"{k}: {v}" for k, v in data.load_skips.items())))
    rows.append(("steps", f"{total_steps:,} ({data.sampler.batches_per_epoch():,} batches per epoch, global batch "
                          f"{train.batch_size} x accumulation {train.grad_accum})"))
    rows.append(("image codes", train.image_codes + (f" ({train.code_views} views)" if train.image_codes != "pixels"
                                                      else "")))
    rows.append(("optimisation", f"AdamW lr {train.lr:g}, wd {train.weight_decay:g}, warmup {train.warmup_steps}, "
                                 f"{train.precision}, {accelerator.num_processes} process(es) on {accelerator.device}"
                                 + (", compiled" if train.compile else "")
                                 + (", activation checkpointing" if train.grad_checkpointing else "")))
    rows.append(("run directory", str(run_dir) + (f" (resuming {resume_from})" if resume_from else "")))
    return rows
