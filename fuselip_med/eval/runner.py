"""``run_evaluation``: embed once, run the requested tasks, write metrics.json / report.md / plots.

The tasks, the data roles each needs and their help text are the table in :mod:`fuselip_med.eval.tasks`;
how data keys map onto roles is described in :mod:`fuselip_med.eval.tasks.context`. Every unique image and
text is embedded once across all tasks. When tasks of the paper suite ran, the paper's table is written
too (``paper_table.md``/``.json``/``.png``, :mod:`fuselip_med.eval.suite`).
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from fuselip_med.data.skips import SKIPPED_CSV
from fuselip_med.errors import UsageError
from fuselip_med.inference.engine import Embedder

from . import classification as cls
from .report import EvalReport, TaskResult, now_iso, package_version, write_report
from .tasks import TASKS, get_task, missing_roles, runner_of
from .tasks.context import EvalContext, EvalOptions, describe_data
from .tgit import TgitRows

__all__ = ["TASKS", "run_evaluation", "check_tasks"]

log = logging.getLogger(__name__)


def check_tasks(tasks: Sequence[str], data: Mapping[str, Any]) -> list[str]:
    """The unique task names in order, after checking that each exists and that ``data`` provides the roles
    it needs; ``ValueError`` (naming the task, the missing roles and the keys given) before any work."""
    from .tasks.context import resolve_data

    tasks = list(dict.fromkeys(tasks))
    unknown = [t for t in tasks if t not in TASKS]
    if not tasks:
        raise UsageError(f"no evaluation task given: choose from {', '.join(TASKS)}")
    if unknown:
        raise UsageError(f"unknown evaluation task(s) {unknown}: choose from {', '.join(TASKS)}")
    roles = resolve_data(data)
    for name in tasks:
        task = get_task(name)
        missing = missing_roles(task, roles)
        if missing:
            from .tasks import ROLES

            wanted = []
            for entry in missing:
                keys = [k for r in entry.split("|") for k in (r, *ROLES[r].aliases)]
                wanted.append(" or ".join(repr(k) for k in keys))
            raise UsageError(f"task {name!r} needs data {', '.join(wanted)}; "
                             f"got {', '.join(map(repr, data)) or 'none'} (pass --data ROLE=PATH)")
    return tasks


def _run_task(ctx: EvalContext, name: str, seed: int) -> TaskResult:
    start = time.perf_counter()
    log.info("evaluating %s", name)
    res = runner_of(get_task(name))(ctx)
    res.setdefault("seed", seed)
    res["seconds"] = round(time.perf_counter() - start, 3)
    return TaskResult.model_validate(res)


def run_evaluation(
    model,
    tasks: Sequence[str],
    data: Mapping[str, Any],
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    pool_size: int = 1000,
    n_pools: int = 5,
    batch_size: int = 64,
    device=None,
    num_workers: int = 0,
    decode: Callable | None = None,
    decode_options=None,
    model_id: str | None = None,
    progress: bool = True,
    chunk_size: int | None = None,
    concept_top_k: int = 50,
    concept_field: str = "concepts",
    concept_templates: Sequence[str] = cls.CONCEPT_TEMPLATES,
    modality_classes: Sequence[str] = cls.MODALITY_CLASSES,
    modality_templates: Sequence[str] = cls.MODALITY_TEMPLATES,
    tgit_images: int = 1000,
    labels: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
    label_field: str = "label",
    mmeb_subsets: Sequence[str] | None = None,
    vg_images: int = 100,
    tgit_rows: str | os.PathLike | TgitRows | None = None,
    on_error: str = "skip",
    allow_partial: bool = False,
    source_options: Mapping[str, Any] | None = None,
    prompts: str | os.PathLike | None = None,
    uncertain: str = "ignore",
    threshold_rule: str = "youden",
    n_boot: int = 1000,
    phash_distance: int = 8,
    leak_cosine: float = 0.95,
    exclude_leaked: bool = False,
    distributed: bool = False,
    image_codes: Mapping[str, Any] | None = None,
) -> dict:
    """Run ``tasks`` on ``data`` with ``model`` (anything with ``encode(images=, texts=)``) and write
    ``metrics.json``, ``report.md`` and ``plots/`` under ``out_dir``. Returns the metrics.json content.

    ``device``: move the model there first (default: leave it where it is). ``decode``/``decode_options``:
    how images become pixels (default ``fuselip_med.data.images.decode_image``). ``on_error="skip"`` leaves
    images that fail to decode out and counts them per task under ``skipped``. ``labels``/``templates``/
    ``label_field``: the zero-shot task's classes, prompt templates (``{c}`` = class name) and label key.
    ``mmeb_subsets``: evaluate only these MMEB subsets; ``vg_images``: images of the VG-Crop evaluation.
    ``tgit_rows``: ``"official"``, a file listing the source rows TGIT uses, or a ``TgitRows`` already read (default:
    the first ``tgit_images``); read once, before any embedding.
    Raises ``ValueError`` for an unknown task or missing data before any embedding.

    Image-caption tasks record ``n_listed`` (rows the data listed), ``n_evaluated`` and ``skipped`` (reason ->
    count, with ``skip_examples``); every skipped row is named in ``skipped.csv`` under ``out_dir``. Fewer than
    half of the listed rows evaluable is a ``ValueError`` (before embedding where the adapter already knows)
    unless ``allow_partial``. ``source_options``: csv/folder adapter options for data given as paths
    (``path_column``, ``caption_column``, ``id_column``, ``sep``, ``image_root``, ``encoding``).

    Radiology tasks: ``prompts`` (findings prompt YAML), ``uncertain`` (``ignore|positive|negative``),
    ``threshold_rule`` (``youden|max-f1``), ``n_boot`` (bootstrap resamples of the AUROC intervals);
    ``phash_distance``/``leak_cosine``: the ``leakage`` task's near-duplicate limits; ``exclude_leaked``: after the
    tasks ran, score the tasks over role ``test`` again without the leaked rows (``"<task> (leaked excluded)"``).
    ``distributed``: every process of a ``torch.distributed`` job calls this with the same arguments; each
    embeds its share of every input (``Embedder(shard=True)``), all compute the metrics, process 0 writes.
    ``image_codes``: {``image_key``: TiTok code ids int64 ``[128]``} of images whose codes are known (training's
    code cache, of the ``decode_options`` view); those images are neither decoded nor tokenized.
    """
    from .findings import THRESHOLD_RULES, UNCERTAIN_POLICIES

    if uncertain not in UNCERTAIN_POLICIES or threshold_rule not in THRESHOLD_RULES or n_boot < 1:
        raise UsageError(f"uncertain must be one of {', '.join(UNCERTAIN_POLICIES)}, threshold_rule one of "
                         f"{', '.join(THRESHOLD_RULES)} and n_boot >= 1; got {uncertain!r}, {threshold_rule!r}, "
                         f"{n_boot}")
    tasks = check_tasks(tasks, data)
    rows = TgitRows.of(tgit_rows) if tgit_rows is not None else None
    if device is not None and hasattr(model, "to"):
        model = model.to(device)
    embedder = Embedder(model, batch_size=batch_size, num_workers=num_workers, decode=decode,
                        decode_options=decode_options, on_error=on_error, progress=progress, shard=distributed,
                        image_codes=dict(image_codes or {}))
    opts = EvalOptions(seed=seed, pool_size=pool_size, n_pools=n_pools, chunk_size=chunk_size,
                       decode_options=decode_options, concept_top_k=concept_top_k, concept_field=concept_field,
                       concept_templates=tuple(concept_templates), modality_classes=tuple(modality_classes),
                       modality_templates=tuple(modality_templates), tgit_images=tgit_images,
                       labels=tuple(labels) if labels is not None else None,
                       templates=tuple(templates) if templates is not None else None, label_field=label_field,
                       mmeb_subsets=tuple(mmeb_subsets) if mmeb_subsets is not None else None, vg_images=vg_images,
                       tgit_rows=rows,
                       prompts=os.fspath(prompts) if prompts is not None else None, uncertain=uncertain,
                       threshold_rule=threshold_rule, n_boot=n_boot, out_dir=os.fspath(out_dir),
                       phash_distance=phash_distance, leak_cosine=leak_cosine)
    if exclude_leaked and "leakage" not in tasks:
        raise UsageError("--exclude-leaked needs the leakage check: pass --check-leakage TRAIN")
    ctx = EvalContext(data, embedder, opts, allow_partial=allow_partial, table_options=source_options)
    results: dict[str, TaskResult] = {}
    for name in tasks:
        results[name] = _run_task(ctx, name, seed)
    if exclude_leaked:
        from .tasks.leakage import without_leaked

        leaked = results["leakage"].model_extra["leaked_ids"]
        again = EvalContext(without_leaked(ctx, dict(data), leaked), embedder,
                            replace(opts, out_dir=os.path.join(os.fspath(out_dir), "leaked_excluded")),
                            allow_partial=allow_partial, table_options=source_options)
        for name in tasks:
            if name != "leakage" and "test" in [ctx.first(entry) for entry in get_task(name).roles]:
                res = _run_task(again, name, seed)
                res.excluded_leaked = len(leaked)
                results[f"{name} (leaked excluded)"] = res
    report = EvalReport(
        model=model_id or str(getattr(model, "name_or_path", None) or type(model).__name__),
        data={k: describe_data(k, v) for k, v in data.items()},
        tasks=results,
        created=now_iso(),
        fuselip_med_version=package_version(),
    )
    out = report.model_dump(mode="json")
    if distributed:
        from fuselip_med.core.distributed import rank_and_world

        if rank_and_world()[0] != 0:
            return out
    write_report(report, Path(out_dir))
    ctx.skip_report().write_csv(Path(out_dir) / SKIPPED_CSV)
    from .suite import write_radiology_table, write_suite_table

    write_suite_table(out, Path(out_dir))
    write_radiology_table(out, Path(out_dir))
    return out
