"""``run_evaluation``: embed once, run the requested tasks, write metrics.json / report.md / plots.

Tasks and the ``data`` entries they read (a SampleSource, or a path that the "rocov2" adapter opens):

| task | data | what |
|---|---|---|
| ``rocov2-retrieval`` | ``rocov2_test`` | image<->caption R@1/5/10, mean/median rank; full pool + seeded pools |
| ``rocov2-modality`` | ``rocov2_test`` | zero-shot modality classification (meta["modality"]) |
| ``rocov2-concepts`` | ``rocov2_valid``, ``rocov2_test`` | zero-shot concept detection, threshold chosen on valid |
| ``modality-gap`` | ``rocov2_test`` | image-only vs caption embeddings: centroid distance, cosine of means |
| ``tgit`` / ``tgit-med`` | ``tgit`` ({kind: [pool, ...]} or a source), else ``rocov2_test`` | TGIT accuracy per kind |
| ``composed-retrieval`` | ``composed`` | (query image + query text) -> target image retrieval |
| ``rocov2-vqa`` | ``rocov2_vqa`` (source, JSONL or ROCOv2 folder) | (image + question) -> answer, pool of answers |

``data["rocov2"]`` (the dataset folder or hub id) stands for both ``rocov2_test`` (split "test") and
``rocov2_valid`` (split "valid"). Every unique image and text is embedded once across all tasks.
"""
from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import classification as cls
from .embedding import Embedder, EmbedItem, image_key
from .modality_gap import modality_gap
from .report import EvalReport, TaskResult, now_iso, package_version, write_report
from .retrieval import evaluate_retrieval
from .tgit import evaluate_tgit_pools, evaluate_tgit_source
from .vqa import evaluate_vqa_retrieval

__all__ = ["TASKS", "run_evaluation"]

log = logging.getLogger(__name__)

TASKS = ("rocov2-retrieval", "rocov2-modality", "rocov2-concepts", "modality-gap", "tgit", "tgit-med",
         "composed-retrieval", "rocov2-vqa")

_NEEDS = {
    "rocov2-retrieval": ("rocov2_test",),
    "rocov2-modality": ("rocov2_test",),
    "rocov2-concepts": ("rocov2_valid", "rocov2_test"),
    "modality-gap": ("rocov2_test",),
    "tgit": (),
    "tgit-med": (),
    "composed-retrieval": ("composed",),
    "rocov2-vqa": ("rocov2_vqa",),
}
_SPLIT_OF = {"rocov2_test": "test", "rocov2_valid": "valid"}


@dataclass
class _ImageCaption:
    """The image/caption samples of one source, with their embedding inputs."""

    name: str
    images: list[EmbedItem] = field(default_factory=list)
    texts: list[EmbedItem] = field(default_factory=list)
    meta: list[dict] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    cui_names: dict[str, str] = field(default_factory=dict)


def _describe(value) -> str:
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return f"{len(value)} TGIT kinds: {', '.join(map(str, value))}"
    name = getattr(value, "name", type(value).__name__)
    try:
        return f"{name} ({len(value)} samples)"
    except TypeError:
        return str(name)


def _image_key_of(sample, image) -> str:
    if isinstance(image, (str, os.PathLike)):
        return image_key(image)
    return f"{sample.source}:{sample.meta.get('image_id', sample.id)}"  # bytes/arrays: the dataset's id


def _image_caption(source) -> _ImageCaption:
    out = _ImageCaption(name=getattr(source, "name", type(source).__name__),
                        cui_names=dict(getattr(source, "cui_names", {}) or {}))
    for i in range(len(source)):
        s = source[i]
        image = s.query_image if s.query_image is not None else s.target_image
        caption = s.target_text if s.target_text else s.query_text
        if image is None or not caption:
            out.skipped["no image" if image is None else "no caption"] += 1
            continue
        out.images.append(EmbedItem(image=image, image_key=_image_key_of(s, image)))
        out.texts.append(EmbedItem(text=caption))
        out.meta.append(s.meta)
        for cui, name in zip(s.meta.get("concepts", []) or [], s.meta.get("concept_names", []) or []):
            out.cui_names.setdefault(cui, name)
    if not out.images:
        raise ValueError(f"{out.name} has no sample with both an image and a caption")
    return out


