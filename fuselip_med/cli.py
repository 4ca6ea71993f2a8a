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
data_app = typer.Typer(help="Prepare datasets (the bundled demo dataset).", no_args_is_help=True)
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
RESUME_HELP = "Continue from the newest complete checkpoint of this run, or from the run/checkpoint directory given."


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
    resume: Optional[str] = typer.Option(None, "--resume", help=RESUME_HELP + " Use --resume latest for the newest."),
) -> None:
    """Fine-tune a FuseLIP checkpoint (full or LoRA) with a recipe, on Accelerate.

    Examples:\n
      fuselip-med finetune --recipe rocov2_demo\n
      fuselip-med finetune --recipe rocov2 --size base --set data.root=/data/ROCOv2_data\n
      fuselip-med finetune --recipe rocov2_lora --set model.lora.r=8\n
      accelerate launch --num_processes 4 -m fuselip_med.cli finetune --recipe rocov2\n
      fuselip-med finetune --recipe rocov2 --resume latest
    """
    _run_recipe(recipe, size, set_, resume, from_scratch=False)


@app.command()
def train(
    recipe: str = typer.Option(..., "--recipe", "-r", help=RECIPE_HELP),
    size: Optional[str] = typer.Option(None, "--size", help="Model size (small or base; tiny for tests), sets model.size."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    resume: Optional[str] = typer.Option(None, "--resume", help=RESUME_HELP + " Use --resume latest for the newest."),
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


def main() -> None:
    """Entry point for ``python -m fuselip_med.cli``."""
    app()


if __name__ == "__main__":
    main()
