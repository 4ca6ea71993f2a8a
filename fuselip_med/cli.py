"""The ``fuselip-med`` command line: fine-tune, train, evaluate, embed and inspect FuseLIP models."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from fuselip_med.cli_errors import DEBUG_ENV, UserErrorGroup, print_error
from fuselip_med.cli_options import CAPTION_COLUMN, ENCODING, ID_COLUMN, IMAGE_ROOT, PATH_COLUMN, SEP, table_options
from fuselip_med.data.synth.cli import synth_vqa_command
from fuselip_med.search.commands import register as register_search_commands
from fuselip_med.studies_cli import PLANE, RENDER, SLICES, UNIT, WINDOW

app = typer.Typer(
    name="fuselip-med",
    cls=UserErrorGroup,
    help="FuseLIP early-fusion embeddings for medical imaging: fine-tune, train, evaluate, embed.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
data_app = typer.Typer(help="Prepare datasets (the bundled demo dataset, cached image codes, synthetic VQA pairs).",
                        no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console()
BASE_HELP = "For a LoRA adapter: its base model (hub id or path), replacing the recorded one (moved or copied base)."


def _print_version(value: bool) -> None:
    if value:
        from fuselip_med import __version__

        console.print(f"fuselip-med {__version__}", highlight=False)
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
        fail("--verbose and --quiet contradict each other: give one.", code=2)
    configure_logging("DEBUG" if verbose else "WARNING" if quiet else "INFO")


def fail(message: str, code: int = 1) -> None:
    """Print a one-line error for the user and exit (stack traces are for bugs)."""
    print_error(console, message)
    raise typer.Exit(code)


@app.command()
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
    from fuselip_med.core.checkpoints import CheckpointError
    from fuselip_med.model_info import info_rows

    try:
        title, rows = info_rows(model, arch, size, base)
    except CheckpointError:
        raise  # reported by the CLI's error handling (one line, or the traceback under --debug)
    except ValueError as error:  # an unknown arch or size
        fail(str(error))
    table = Table(title=title, show_header=False)
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


RECIPE_HELP = "Shipped recipe name (rocov2, rocov2_lora, rocov2_demo, ...) or a path to a YAML file."
SET_HELP = "Override a recipe value, e.g. --set train.lr=3e-5 --set data.root=/data/ROCOv2 (repeatable)."
RESUME_HELP = ("Continue from the newest complete checkpoint of this run (bare --resume), or from the run/checkpoint "
               "directory given.")
SIZE_HELP = "Model size (small or base; tiny for tests), sets model.size."
MODEL_HELP = "Checkpoint: hub id, local directory, .pt file or LoRA adapter directory."


def _run_recipe(recipe_name: str, size: Optional[str], overrides: list[str], resume: Optional[str],
                from_scratch: bool) -> None:
    from fuselip_med.core.checkpoints import CheckpointError
    from fuselip_med.recipes import RecipeError, load_recipe
    from fuselip_med.train.data import DataSetupError
    from fuselip_med.train.trainer import Trainer, TrainingStopped

    try:
        recipe = load_recipe(recipe_name, overrides, size=size)
    except RecipeError as error:
        fail(str(error), code=2)
    try:
        Trainer(recipe, resume=resume, from_scratch=from_scratch, console=console).run()
    except (DataSetupError, TrainingStopped, CheckpointError) as error:
        fail(str(error))


@app.command(context_settings={"allow_interspersed_args": True})
def finetune(
    recipe: str = typer.Option("rocov2", "--recipe", "-r", help=RECIPE_HELP),
    size: Optional[str] = typer.Option(None, "--size", help=SIZE_HELP),
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
    size: Optional[str] = typer.Option(None, "--size", help=SIZE_HELP),
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


data_app.command("synth-vqa")(synth_vqa_command)


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


def _load_for_inference(model: str, device: Optional[str], base: Optional[str] = None):
    from fuselip_med.core.lora import load_for_inference

    return load_for_inference(model, device or ("cuda" if _cuda() else "cpu"), base=base)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _eval_help(key: str) -> str:
    from fuselip_med.eval.command import HELP, tasks_option_help

    return tasks_option_help() if key == "tasks" else HELP[key]


@app.command("eval")
def eval_command(
    model: list[str] = typer.Option(..., "--model", "-m", help=MODEL_HELP + " Repeat (LABEL=CHECKPOINT) to compare "
                                    "models in one table."),
    tasks: Optional[str] = typer.Option(None, "--tasks", "-t", help=_eval_help("tasks")),
    data: list[str] = typer.Option([], "--data", "-d", help=_eval_help("data")),
    suite: Optional[str] = typer.Option(None, "--suite", help=_eval_help("suite")),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help=_eval_help("data_root")),
    labels: Optional[Path] = typer.Option(None, "--labels", help=_eval_help("labels")),
    templates: Optional[Path] = typer.Option(None, "--templates", help=_eval_help("templates")),
    label_column: str = typer.Option("label", "--label-column", help=_eval_help("label_column")),
    out: Path = typer.Option(Path("eval_results"), "--out", "-o",
                             help="Directory for metrics.json, report.md and plots."),
    pool_size: int = typer.Option(1000, help="Size of the seeded random retrieval pools."),
    n_pools: int = typer.Option(5, help="Number of random pools to average."),
    seed: int = typer.Option(0, help="Seed for pools and TGIT sampling."),
    tgit_rows: Optional[str] = typer.Option(None, "--tgit-rows", help=_eval_help("tgit_rows")),
    batch_size: int = typer.Option(64, help="Embedding batch size."),
    num_workers: int = typer.Option(2, help="Image decoding workers."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: cuda when available)."),
    allow_partial: bool = typer.Option(False, "--allow-partial",
                                       help="Evaluate even when fewer than half of the listed rows are usable."),
    path_column: Optional[str] = PATH_COLUMN,
    caption_column: Optional[str] = CAPTION_COLUMN,
    id_column: Optional[str] = ID_COLUMN,
    sep: Optional[str] = SEP,
    image_root: Optional[str] = IMAGE_ROOT,
    encoding: Optional[str] = ENCODING,
    base: Optional[str] = typer.Option(None, "--base", help=BASE_HELP),
) -> None:
    """Evaluate a model: retrieval R@k, zero-shot classification, concepts, TGIT, the paper's benchmark suite.

    Rows listed, rows evaluated and skips by reason go into metrics.json and report.md; every skipped row is
    named in skipped.csv.

    Examples:\n
      fuselip-med eval --model runs/rocov2/final --data rocov2=ROCOv2_data\n
      fuselip-med eval -m runs/rocov2/final --data folder=chest_xrays/ --labels labels.txt\n
      fuselip-med eval -m runs/rocov2/final --data csv=studies.csv --labels labels.txt --templates prompts.txt\n
      fuselip-med eval -m chs20/FuseLIP-S-CC3M-MM --suite paper --data-root /data/benchmarks\n
      fuselip-med eval -m chs20/FuseLIP-S-CC3M-MM -t mmeb --data mmeb=/data/MMEB-eval\n
      fuselip-med eval -m chs20/FuseLIP-S-CC3M-MM -t rocov2-retrieval,rocov2-concepts \\
        -d rocov2=eltorio/ROCOv2-radiology\n
      fuselip-med eval -m runs/rocov2/final -t rocov2-retrieval -d test=pairs.tsv \\
        --path-column filepath --caption-column title\n
      fuselip-med eval -m fuselip=runs/a/final -m sf=runs/b/final -m mlf=runs/c/final -d rocov2=ROCOv2_data
    """
    from fuselip_med.data.adapters import cli_option_style
    from fuselip_med.eval.command import choose_tasks, parse_data, suite_data
    from fuselip_med.eval.report import flatten_metrics
    from fuselip_med.eval.runner import check_tasks, run_evaluation
    from fuselip_med.eval.tasks.zero_shot import read_labels, read_templates
    from fuselip_med.eval.tgit import read_row_list

    options = table_options(path_column=path_column, caption_column=caption_column, id_column=id_column, sep=sep,
                            image_root=image_root, encoding=encoding)
    try:
        chosen = choose_tasks(tasks, suite, labels is not None or templates is not None)
        data_map = parse_data(data)
        if data_root is not None:
            data_map = {**suite_data(suite or "paper", data_root, chosen), **data_map}
        tgit_rows = tgit_rows or ("official" if suite == "paper" else None)
        if tgit_rows is not None:
            read_row_list(tgit_rows)
        class_names = read_labels(labels) if labels is not None else None
        prompt_templates = read_templates(templates) if templates is not None else None
        check_tasks(chosen, data_map)
    except ValueError as error:
        fail(str(error), code=2)
    eval_options = dict(seed=seed, pool_size=pool_size, n_pools=n_pools, batch_size=batch_size,
                        num_workers=num_workers, labels=class_names, templates=prompt_templates,
                        label_field=label_column, allow_partial=allow_partial, source_options=options,
                        tgit_rows=tgit_rows)
    if len(model) > 1:
        from fuselip_med.eval.compare import run_comparison

        try:
            with cli_option_style():
                run_comparison(model, lambda name: _load_for_inference(name, device, base)[0], chosen, data_map, out,
                               **eval_options)
        except (ValueError, FileNotFoundError, LookupError) as error:
            fail(str(error))
        console.print((out / "comparison.md").read_text(), highlight=False, soft_wrap=True)
        console.print(f"Wrote {out / 'comparison.md'}, {out / 'comparison.json'} and {out / 'comparison.png'}.")
        return
    model = model[0]
    fuselip, _, _ = _load_for_inference(model, device, base)
    try:
        with cli_option_style():
            report = run_evaluation(fuselip, chosen, data_map, out, model_id=model, **eval_options)
    except (ValueError, FileNotFoundError, LookupError) as error:
        fail(str(error))
    table = Table(title=f"Evaluation of {model}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in flatten_metrics(report).items():
        table.add_row(key.removeprefix("eval/"), f"{value:.4f}")
    console.print(table)
    for task, result in report["tasks"].items():
        if result.get("skipped"):
            examples = result.get("skip_examples") or {}
            reasons = "; ".join(f"{n} {why}" + (f" (e.g. {', '.join(examples[why])})" if examples.get(why) else "")
                                for why, n in result["skipped"].items())
            evaluated = result.get("n_evaluated", result.get("n"))
            console.print(f"{task}: {evaluated} of {result.get('n_listed', '?')} rows evaluated; skipped {reasons}",
                          style="yellow", markup=False, highlight=False)
    console.print(f"Wrote {out / 'metrics.json'}, {out / 'report.md'}, {out / 'skipped.csv'} and plots.")


@app.command()
def embed(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    input: Path = typer.Option(..., "--input", "-i", help="A CSV/TSV (path and, for text/pair, caption columns) or a "
                               "folder of images (DICOM found by content; .txt captions for text/pair)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .npy (ids in .ids.json beside it) or .parquet; skipped "
                             "rows are listed in <stem>.skipped.csv beside it."),
    kind: str = typer.Option("image", help="What to embed per row: image (no captions needed), text or pair "
                             "(image+caption fused)."),
    path_column: Optional[str] = PATH_COLUMN,
    caption_column: Optional[str] = CAPTION_COLUMN,
    id_column: Optional[str] = ID_COLUMN,
    sep: Optional[str] = SEP,
    image_root: Optional[str] = IMAGE_ROOT,
    encoding: Optional[str] = ENCODING,
    batch_size: int = typer.Option(64, help="Batch size."),
    num_workers: int = typer.Option(2, help="Image decoding workers."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, ... (default: cuda when available)."),
    base: Optional[str] = typer.Option(None, "--base", help=BASE_HELP),
    unit: str = UNIT,
    slices: int = SLICES,
    render: str = RENDER,
    window: Optional[str] = WINDOW,
    plane: str = PLANE,
) -> None:
    """Embed images, texts or image+text pairs for search, batched, with progress; every row not embedded is named.

    With --unit series or study, --input is a folder (searched recursively), a DICOMDIR, a NIfTI file or a CSV
    listing them: DICOM is grouped into series by its UIDs, each series embedded through --slices sampled slices,
    and rows carry salted series/study keys (no paths, no UIDs); slice vectors go beside the output.

    Examples:\n
      fuselip-med embed -m runs/rocov2/final -i my_images/ -o image_embeddings.npy\n
      fuselip-med embed -m runs/rocov2/final -i reports.csv --kind text -o text_embeddings.parquet\n
      fuselip-med embed -m runs/rocov2/final -i train.tsv --path-column filepath --caption-column title \\\n
        --kind pair -o pairs.npy\n
      fuselip-med embed -m runs/rocov2/final -i export.csv --encoding cp1252 --image-root /data/pacs -o scans.npy\n
      fuselip-med embed -m runs/rocov2/final -i pacs_export/ --unit series --slices 16 -o series.npy\n
      fuselip-med embed -m runs/rocov2/final -i ct_rate/valid/ --unit study --render multi -o studies.parquet
    """
    if unit != "image":
        _embed_units(model, input, out, unit, slices, render, window, plane, batch_size, device, base)
        return
    from fuselip_med.data.adapters import cli_option_style
    from fuselip_med.data.skips import SkipReport
    from fuselip_med.embed import KINDS, embed_rows, open_input, rows_from_source, skipped_csv_path, write_embeddings

    if kind not in KINDS:
        fail(f"--kind {kind!r}: choose image, text or pair.", code=2)
    if out.suffix not in (".npy", ".parquet"):
        fail(f"--out {out}: use a .npy or .parquet file name.", code=2)
    options = table_options(path_column=path_column, caption_column=caption_column, id_column=id_column, sep=sep,
                            image_root=image_root, encoding=encoding)
    try:
        with cli_option_style():
            source = open_input(input, kind, **options)  # type: ignore[arg-type]
    except (FileNotFoundError, LookupError, ValueError) as error:
        fail(str(error))
    skips = SkipReport.merged([source.skipped])
    rows = rows_from_source(source, kind, skips)  # type: ignore[arg-type]
    if not rows:
        fail(f"{input}: no row to embed ({skips.summary()}).")
    fuselip, _, _ = _load_for_inference(model, device, base)
    matrix, kept, _ = embed_rows(fuselip, rows, batch_size=batch_size, num_workers=num_workers, skips=skips)
    written = write_embeddings(out, matrix, kept, model)
    skips.kept = len(kept)
    skipped_csv = skips.write_csv(skipped_csv_path(out))
    console.print(f"Embedded {len(kept)} {kind} rows -> {', '.join(map(str, written))} (dim {matrix.shape[1]}).",
                  markup=False, highlight=False)
    if skips.total:
        console.print(f"Skipped rows: {skips.summary()}; full list in {skipped_csv}.", style="yellow", markup=False,
                      highlight=False)


def _embed_units(model: str, input: Path, out: Path, unit: str, slices: int, render: str, window: Optional[str],
                 plane: str, batch_size: int, device: Optional[str], base: Optional[str]) -> None:
    """``embed --unit series|study``: series vectors (or study vectors) keyed by salted keys."""
    from fuselip_med.data.phi import Pseudonyms
    from fuselip_med.data.skips import SkipReport
    from fuselip_med.embed import skipped_csv_path, stored_salt, write_unit_embeddings
    from fuselip_med.studies_cli import check_unit, read_units, unit_options

    try:
        check_unit(unit, ("image", "series", "study"))
        options = unit_options(slices, render, window)
    except ValueError as error:
        fail(str(error), code=2)
    if out.suffix not in (".npy", ".parquet"):
        fail(f"--out {out}: use a .npy or .parquet file name.", code=2)
    salt = stored_salt(out)
    pseudonyms = Pseudonyms(salt) if salt else Pseudonyms.fresh()
    skips = SkipReport()
    fuselip, _, _ = _load_for_inference(model, device, base)
    rows, _ = read_units(fuselip, input, unit, options, pseudonyms=pseudonyms, plane=plane, batch_size=batch_size,
                         keep_images=False, skips=skips)
    if not rows:
        fail(f"{input}: no series could be embedded ({skips.summary()}).")
    written = write_unit_embeddings(out, rows, model, unit, pseudonyms.salt, options.describe())
    skipped_csv = skips.write_csv(skipped_csv_path(out))
    console.print(f"Embedded {len(rows)} {unit} rows from {skips.kept} series -> {', '.join(map(str, written))} "
                  f"(dim {rows[0].vector.shape[-1]}).", markup=False, highlight=False)
    if skips.total or skips.hints:
        console.print(f"Series problems: {skips.summary()}; full list in {skipped_csv}.", style="yellow",
                      markup=False, highlight=False)


@app.command("merge-lora")
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

    merge_adapter(adapter, base=base).save_pretrained(out)
    console.print(f"Merged {adapter} into {out}.")


@app.command()
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
    console.print(f"Pushed {folder} to {repo_id}: {url}")


register_search_commands(app)


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
