"""``eval``: retrieval R@k, zero-shot classification, concepts, TGIT and the paper's benchmark suite, for one model
or several compared in one table (the parsing lives in ``fuselip_med.eval.command``)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from fuselip_med.cli import common
from fuselip_med.cli.common import BASE_HELP, MODEL_HELP
from fuselip_med.cli.options import CAPTION_COLUMN, ENCODING, ID_COLUMN, IMAGE_ROOT, PATH_COLUMN, SEP, table_options
from fuselip_med.option_names import command_line_style

__all__ = ["register"]
console = Console()


def _eval_help(key: str) -> str:
    from fuselip_med.eval.command import HELP, tasks_option_help

    return tasks_option_help() if key == "tasks" else HELP[key]


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
    prompts: Optional[Path] = typer.Option(None, "--prompts", help=_eval_help("prompts")),
    uncertain: str = typer.Option("ignore", "--uncertain", help=_eval_help("uncertain")),
    threshold_rule: str = typer.Option("youden", "--threshold-rule", help=_eval_help("threshold_rule")),
    bootstrap: int = typer.Option(1000, "--bootstrap", help=_eval_help("bootstrap")),
    check_leakage: Optional[str] = typer.Option(None, "--check-leakage", help=_eval_help("check_leakage")),
    exclude_leaked: bool = typer.Option(False, "--exclude-leaked", help=_eval_help("exclude_leaked")),
    phash_distance: int = typer.Option(8, "--phash-distance", help=_eval_help("phash_distance")),
    leak_cosine: float = typer.Option(0.95, "--leak-cosine", help=_eval_help("leak_cosine")),
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
      fuselip-med eval -m fuselip=runs/a/final -m sf=runs/b/final -m mlf=runs/c/final -d rocov2=ROCOv2_data\n
      fuselip-med eval -m runs/rocov2/final -t findings -d findings=CheXpert-v1.0-small/test.csv \\
        -d findings_valid=CheXpert-v1.0-small/valid.csv --uncertain positive --prompts prompts.yaml\n
      fuselip-med eval -m runs/rocov2/final --suite radiology --data-root /data/radiology\n
      fuselip-med eval -m runs/rocov2/final -d rocov2=ROCOv2_data --check-leakage ROCOv2_data --exclude-leaked
    """
    from fuselip_med.eval.command import choose_tasks, leakage_data, parse_data, radiology_suite, suite_data
    from fuselip_med.eval.report import flatten_metrics
    from fuselip_med.eval.runner import check_tasks, run_evaluation
    from fuselip_med.eval.suite import missing_subsets
    from fuselip_med.eval.tasks.zero_shot import read_labels, read_templates
    from fuselip_med.eval.tgit import TgitRows
    from fuselip_med.io import check_writable

    options = table_options(path_column=path_column, caption_column=caption_column, id_column=id_column, sep=sep,
                            image_root=image_root, encoding=encoding)
    check_writable(out)  # before any work: OutputError naming the folder
    chosen = choose_tasks(tasks, suite, labels is not None or templates is not None)
    data_map = parse_data(data)
    if data_root is not None and suite == "radiology":
        suite_tasks, suite_map = radiology_suite(data_root)
        chosen = chosen if tasks else suite_tasks
        data_map = {**suite_map, **data_map}
    elif data_root is not None:
        data_map = {**suite_data(suite or "paper", data_root, chosen), **data_map}
    tgit_spec = tgit_rows or ("official" if suite == "paper" else None)
    rows = TgitRows.of(tgit_spec) if tgit_spec is not None else None  # a bad file fails before the model loads
    if check_leakage is not None:
        key, path = leakage_data(check_leakage)
        data_map[key] = path
        chosen = [*chosen, "leakage"] if "leakage" not in chosen else chosen
    if prompts is not None:
        from fuselip_med.eval.findings import read_prompts

        read_prompts(prompts)  # a bad file fails before the model loads
    class_names = read_labels(labels) if labels is not None else None
    prompt_templates = read_templates(templates) if templates is not None else None
    check_tasks(chosen, data_map)
    eval_options = dict(seed=seed, pool_size=pool_size, n_pools=n_pools, batch_size=batch_size,
                        num_workers=num_workers, labels=class_names, templates=prompt_templates,
                        label_field=label_column, allow_partial=allow_partial, source_options=options,
                        tgit_rows=rows, prompts=prompts, uncertain=uncertain, threshold_rule=threshold_rule,
                        n_boot=bootstrap, phash_distance=phash_distance, leak_cosine=leak_cosine,
                        exclude_leaked=exclude_leaked)
    if len(model) > 1:
        from fuselip_med.eval.compare import run_comparison

        with command_line_style():
            run_comparison(model, lambda name: common.load_inference_model(name, device, base)[0], chosen, data_map,
                           out, **eval_options)
        console.print((out / "comparison.md").read_text(), highlight=False, soft_wrap=True)
        console.print(f"Wrote {out / 'comparison.md'}, {out / 'comparison.json'} and {out / 'comparison.png'}.")
        return
    model = model[0]
    fuselip, _, _ = common.load_inference_model(model, device, base)
    with command_line_style():
        report = run_evaluation(fuselip, chosen, data_map, out, model_id=model, **eval_options)
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
    for task, subsets in missing_subsets(report).items():
        console.print(f"{task}: {len(subsets)} subset(s) not scored, so its means cover fewer subsets: "
                      + "; ".join(f"{subset} ({reason})" for subset, reason in subsets.items()),
                      style="yellow", markup=False, highlight=False)
    console.print(f"Wrote {out / 'metrics.json'}, {out / 'report.md'}, {out / 'skipped.csv'} and plots.")


def register(app: typer.Typer) -> None:
    """Add ``eval`` to the ``fuselip-med`` app."""
    app.command("eval")(eval_command)
