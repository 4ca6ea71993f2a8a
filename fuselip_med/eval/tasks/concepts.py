"""``rocov2-concepts``: zero-shot multi-label concept detection (conventions in
:mod:`fuselip_med.eval.classification`): the top-K concepts of ``valid``, one global threshold chosen on
``valid`` and applied unchanged to ``test``."""
from __future__ import annotations

import torch

from fuselip_med.errors import InputError

from .. import classification as cls
from .context import EvalContext

__all__ = ["run"]


def _scores(ctx: EvalContext, role: str, concepts: list[str], weights: torch.Tensor, field_name: str):
    ic, keep, img, _ = ctx.embed_image_caption(role)
    truth = cls.concept_matrix([ic.meta[i].get(field_name) or [] for i in keep], concepts)
    return ic, (img @ weights.T).numpy(), truth


def run(ctx: EvalContext) -> dict:
    """Sample-averaged F1/precision/recall, micro-F1 and the chosen threshold."""
    o = ctx.opts
    field_name, k = o.concept_field, o.concept_top_k
    valid = ctx.image_caption("valid")
    top = cls.top_concepts((m.get(field_name) or [] for m in valid.meta), k)
    if not top:
        raise InputError(f"no sample of {valid.name} has concepts in meta[{field_name!r}]")
    concepts = [c for c, _ in top]
    names = {**ctx.image_caption("test").cui_names, **valid.cui_names}
    weights = ctx.class_weights([names.get(c, c) for c in concepts], o.concept_templates)
    _, v_scores, v_truth = _scores(ctx, "valid", concepts, weights, field_name)
    threshold, valid_f1 = cls.choose_threshold(v_scores, v_truth)
    test, t_scores, t_truth = _scores(ctx, "test", concepts, weights, field_name)
    metrics = cls.concept_metrics(t_scores, t_truth, threshold)
    metrics.update(threshold=threshold, valid_samples_f1=valid_f1)
    return {"metrics": metrics, "k": len(concepts), "n": int(t_truth.shape[0]), "n_valid": int(v_truth.shape[0]),
            "concept_field": field_name, "templates": list(o.concept_templates),
            "concepts": [{"cui": c, "name": names.get(c, c), "valid_count": n} for c, n in top],
            **ctx.rows(test, range(int(t_truth.shape[0]))), "skipped_valid": ctx.failed_reasons(valid)}
