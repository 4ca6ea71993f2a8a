"""The ``data`` command group: ``data demo`` (the bundled demo dataset), ``data synth-vqa`` (VQA pairs from
captions, by rules or an LLM) and ``data cache-codes`` (a recipe's image codes, ahead of training)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from fuselip_med.cli import radcrepe
from fuselip_med.cli.common import RECIPE_HELP, SET_HELP
from fuselip_med.data.synth.llm import DEFAULT_MODEL
from fuselip_med.errors import InputError
from fuselip_med.option_names import command_line_style, flag

__all__ = ["register"]

data_app = typer.Typer(help="Prepare datasets (the bundled demo dataset, cached image codes, synthetic VQA pairs).",
                       no_args_is_help=True)


def demo(
    out: Path = typer.Option(..., "--out", "-o", help="Directory to write the dataset into."),
    seed: int = typer.Option(0, help="Random seed; the same seed writes the same bytes."),
    n_train: int = typer.Option(480, help="Synthetic training images (real DICOM files come on top)."),
    n_valid: int = typer.Option(96, help="Synthetic validation images (real DICOM files come on top)."),
    n_test: int = typer.Option(96, help="Synthetic test images (real DICOM files come on top)."),
    n_dicom: int = typer.Option(6, help="Real DICOM files from pydicom's test data to include."),
    overwrite: bool = typer.Option(False, help="Replace an existing demo dataset at --out."),
) -> None:
    """Write the synthetic radiology demo dataset in the official ROCOv2 layout.

    Example:\n
      fuselip-med data demo --out demo_data
    """
    from fuselip_med.data.demo import demo_split_counts, write_demo_dataset
    from fuselip_med.io import check_writable

    check_writable(out.parent)  # before any work: OutputError naming the folder

    path = write_demo_dataset(out, seed=seed, n_train=n_train, n_valid=n_valid, n_test=n_test, n_dicom=n_dicom,
                              overwrite=overwrite)
    written = demo_split_counts(path)
    counts = ", ".join(f"{split} {c['images']}" + (f" ({c['dicom']} of them DICOM)" if c["dicom"] else "")
                       for split in ("train", "valid", "test") if (c := written.get(split)))
    Console().print(f"Demo dataset written to {path} ({counts} images).")


def cache_codes(
    recipe: str = typer.Option(..., "--recipe", "-r", help=RECIPE_HELP),
    size: Optional[str] = typer.Option(None, "--size", help="Model size (its image tokenizer decides the codes)."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Tokenize a recipe's training images once (K augmented views + the plain view) into the code cache
    that `train.image_codes: cache` reads; training builds what is missing by itself, this does it ahead.

    Examples:\n
      fuselip-med data cache-codes --recipe rocov2 --set data.root=/data/ROCOv2_data\n
      fuselip-med data cache-codes --recipe rocov2_demo --set train.code_views=16\n
      accelerate launch --num_processes 4 -m fuselip_med.cli data cache-codes --recipe rocov2
    """
    from fuselip_med.recipes import load_recipe
    from fuselip_med.train.image_codes import cache_codes_for_recipe

    console = Console()
    cache_codes_for_recipe(load_recipe(recipe, set_, size=size), say=lambda message: console.print(message,
                                                                                                  highlight=False))


def synth_vqa(
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
    dist_timeout_min: Optional[float] = typer.Option(None, help="LLM under accelerate launch: minutes a process "
                                                     "waits at a barrier for the others (default 60, as "
                                                     "train.dist_timeout_min)."),
) -> None:
    """Write ROCOv2-VQA style question-answer pairs from captions (rules or an LLM), resumably.

    Examples:\n
      fuselip-med data synth-vqa --input ROCOv2_data --out rocov2_vqa_train.jsonl --generator rules\n
      fuselip-med data synth-vqa -i ROCOv2_data --split test -o rocov2_vqa_test.jsonl\n
      accelerate launch --num_processes 8 -m fuselip_med.cli data synth-vqa -i ROCOv2_data -o vqa_llm.jsonl
      --generator llm --model meta-llama/Llama-3.1-8B-Instruct\n
    A killed LLM run continues when rerun with the same options (finished chunks stay in OUT.parts/).
    """
    from fuselip_med.data.synth.llm import LLMConfig
    from fuselip_med.data.synth.run import run_synth_vqa, stats_path

    console = Console()
    if dtype not in ("auto", "bf16", "fp16", "fp32"):
        raise InputError(f"--dtype {dtype!r}: choose auto, bf16, fp16 or fp32.")
    for name, value in (("batch_size", batch_size), ("chunk_size", chunk_size),
                        ("max_new_tokens", max_new_tokens), ("max_pairs", max_pairs)):
        if value < 1:
            raise InputError(f"{flag(name)} {value}: give a positive number.")
    if dist_timeout_min is not None and dist_timeout_min <= 0:
        raise InputError(f"{flag('dist_timeout_min')} {dist_timeout_min:g}: give a positive number of minutes.")
    config = LLMConfig(model=_local_or_hub(model), revision=revision, batch_size=batch_size, chunk_size=chunk_size,
                       max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                       max_retries=max(0, max_retries), max_pairs=max_pairs, seed=seed, dtype=dtype)
    with command_line_style():
        report = run_synth_vqa(input, out, generator, adapter=adapter, split=split, limit=limit, config=config,
                               console=console, dist_timeout_min=dist_timeout_min)
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


def deidentify(
    src: Path = typer.Argument(..., help="A DICOM file or a folder of DICOM files (searched recursively)."),
    out: Path = typer.Argument(..., help="Empty folder for the copies, written as <study>/<series>/<instance>.dcm "
                               "under their new UIDs."),
    seed: Optional[str] = typer.Option(None, "--seed", envvar="FUSELIP_DEID_SEED", help="Secret seed that makes "
                                       "the replacements repeatable across runs (default: random; also "
                                       "FUSELIP_DEID_SEED)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a folder that is not empty."),
) -> None:
    """De-identified copies of DICOM files under the DICOM Basic Application Level Confidentiality Profile
    (PS3.15 Annex E): dicognito replaces UIDs (consistently: series stay series), names, IDs and dates; every
    other Annex E attribute is emptied or removed, private tags removed. Pixel data is untouched: burned-in
    text is not removed.

    Examples:\n
      fuselip-med data deidentify pacs_export/ deidentified/\n
      FUSELIP_DEID_SEED=... fuselip-med data deidentify new_batch/ deidentified_batch2/
    """
    from fuselip_med.data.deidentify import deidentify_folder

    report = deidentify_folder(src, out, seed=seed, overwrite=overwrite)
    console = Console()
    console.print(f"Wrote {report.written} de-identified DICOM files to {out}.", markup=False, highlight=False)
    if report.skips.total:
        console.print(f"Not copied: {report.skips.summary()}", style="yellow", markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    """Add the ``data`` group (``demo``, ``synth-vqa``, ``cache-codes``, ``radcrepe``, ``deidentify``) to the
    ``fuselip-med`` app."""
    data_app.command("deidentify")(deidentify)
    data_app.command("demo")(demo)
    data_app.command("synth-vqa")(synth_vqa)
    data_app.command("cache-codes")(cache_codes)
    radcrepe.register(data_app)
    app.add_typer(data_app, name="data")
