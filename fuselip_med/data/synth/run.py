"""Caption sources -> VQA JSONL with the rules or an LLM, resumably (the work of ``fuselip-med data synth-vqa``,
whose options live in ``fuselip_med/cli/data.py``)."""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fuselip_med.io import atomic_write_text
from fuselip_med.locks import writer_lock
from fuselip_med.option_names import advise_option
from fuselip_med.progress import new_progress

from .common import read_caption_rows, write_jsonl_atomic
from .llm import LLMConfig, SynthError, SynthReport, process_state, synthesize_llm
from .rules import RULES_VERSION, synthesize_rules

__all__ = ["run_synth_vqa", "stats_path"]

GENERATORS = ("rules", "llm")


def stats_path(out: Path) -> Path:
    """Where the per-reason counts of a run go: ``<out>.stats.json`` beside the JSONL."""
    return out.with_name(out.name + ".stats.json")


def run_synth_vqa(input: str, out: Path, generator: str = "rules", *, adapter: str | None = None,
                  split: str = "train", limit: int | None = None, config: LLMConfig | None = None,
                  console: Console | None = None, dist_timeout_min: float | None = None) -> SynthReport | None:
    """Read captions from ``input`` with the adapters, write QA records to ``out`` and the counts to
    ``<out>.stats.json``; returns the report (None on non-main processes of a multi-process LLM run).
    ``dist_timeout_min``: the process group's collective timeout of an LLM run (``llm.process_state``).

    Raises ``SynthError`` (bad generator or model, changed resume settings), ``DatasetEmptyError`` /
    ``DatasetNotFoundError`` (nothing to read at ``input``) or ``KeyError`` (unknown adapter).
    """
    if generator not in GENERATORS:
        raise SynthError(f"{advise_option('generator', repr(generator))}: choose rules or llm.")
    if out.suffix != ".jsonl":
        raise SynthError(f"{advise_option('out', str(out))}: give a .jsonl file name.")
    main = generator == "rules" or process_state(dist_timeout_min).is_main_process
    with writer_lock(out, "data synth-vqa") if main else nullcontext():  # FolderBusyError while another writes
        return _synth(input, out, generator, adapter, split, limit, config, console)


def _synth(input: str, out: Path, generator: str, adapter: str | None, split: str, limit: int | None,
           config: LLMConfig | None, console: Console | None) -> SynthReport | None:
    """``run_synth_vqa``'s work, under the output's writer lock."""
    rows, skipped = read_caption_rows(input, adapter=adapter, split=split, limit=limit)
    if generator == "rules":
        not_english: list[str] = []
        records = synthesize_rules(rows, not_english)
        n = write_jsonl_atomic(out, records)
        without = {"caption without a certain question": len(rows) - len(not_english) - len({r.id for r in records}),
                   "caption not in English": len(not_english)}
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
