"""``tgit`` / ``tgit-med``: TGIT accuracy per transform (reference section 6.2), on ready-made pools given as
role ``tgit`` ({kind: [pool, ...]}) or on pools built from the images of ``tgit`` (else ``test``)."""
from __future__ import annotations

from collections.abc import Mapping

from ..tgit import evaluate_tgit_pools, evaluate_tgit_source
from .context import EvalContext

__all__ = ["run_tgit", "run_tgit_med"]


def _run(ctx: EvalContext, family: str) -> dict:
    o = ctx.opts
    role = ctx.first("tgit|test")
    value = ctx.value(role)
    if isinstance(value, Mapping):
        res = evaluate_tgit_pools(ctx.embedder.fresh(), value)
        res["seed"] = None
        return res
    res = evaluate_tgit_source(ctx.embedder, ctx.source(role), family=family, n_images=o.tgit_images,
                               seed=o.seed, decode=o.decode_options)
    res["n"] = res["n_images"]
    return res


def run_tgit(ctx: EvalContext) -> dict:
    """The paper's five TGIT kinds; ``mean_accuracy`` is the paper's "TGIT" column."""
    return _run(ctx, "tgit")


def run_tgit_med(ctx: EvalContext) -> dict:
    """The seven radiology TGIT kinds."""
    return _run(ctx, "tgit_med")
