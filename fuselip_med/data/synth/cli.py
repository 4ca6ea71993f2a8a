"""``fuselip-med data synth-vqa``: caption sources -> VQA JSONL with the rules or an LLM (the command body;
``fuselip_med/cli.py`` only registers it)."""
from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fuselip_med.io import atomic_write_text
from fuselip_med.locks import writer_lock
from fuselip_med.progress import new_progress

from .common import read_caption_rows, write_jsonl_atomic
from .llm import DEFAULT_MODEL, LLMConfig, SynthError, SynthReport, process_state, synthesize_llm
from .rules import RULES_VERSION, synthesize_rules

__all__ = ["run_synth_vqa", "synth_vqa_command"]

GENERATORS = ("rules", "llm")


def stats_path(out: Path) -> Path:
    """Where the per-reason counts of a run go: ``<out>.stats.json`` beside the JSONL."""
    return out.with_name(out.name + ".stats.json")


def run_synth_vqa(input: str, out: Path, generator: str = "rules", *, adapter: str | None = None,
                  split: str = "train", limit: int | None = None, config: LLMConfig | None = None,
                  console: Console | None = None) -> SynthReport | None:
    """Read captions from ``input`` with the adapters, write QA records to ``out`` and the counts to
    ``<out>.stats.json``; returns the report (None on non-main processes of a multi-process LLM run).

    Raises ``SynthError`` (bad generator or model, changed resume settings), ``DatasetEmptyError`` /
    ``DatasetNotFoundError`` (nothing to read at ``input``) or ``KeyError`` (unknown adapter).
    """
    if generator not in GENERATORS:
        raise SynthError(f"--generator {generator!r}: choose rules or llm.")
    if out.suffix != ".jsonl":
        raise SynthError(f"--out {out}: give a .jsonl file name.")
    main = generator == "rules" or process_state().is_main_process
    with writer_lock(out, "data synth-vqa") if main else nullcontext():  # FolderBusyError while another writes
        return _synth(input, out, generator, adapter, split, limit, config, console)


def _synth(input: str, out: Path, generator: str, adapter: str | None, split: str, limit: int | None,
           config: LLMConfig | None, console: Console | None) -> SynthReport | None:
    """``run_synth_vqa``'s work, under the output's writer lock."""
    rows, skipped = read_caption_rows(input, adapter=adapter, split=split, limit=limit)
    if generator == "rules":
        records = synthesize_rules(rows)
        n = write_jsonl_atomic(out, records)
        without = {"caption without a certain question": len(rows) - len({r.id for r in records})}
        report = SynthReport(str(out), len(rows), n, "rules", None, RULES_VERSION, without, skipped, 0)
    else:
        config = config or LLMConfig()
        with _progress(console) as progress:
            task = progress.add_task("generating", total=None)
            report = synthesize_llm(rows, out, config, skipped_rows=skipped,
                                    on_chunk=lambda done, total: progress.update(task, completed=done, total=total))
        if report is None:
            return None
    atomic_write_text(stats_path(out), report.to_json() + "\n")
    return report


def _progress(console: Console | None) -> Progress:
    return new_progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, enabled=process_state().is_main_process)


def synth_vqa_command(
    input: str = typer.Option(..., "--input", "-i", help="Caption source: ROCOv2 folder (official or parquet "
                              "mirror), hub id, CSV/TSV with path,caption, or CC webdataset shards."),
    out: Path = typer.Option(..., "--out", "-o", help="Output JSONL (one QA record per line)."),
    generator: str = typer.Option("rules", "--generator", "-g", help="rules (no model) or llm."),
    adapter: Optional[str] = typer.Option(None, help="Adapter to read --input with (default: by its form)."),
    split: str = typer.Option("train", help="Split to read (train, valid, test)."),
    limit: Optional[int] = typer.Option(None, help="Read at most this many captions."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="LLM: hub id or local directory."),
    revision: Optional[str] = typer.Option(None, help="LLM: hub revision."),
    batch_size: int = typer.Option(16, help="LLM: captions per generate call (per process)."),
    chunk_size: int = typer.Option(256, help="LLM: captions per resumable chunk."),
    max_new_tokens: int = typer.Option(256, help="LLM: generated tokens per caption."),
    temperature: float = typer.Option(0.7, help="LLM: sampling temperature."),
    top_p: float = typer.Option(0.9, help="LLM: nucleus sampling top-p."),
    max_retries: int = typer.Option(2, help="LLM: retries of a malformed output."),
    max_pairs: int = typer.Option(4, help="LLM: question-answer pairs asked per caption."),
    seed: int = typer.Option(0, help="LLM: sampling seed (the same seed writes the same file)."),
    dtype: str = typer.Option("auto", help="LLM: auto (bf16 on GPUs that support it), bf16, fp16 or fp32."),
) -> None:
    """Write ROCOv2-VQA style question-answer pairs from captions (rules or an LLM), resumably.

    Examples:\n
      fuselip-med data synth-vqa --input ROCOv2_data --out rocov2_vqa_train.jsonl --generator rules\n
      fuselip-med data synth-vqa -i ROCOv2_data --split test -o rocov2_vqa_test.jsonl\n
      accelerate launch --num_processes 8 -m fuselip_med.cli data synth-vqa -i ROCOv2_data -o vqa_llm.jsonl
      --generator llm --model meta-llama/Llama-3.1-8B-Instruct\n
    A killed LLM run continues when rerun with the same options (finished chunks stay in OUT.parts/).
    """
    from fuselip_med.data.adapters import DatasetEmptyError

    console = Console()
    if dtype not in ("auto", "bf16", "fp16", "fp32"):
        _fail(console, f"--dtype {dtype!r}: choose auto, bf16, fp16 or fp32.")
    for name, value in (("--batch-size", batch_size), ("--chunk-size", chunk_size),
                        ("--max-new-tokens", max_new_tokens), ("--max-pairs", max_pairs)):
        if value < 1:
            _fail(console, f"{name} {value}: give a positive number.")
    config = LLMConfig(model=_local_or_hub(model), revision=revision, batch_size=batch_size, chunk_size=chunk_size,
                       max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                       max_retries=max(0, max_retries), max_pairs=max_pairs, seed=seed, dtype=dtype)
    try:
        report = run_synth_vqa(input, out, generator, adapter=adapter, split=split, limit=limit, config=config,
                               console=console)
    except (SynthError, DatasetEmptyError, FileNotFoundError, ValueError) as error:
        _fail(console, str(error))
    except KeyError as error:
        _fail(console, f"--adapter: {error.args[0]}")
    if report is None:
        return
    table = Table(title=f"{report.generator} QA from {report.n_captions} captions -> {report.out}")
    table.add_column("count")
    table.add_column("n", justify="right")
    table.add_row("records written", str(report.n_records))
    for reason, n in {**report.dropped, **{f"input skipped: {k}": v for k, v in report.skipped_rows.items()}}.items():
        table.add_row(f"dropped: {reason}" if not reason.startswith("input") else reason, str(n))
    console.print(table)
    console.print(f"Counts written to {stats_path(out)}.")


def _local_or_hub(model: str) -> str:
    """A local directory as an absolute path (so records name it unambiguously), a hub id unchanged."""
    return str(Path(model).expanduser().resolve()) if os.path.isdir(os.path.expanduser(model)) else model


def _fail(console: Console, message: str) -> None:
    from fuselip_med.cli_errors import print_error

    print_error(console, message)
    raise typer.Exit(1)
