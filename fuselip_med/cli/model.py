"""``info``, ``merge-lora`` and ``push``: inspect a model, fold a LoRA adapter into its base, upload a model."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from fuselip_med.cli.common import BASE_HELP

__all__ = ["register"]


def info(
    model: Optional[str] = typer.Argument(
        None, help="A checkpoint (hub id, local directory or .pt/.safetensors file) or a size: tiny, small, base."
    ),
    arch: Optional[str] = typer.Option(None, "--arch", help="Preset arch: fuselip, siglip_sf or siglip_mlf."),
    size: Optional[str] = typer.Option(None, "--size", help="Preset size: tiny, small or base."),
    base: Optional[str] = typer.Option(None, "--base", help=BASE_HELP),
) -> None:
    """Show a model's architecture and exact parameter counts by part (image, text, fusion, trainable, total).

    Examples:\n
      fuselip-med info small\n
      fuselip-med info --arch siglip_mlf --size base\n
      fuselip-med info chs20/FuseLIP-S-CC3M-MM\n
      fuselip-med info runs/rocov2/final\n
      fuselip-med info runs/rocov2_lora/final --base models/FuseLIP-S
    """
    from fuselip_med.model_info import info_rows

    title, rows = info_rows(model, arch, size, base)
    table = Table(title=title, show_header=False)
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)


def merge_lora(
    adapter: Path = typer.Argument(..., help="A LoRA adapter directory written by finetune (runs/<name>/final)."),
    out: Path = typer.Option(..., "--out", "-o",
                             help="Directory for the merged model (config.json + model.safetensors)."),
    base: Optional[str] = typer.Option(None, "--base", help=BASE_HELP),
) -> None:
    """Fold a LoRA adapter into its base model and save a plain FuseLIP whose outputs equal base + adapter.

    Examples:\n
      fuselip-med merge-lora runs/rocov2_lora/final --out models/rocov2_lora_merged\n
      fuselip-med merge-lora adapter/ --base /mnt/models/FuseLIP-S --out merged/
    """
    from fuselip_med.core.lora import merge_adapter
    from fuselip_med.io import check_writable

    check_writable(out.parent)  # before the merge: OutputError naming the folder
    merge_adapter(adapter, base=base).save_pretrained(out)
    Console().print(f"Merged {adapter} into {out}.")


def push(
    folder: Path = typer.Argument(..., help="A saved model or LoRA adapter folder, e.g. runs/rocov2/final."),
    repo_id: str = typer.Option(..., "--repo-id", help="Hub repository to create or update, e.g. me/fuselip-rocov2."),
    private: bool = typer.Option(False, "--private", help="Create the repository as private."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch to push to (default: main)."),
    message: str = typer.Option("Upload FuseLIP model with fuselip-med", "--message", help="Commit message."),
    token: Optional[str] = typer.Option(None, "--token", envvar="HF_TOKEN",
                                        help="Hub token (default: the saved login)."),
) -> None:
    """Upload a saved model (or LoRA adapter) folder, with its model card, to the Hugging Face Hub.

    The folder is checked first (config, weights, an adapter's base must be a hub id); nothing half-valid is pushed.

    Examples:\n
      fuselip-med push runs/rocov2/final --repo-id me/fuselip-s-rocov2\n
      fuselip-med push runs/rocov2_lora/final --repo-id me/fuselip-s-rocov2-lora --private
    """
    from fuselip_med.core.push import push_folder

    url = push_folder(folder, repo_id, private=private, revision=revision, commit_message=message, token=token)
    Console().print(f"Pushed {folder} to {repo_id}: {url}")


def register(app: typer.Typer) -> None:
    """Add ``info``, ``merge-lora`` and ``push`` to the ``fuselip-med`` app."""
    app.command()(info)
    app.command("merge-lora")(merge_lora)
    app.command()(push)
