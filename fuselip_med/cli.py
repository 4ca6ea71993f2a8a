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


def main() -> None:
    """Entry point for ``python -m fuselip_med.cli``."""
    app()


if __name__ == "__main__":
    main()