class _Context:
    def __init__(self, data: Mapping[str, Any], embedder: Embedder):
        self.data = dict(data)
        self.embedder = embedder
        self._sources: dict[str, Any] = {}
        self._ic: dict[str, _ImageCaption] = {}

    def has(self, key: str) -> bool:
        return key in self.data or (key in _SPLIT_OF and "rocov2" in self.data)

    def source(self, key: str):
        if key not in self._sources:
            value = self.data.get(key)
            split = _SPLIT_OF.get(key)
            if value is None and split is not None:
                value = self.data.get("rocov2")
            if value is None:
                raise ValueError(f"no data for {key!r}: pass data={{'{key}': <source or path>}}")
            if isinstance(value, (str, os.PathLike)):
                from fuselip_med.data.adapters import get_adapter

                value = get_adapter("rocov2")(path=os.fspath(value), split=split or "test")
            self._sources[key] = value
        return self._sources[key]

    def image_caption(self, key: str) -> _ImageCaption:
        if key not in self._ic:
            self._ic[key] = _image_caption(self.source(key))
        return self._ic[key]

    def embed_image_caption(self, key: str) -> tuple[_ImageCaption, list[int], torch.Tensor, torch.Tensor]:
        """(data, kept sample positions, image embeddings, caption embeddings) without failed images."""
        ic = self.image_caption(key)
        table = self.embedder.embed(ic.images + ic.texts, desc=f"embedding {ic.name}")
        keep = [i for i, it in enumerate(ic.images) if it.key in table]
        if not keep:
            raise ValueError(f"no image of {ic.name} could be decoded (e.g. {next(iter(table.failed.values()), '?')})")
        return (ic, keep, table.lookup(ic.images[i].key for i in keep),
                table.lookup(ic.texts[i].key for i in keep))

    def failed_reasons(self, ic: _ImageCaption) -> dict[str, int]:
        failed = self.embedder.table.failed
        return dict(Counter(failed[it.key] for it in ic.images if it.key in failed) + ic.skipped)


