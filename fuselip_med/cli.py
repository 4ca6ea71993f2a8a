"""The ``fuselip-med`` command line: fine-tune, train, evaluate, embed and inspect FuseLIP models."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="fuselip-med",
    help="FuseLIP early-fusion embeddings for medical imaging: fine-tune, train, evaluate, embed.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
data_app = typer.Typer(help="Prepare datasets (the bundled demo dataset, cached image codes).", no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console()


def fail(message: str, code: int = 1) -> None:
    """Print a one-line error for the user and exit (stack traces are for bugs)."""
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


@app.command()
def info(
    model: str = typer.Argument(
        ..., help="A checkpoint (hub id, local directory or .pt/.safetensors file) or a size: tiny, small, base."
    ),
) -> None:
    """Show a model's architecture, vocabulary layout and parameter counts.

    Examples:\n
      fuselip-med info small\n
      fuselip-med info chs20/FuseLIP-S-CC3M-MM\n
      fuselip-med info runs/rocov2/final
    """
    import torch

    from fuselip_med.core.checkpoints import CheckpointError, read_checkpoint
    from fuselip_med.core.fuselip import TRANSFORMER_SIZES, FuseLIP, FuseLIPConfig

    if model in TRANSFORMER_SIZES:
        config, source_format = FuseLIPConfig.from_size(model), "architecture preset (no weights)"
    else:
        try:
            config, _, source_format = read_checkpoint(model)
        except CheckpointError as error:
            fail(str(error))
    with torch.device("meta"):
        built = FuseLIP(config)
    titok = config.titok
    table = Table(title=f"FuseLIP model: {model}", show_header=False)
    rows = [
        ("format", source_format),
        ("transformer", f"{config.transformer_size}: width {config.width}, heads {config.heads}, layers {config.layers}"),
        ("embedding dim", str(config.width)),
        ("context length", str(config.context_length)),
        ("image tokenizer", f"{config.image_tokenizer} (codebook {titok.codebook_size}, {titok.num_latent_tokens} tokens, "
                            f"width {titok.width}, layers {titok.layers}, legacy reshape {titok.is_legacy})"),
        ("vocabulary", f"{config.vocab_size} = text {config.text_vocab_size} (incl. [MASK] {config.mask_token_id}) "
                       f"+ image codes {config.image_offset}..{config.vocab_size - 1}"),
        ("MMM mask probability", str(config.mlm_probability)),
        ("trainable parameters", f"{built.trainable_parameter_count():,}"),
        ("frozen image tokenizer", f"{sum(p.numel() for p in built.image_tokenizer.parameters()):,}"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


RECIPE_HELP = "Shipped recipe name (rocov2, rocov2_lora, rocov2_demo, ...) or a path to a YAML file."
SET_HELP = "Override a recipe value, e.g. --set train.lr=3e-5 --set data.root=/data/ROCOv2 (repeatable)."
RESUME_HELP = "Continue from the newest complete checkpoint of this run (bare --resume), or from the run/checkpoint directory given."


def _run_recipe(recipe_name: str, size: Optional[str], overrides: list[str], resume: Optional[str], from_scratch: bool) -> None:
    from fuselip_med.recipes import RecipeError, load_recipe
    from fuselip_med.train.data import DataSetupError
    from fuselip_med.train.trainer import Trainer, TrainingStopped

    try:
        recipe = load_recipe(recipe_name, overrides, size=size)
    except RecipeError as error:
        fail(str(error), code=2)
    try:
        Trainer(recipe, resume=resume, from_scratch=from_scratch, console=console).run()
    except (DataSetupError, TrainingStopped) as error:
        fail(str(error))


@app.command(context_settings={"allow_interspersed_args": True})
def finetune(
    recipe: str = typer.Option("rocov2", "--recipe", "-r", help=RECIPE_HELP),
    size: Optional[str] = typer.Option(None, "--size", help="Model size (small or base; tiny for tests), sets model.size."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    resume: Optional[str] = typer.Option(None, "--resume", help=RESUME_HELP),
) -> None:
    """Fine-tune a FuseLIP checkpoint (full or LoRA) with a recipe, on Accelerate.

    Examples:\n
      fuselip-med finetune --recipe rocov2_demo\n
      fuselip-med finetune --recipe rocov2 --size base --set data.root=/data/ROCOv2_data\n
      fuselip-med finetune --recipe rocov2_lora --set model.lora.r=8\n
      accelerate launch --num_processes 4 -m fuselip_med.cli finetune --recipe rocov2\n
      fuselip-med finetune --recipe rocov2 --resume
    """
    _run_recipe(recipe, size, set_, resume, from_scratch=False)


@app.command()
def train(
    recipe: str = typer.Option(..., "--recipe", "-r", help=RECIPE_HELP),
    size: Optional[str] = typer.Option(None, "--size", help="Model size (small or base; tiny for tests), sets model.size."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    resume: Optional[str] = typer.Option(None, "--resume", help=RESUME_HELP),
) -> None:
    """Train a FuseLIP from scratch (model.init is ignored) with the same machinery as finetune.

    Examples:\n
      fuselip-med train --recipe cc3m_mm --set data.root=/data\n
      accelerate launch --multi_gpu --num_processes 8 -m fuselip_med.cli train --recipe cc3m_mm --size base
    """
    _run_recipe(recipe, size, set_, resume, from_scratch=True)


@data_app.command("demo")
def data_demo(
    out: Path = typer.Option(..., "--out", "-o", help="Directory to write the dataset into."),
    seed: int = typer.Option(0, help="Random seed; the same seed writes the same bytes."),
    n_train: int = typer.Option(480, help="Training images."),
    n_valid: int = typer.Option(96, help="Validation images."),
    n_test: int = typer.Option(96, help="Test images."),
    n_dicom: int = typer.Option(6, help="Real DICOM files from pydicom's test data to include."),
    overwrite: bool = typer.Option(False, help="Replace an existing demo dataset at --out."),
) -> None:
    """Write the synthetic radiology demo dataset in the official ROCOv2 layout.

    Example:\n
      fuselip-med data demo --out demo_data
    """
    from fuselip_med.data.demo import write_demo_dataset

    try:
        path = write_demo_dataset(out, seed=seed, n_train=n_train, n_valid=n_valid, n_test=n_test,
                                  n_dicom=n_dicom, overwrite=overwrite)
    except (FileExistsError, ValueError) as error:
        fail(str(error))
    console.print(f"Demo dataset written to {path} (train {n_train}, valid {n_valid}, test {n_test} images).")


@data_app.command("cache-codes")
def data_cache_codes(
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
    from fuselip_med.recipes import RecipeError, load_recipe
    from fuselip_med.train.data import DataSetupError
    from fuselip_med.train.image_codes import cache_codes_for_recipe

    try:
        loaded = load_recipe(recipe, set_, size=size)
    except RecipeError as error:
        fail(str(error), code=2)
    try:
        cache_codes_for_recipe(loaded, say=lambda message: console.print(message, highlight=False))
    except DataSetupError as error:
        fail(str(error))


def _load_for_inference(model: str, device: Optional[str]):
    from fuselip_med.core.checkpoints import CheckpointError
    from fuselip_med.train.lora import load_for_inference

    try:
        return load_for_inference(model, device or ("cuda" if _cuda() else "cpu"))
    except CheckpointError as error:
        fail(str(error))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@app.command("eval")
def eval_command(
    model: str = typer.Option(..., "--model", "-m", help="Checkpoint: hub id, local directory, .pt file or LoRA adapter directory."),
    tasks: str = typer.Option("rocov2-retrieval,rocov2-modality", "--tasks", "-t",
                              help="Comma-separated: rocov2-retrieval, rocov2-modality, rocov2-concepts, modality-gap, tgit, tgit-med, composed-retrieval."),
    data: list[str] = typer.Option([], "--data", "-d", help="KEY=PATH, e.g. rocov2=ROCOv2_data (both splits), rocov2_test=..., tgit=..."),
    out: Path = typer.Option(Path("eval_results"), "--out", "-o", help="Directory for metrics.json, report.md and plots."),
    pool_size: int = typer.Option(1000, help="Size of the seeded random retrieval pools."),
    n_pools: int = typer.Option(5, help="Number of random pools to average."),
    seed: int = typer.Option(0, help="Seed for pools and TGIT sampling."),
    batch_size: int = typer.Option(64, help="Embedding batch size."),
    num_workers: int = typer.Option(2, help="Image decoding workers."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: cuda when available)."),
) -> None:
    """Evaluate a model: retrieval R@k, zero-shot modality/concepts, TGIT, modality gap.

    Examples:\n
      fuselip-med eval --model runs/rocov2/final --data rocov2=ROCOv2_data\n
      fuselip-med eval -m chs20/FuseLIP-S-CC3M-MM -t rocov2-retrieval,rocov2-concepts -d rocov2=eltorio/ROCOv2-radiology
    """
    from fuselip_med.eval.report import flatten_metrics
    from fuselip_med.eval.runner import run_evaluation

    data_map = {}
    for entry in data:
        key, sep, value = entry.partition("=")
        if not sep or not key or not value:
            fail(f"--data {entry!r}: expected KEY=PATH, e.g. rocov2=ROCOv2_data.", code=2)
        data_map[key] = value
    fuselip, _, _ = _load_for_inference(model, device)
    try:
        report = run_evaluation(fuselip, [t.strip() for t in tasks.split(",") if t.strip()], data_map, out,
                                seed=seed, pool_size=pool_size, n_pools=n_pools, batch_size=batch_size,
                                num_workers=num_workers, model_id=model)
    except (ValueError, FileNotFoundError) as error:
        fail(str(error))
    table = Table(title=f"Evaluation of {model}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in flatten_metrics(report).items():
        table.add_row(key.removeprefix("eval/"), f"{value:.4f}")
    console.print(table)
    console.print(f"Wrote {out / 'metrics.json'}, {out / 'report.md'} and plots.")


@app.command()
def embed(
    model: str = typer.Option(..., "--model", "-m", help="Checkpoint: hub id, local directory, .pt file or LoRA adapter directory."),
    input: Path = typer.Option(..., "--input", "-i", help="A CSV/TSV (path, caption columns) or a folder of images (with optional .txt captions)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .npy (ids in .ids.json beside it) or .parquet."),
    kind: str = typer.Option("image", help="What to embed per row: image, text or pair (image+caption fused)."),
    batch_size: int = typer.Option(64, help="Batch size."),
    num_workers: int = typer.Option(2, help="Image decoding workers."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, ... (default: cuda when available)."),
) -> None:
    """Embed images, texts or image+text pairs for search, batched, with progress.

    Examples:\n
      fuselip-med embed -m runs/rocov2/final -i my_images/ -o image_embeddings.npy\n
      fuselip-med embed -m runs/rocov2/final -i reports.csv --kind text -o text_embeddings.parquet
    """
    from fuselip_med.data.adapters import DatasetEmptyError, get_adapter
    from fuselip_med.embed import embed_rows, rows_from_source, write_embeddings

    if kind not in ("image", "text", "pair"):
        fail(f"--kind {kind!r}: choose image, text or pair.", code=2)
    if out.suffix not in (".npy", ".parquet"):
        fail(f"--out {out}: use a .npy or .parquet file name.", code=2)
    try:
        source = get_adapter("folder")(str(input), split="train", check_files=False)
    except (DatasetEmptyError, FileNotFoundError, ValueError) as error:
        fail(str(error))
    rows = rows_from_source(source, kind)  # type: ignore[arg-type]
    if not rows:
        fail(f"{input}: no rows with {'an image' if kind == 'image' else 'a caption' if kind == 'text' else 'an image and a caption'}.")
    fuselip, _, _ = _load_for_inference(model, device)
    matrix, kept, failed = embed_rows(fuselip, rows, batch_size=batch_size, num_workers=num_workers)
    written = write_embeddings(out, matrix, kept, model)
    console.print(f"Embedded {len(kept)} {kind} rows -> {', '.join(map(str, written))} (dim {matrix.shape[1]}).")
    if failed:
        reasons: dict[str, int] = {}
        for reason in failed.values():
            reasons[reason] = reasons.get(reason, 0) + 1
        console.print(f"[yellow]Skipped {len(failed)} rows:[/] " + ", ".join(f"{r}: {n}" for r, n in reasons.items()))


@app.command("merge-lora")
def merge_lora(
    adapter: Path = typer.Argument(..., help="A LoRA adapter directory written by finetune (runs/<name>/final)."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory for the merged model (config.json + model.safetensors)."),
) -> None:
    """Fold a LoRA adapter into its base model and save a plain FuseLIP whose outputs equal base + adapter.

    Example:\n
      fuselip-med merge-lora runs/rocov2_lora/final --out models/rocov2_lora_merged
    """
    from fuselip_med.core.checkpoints import CheckpointError, save_pretrained
    from fuselip_med.train.lora import merge_adapter

    try:
        merged = merge_adapter(adapter)
    except CheckpointError as error:
        fail(str(error))
    save_pretrained(merged, out)
    console.print(f"Merged {adapter} into {out}.")


def with_resume_value(argv: list[str]) -> list[str]:
    """Let ``--resume`` stand alone: a bare ``--resume`` (last, or before another option) means ``latest``."""
    out = []
    for position, arg in enumerate(argv):
        out.append(arg)
        following = argv[position + 1] if position + 1 < len(argv) else None
        if arg == "--resume" and (following is None or following.startswith("-")):
            out.append("latest")
    return out


def main() -> None:
    """Console-script entry point (``fuselip-med``, ``python -m fuselip_med.cli``)."""
    import sys

    app(args=with_resume_value(sys.argv[1:]), prog_name="fuselip-med")


if __name__ == "__main__":
    main()
