"""``rocov2-vqa``: (image + question) -> answer retrieval over the pool of the role ``vqa``'s distinct answers
(scoring in :mod:`fuselip_med.eval.vqa`)."""
from __future__ import annotations

from collections import Counter

from fuselip_med.data.skips import SkipReport
from fuselip_med.errors import InputError

from ..vqa import evaluate_vqa_retrieval
from .context import EvalContext

__all__ = ["run"]


def run(ctx: EvalContext) -> dict:
    """VQA R@1/5/10, mean/median rank and R@1 per question type, with the shared embedder's cache.

    The rows the adapter skipped count as listed (``n_listed``; named in ``skip_examples``); fewer than half of
    the listed rows evaluated is a ``ValueError`` unless the run allows partial data, as for the other tasks.
    """
    source = ctx.source("vqa")
    result = evaluate_vqa_retrieval(ctx.embedder, [source[i] for i in range(len(source))])
    adapter_skips = SkipReport.merged([getattr(source, "skipped", None)])
    result["skipped"] = dict(Counter(adapter_skips.by_reason()) + Counter(result["skipped"]))
    result["skip_examples"] = adapter_skips.examples
    result["n_listed"] = len(source) + adapter_skips.total
    result["n_evaluated"] = result["n"]
    if not ctx.allow_partial and 2 * result["n_evaluated"] < result["n_listed"]:
        raise InputError(f"only {result['n_evaluated']} of the {result['n_listed']} VQA rows of {source.name} can "
                         f"be evaluated (skipped: {result['skipped']}); fix the data, or pass --allow-partial.")
    return result
