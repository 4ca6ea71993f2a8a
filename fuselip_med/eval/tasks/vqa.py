"""``rocov2-vqa``: (image + question) -> answer retrieval over the pool of the role ``vqa``'s distinct answers
(scoring in :mod:`fuselip_med.eval.vqa`)."""
from __future__ import annotations

from ..vqa import evaluate_vqa_retrieval
from .context import EvalContext

__all__ = ["run"]


def run(ctx: EvalContext) -> dict:
    """VQA R@1/5/10, mean/median rank and R@1 per question type, with the shared embedder's cache."""
    source = ctx.source("vqa")
    return evaluate_vqa_retrieval(ctx.embedder, [source[i] for i in range(len(source))])
