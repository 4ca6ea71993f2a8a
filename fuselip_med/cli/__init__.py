"""The ``fuselip-med`` command line: fine-tune, train, evaluate, embed, search and inspect FuseLIP models.

One module per command group, each exposing ``register(app)`` (as Accelerate's ``commands/``): ``model`` (info,
merge-lora, push), ``training`` (finetune, train), ``data`` (data demo/synth-vqa/cache-codes), ``evaluate``
(eval), ``embed``, ``search`` (index build, search, serve), ``export`` (ONNX behind a quality gate) and ``explain``
(occlusion maps). Command modules import torch, transformers and the model code only inside their functions, so
``fuselip-med --help`` starts without them. Errors: commands raise
:class:`fuselip_med.errors.UserError` subclasses; :class:`~fuselip_med.cli.errors.UserErrorGroup` prints them.
"""
from __future__ import annotations

import typer

from fuselip_med.cli import data, embed, evaluate, explain, export, model, search, training
from fuselip_med.cli.errors import DEBUG_ENV, UserErrorGroup
from fuselip_med.errors import UsageError

__all__ = ["app", "main", "with_resume_value"]

app = typer.Typer(
    name="fuselip-med",
    cls=UserErrorGroup,
    help="FuseLIP early-fusion embeddings for medical imaging: fine-tune, train, evaluate, embed.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


def _print_version(value: bool) -> None:
    if value:
        from fuselip_med import __version__

        print(f"fuselip-med {__version__}")
        raise typer.Exit()


@app.callback()
def global_options(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show debug messages (logging level DEBUG)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors; no progress bars."),
    debug: bool = typer.Option(False, "--debug", envvar=DEBUG_ENV,
                               help="Show full tracebacks for errors (also FUSELIP_MED_DEBUG=1)."),
) -> None:
    """FuseLIP early-fusion embeddings for medical imaging: fine-tune, train, evaluate, embed."""
    from fuselip_med.logs import configure_logging

    if verbose and quiet:
        raise UsageError("--verbose and --quiet contradict each other: give one.")
    configure_logging("DEBUG" if verbose else "WARNING" if quiet else "INFO")


for group in (model, training, data, evaluate, embed, search, export, explain):
    group.register(app)


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