def _class_weights(embedder: Embedder, names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    prompts = cls.class_prompts(names, templates)
    table = embedder.embed([EmbedItem(text=p) for ps in prompts for p in ps], desc="embedding prompts")
    return cls.class_weights([table.lookup(("text", p) for p in ps) for ps in prompts])


def _task_retrieval(ctx: _Context, opts: dict) -> dict:
    ic, keep, img, txt = ctx.embed_image_caption("rocov2_test")
    res = evaluate_retrieval(img, txt, [ic.images[i].image_key for i in keep], [ic.texts[i].text for i in keep],
                             names=("image", "text"), pool_size=opts["pool_size"], n_pools=opts["n_pools"],
                             seed=opts["seed"], chunk_size=opts["chunk_size"])
    res["skipped"] = ctx.failed_reasons(ic)
    return res


def _task_modality(ctx: _Context, opts: dict) -> dict:
    ic, keep, img, _ = ctx.embed_image_caption("rocov2_test")
    classes = list(opts["modality_classes"])
    labels = [cls.normalize_modality(ic.meta[i].get("modality"), classes) for i in keep]
    rows = [r for r, lab in enumerate(labels) if lab is not None]
    if not rows:
        raise ValueError(f"no sample of {ic.name} has a modality label in meta['modality']")
    # Zero-shot over the modalities that occur in the data, so that chance is 1 / (number of classes).
    classes = [c for c in classes if c in {labels[r] for r in rows}]
    weights = _class_weights(ctx.embedder, classes, opts["modality_templates"])
    pred, _ = cls.zero_shot_predict(img[rows], weights)
    y_true = [classes.index(labels[r]) for r in rows]
    m = cls.classification_metrics(y_true, pred.tolist(), classes)
    m["chance_accuracy"] = 1.0 / len(classes)
    skipped = ctx.failed_reasons(ic)
    if len(rows) < len(keep):
        skipped["no modality label"] = len(keep) - len(rows)
    return {"metrics": {k: m[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "chance_accuracy")},
            "per_class": m["per_class"], "confusion_matrix": m["confusion_matrix"], "n": len(rows),
            "classes": classes, "templates": list(opts["modality_templates"]), "skipped": skipped}


def _concept_scores(ctx: _Context, key: str, concepts: list[str], weights: torch.Tensor, field_name: str):
    ic, keep, img, _ = ctx.embed_image_caption(key)
    truth = cls.concept_matrix([ic.meta[i].get(field_name) or [] for i in keep], concepts)
    return ic, (img @ weights.T).numpy(), truth


def _task_concepts(ctx: _Context, opts: dict) -> dict:
    field_name, k = opts["concept_field"], opts["concept_top_k"]
    valid = ctx.image_caption("rocov2_valid")
    top = cls.top_concepts((m.get(field_name) or [] for m in valid.meta), k)
    if not top:
        raise ValueError(f"no sample of {valid.name} has concepts in meta[{field_name!r}]")
    concepts = [c for c, _ in top]
    names = {**ctx.image_caption("rocov2_test").cui_names, **valid.cui_names}
    weights = _class_weights(ctx.embedder, [names.get(c, c) for c in concepts], opts["concept_templates"])
    _, v_scores, v_truth = _concept_scores(ctx, "rocov2_valid", concepts, weights, field_name)
    threshold, valid_f1 = cls.choose_threshold(v_scores, v_truth)
    test, t_scores, t_truth = _concept_scores(ctx, "rocov2_test", concepts, weights, field_name)
    metrics = cls.concept_metrics(t_scores, t_truth, threshold)
    metrics.update(threshold=threshold, valid_samples_f1=valid_f1)
    return {"metrics": metrics, "k": len(concepts), "n": int(t_truth.shape[0]), "n_valid": int(v_truth.shape[0]),
            "concept_field": field_name, "templates": list(opts["concept_templates"]),
            "concepts": [{"cui": c, "name": names.get(c, c), "valid_count": n} for c, n in top],
            "skipped": ctx.failed_reasons(test), "skipped_valid": ctx.failed_reasons(valid)}


def _task_gap(ctx: _Context, opts: dict) -> dict:
    ic, keep, img, txt = ctx.embed_image_caption("rocov2_test")
    m = modality_gap(img, txt, paired=True)
    return {"metrics": m, "n": len(keep), "kinds": ["image", "caption"], "skipped": ctx.failed_reasons(ic)}


def _task_tgit(family: str) -> Callable[[_Context, dict], dict]:
    def run(ctx: _Context, opts: dict) -> dict:
        data = ctx.data.get("tgit")
        if isinstance(data, Mapping):
            res = evaluate_tgit_pools(ctx.embedder.fresh(), data)
            res["seed"] = None
            return res
        key = "tgit" if data is not None else "rocov2_test"
        res = evaluate_tgit_source(ctx.embedder, ctx.source(key), family=family, n_images=opts["tgit_images"],
                                   seed=opts["seed"], decode=opts["decode_options"])
        res["n"] = res["n_images"]
        return res

    return run


def _task_composed(ctx: _Context, opts: dict) -> dict:
    source = ctx.source("composed")
    queries, targets, skipped = [], [], Counter()
    for i in range(len(source)):
        s = source[i]
        if s.query_image is None or s.query_text is None or s.target_image is None:
            skipped["not an (image + text -> image) sample"] += 1
            continue
        queries.append(EmbedItem(image=s.query_image, text=s.query_text))
        targets.append(EmbedItem(image=s.target_image))
    if not queries:
        raise ValueError(f"{_describe(source)} has no sample with query image, query text and target image")
    table = ctx.embedder.embed(queries + targets, desc="embedding composed")
    keep = [i for i in range(len(queries)) if queries[i].key in table and targets[i].key in table]
    for it in queries + targets:
        if it.key in table.failed:
            skipped[table.failed[it.key]] += 1
    res = evaluate_retrieval(table.lookup(queries[i].key for i in keep), table.lookup(targets[i].key for i in keep),
                             [queries[i].key for i in keep], [targets[i].image_key for i in keep],
                             names=("composed", "image"), both_directions=False, pool_size=opts["pool_size"],
                             n_pools=opts["n_pools"], seed=opts["seed"], chunk_size=opts["chunk_size"])
    res["skipped"] = dict(skipped)
    return res


def _task_vqa(ctx: _Context, opts: dict) -> dict:
    source = ctx.data["rocov2_vqa"]
    if isinstance(source, (str, os.PathLike)):
        from fuselip_med.data.adapters import get_adapter

        source = get_adapter("rocov2_vqa")(os.fspath(source), split="test")
    return evaluate_vqa_retrieval(ctx.embedder, [source[i] for i in range(len(source))])


_RUNNERS: dict[str, Callable[[_Context, dict], dict]] = {
    "rocov2-retrieval": _task_retrieval,
    "rocov2-modality": _task_modality,
    "rocov2-concepts": _task_concepts,
    "modality-gap": _task_gap,
    "tgit": _task_tgit("tgit"),
    "tgit-med": _task_tgit("tgit_med"),
    "composed-retrieval": _task_composed,
    "rocov2-vqa": _task_vqa,
}


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
    on_error: str = "skip",
) -> dict:
    """Run ``tasks`` on ``data`` with ``model`` (anything with ``encode(images=, texts=)``) and write
    ``metrics.json``, ``report.md`` and ``plots/`` under ``out_dir``. Returns the metrics.json content.

    ``device``: move the model there first (default: leave it where it is). ``decode``/``decode_options``:
    how images become pixels (default ``fuselip_med.data.images.decode_image``). ``on_error="skip"`` leaves
    images that fail to decode out and counts them per task under ``skipped``.
    """
    tasks = list(dict.fromkeys(tasks))
    unknown = [t for t in tasks if t not in _RUNNERS]
    if unknown or not tasks:
        raise ValueError(f"unknown evaluation task(s) {unknown}: choose from {', '.join(TASKS)}")
    if device is not None and hasattr(model, "to"):
        model = model.to(device)
    embedder = Embedder(model, batch_size=batch_size, num_workers=num_workers, decode=decode,
                        decode_options=decode_options, on_error=on_error, progress=progress)
    ctx = _Context(data, embedder)
    for t in tasks:
        missing = [k for k in _NEEDS[t] if not ctx.has(k)]
        if t in ("tgit", "tgit-med") and not (ctx.has("tgit") or ctx.has("rocov2_test")):
            missing = ["tgit (or rocov2_test)"]
        if missing:
            raise ValueError(f"task {t!r} needs data {', '.join(repr(m) for m in missing)}; "
                             f"got {', '.join(map(repr, data)) or 'none'}")
    opts = dict(seed=seed, pool_size=pool_size, n_pools=n_pools, chunk_size=chunk_size, decode_options=decode_options,
                concept_top_k=concept_top_k, concept_field=concept_field, concept_templates=tuple(concept_templates),
                modality_classes=tuple(modality_classes), modality_templates=tuple(modality_templates),
                tgit_images=tgit_images)
    results: dict[str, TaskResult] = {}
    for t in tasks:
        start = time.perf_counter()
        log.info("evaluating %s", t)
        res = _RUNNERS[t](ctx, opts)
        res.setdefault("seed", seed)
        res["seconds"] = round(time.perf_counter() - start, 3)
        results[t] = TaskResult.model_validate(res)
    report = EvalReport(
        model=model_id or str(getattr(model, "name_or_path", None) or type(model).__name__),
        data={k: _describe(v) for k, v in data.items()},
        tasks=results,
        created=now_iso(),
        fuselip_med_version=package_version(),
    )
    write_report(report, Path(out_dir))
    return report.model_dump(mode="json")
