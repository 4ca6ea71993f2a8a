"""``tgit`` / ``tgit-unique`` / ``tgit-med``: TGIT accuracy per transform (reference section 6.2), on ready-made
pools given as role ``tgit`` ({kind: [pool, ...]}) or on pools built from the images of ``tgit`` (else ``test``).

``tgit`` follows the official protocol: flip pools [first flip of x, x, second flip of x, x] and, with
``tgit_rows`` (``--tgit-rows official`` or a file; the paper suite sets ``official``), the listed CC3M validation
rows (see :mod:`fuselip_med.eval.tgit`). ``tgit-unique`` is the same with three distinct flip candidates
(h / v / both), a variant that is not the paper's and is labelled so in reports.
"""
from __future__ import annotations

from collections.abc import Mapping

from ..tgit import evaluate_tgit_pools, evaluate_tgit_source
from .context import EvalContext

__all__ = ["run_tgit", "run_tgit_unique", "run_tgit_med"]

PROTOCOLS = {"reference": "official flip pools [flip1(x), x, flip2(x), x]",
             "unique": "variant: flip pools h / v / both (not the paper's)"}


def _run(ctx: EvalContext, family: str, flip_eval: str) -> dict:
    o = ctx.opts
    role = ctx.first("tgit|test")
    value = ctx.value(role)
    if isinstance(value, Mapping):
        res = evaluate_tgit_pools(ctx.embedder.fresh(), value)
        res.update(seed=None, protocol="ready-made pools")
        return res
    rows = list(o.tgit_rows.rows) if o.tgit_rows is not None else None
    res = evaluate_tgit_source(ctx.embedder, ctx.source(role), family=family, n_images=o.tgit_images,
                               seed=o.seed, decode=o.decode_options, flip_eval=flip_eval, rows=rows)
    res["n"] = res["n_images"]
    rows_text = f"rows listed in {o.tgit_rows.source}" if rows is not None else f"the first {o.tgit_images} images"
    res["protocol"] = (f"{PROTOCOLS[flip_eval]}; {rows_text}" if family == "tgit" else rows_text)
    return res


def run_tgit(ctx: EvalContext) -> dict:
    """The paper's five TGIT kinds with the official flip pools; ``mean_accuracy`` is the paper's "TGIT"."""
    return _run(ctx, "tgit", "reference")


def run_tgit_unique(ctx: EvalContext) -> dict:
    """The paper's five kinds with three distinct flip candidates (a variant, not the paper's protocol)."""
    return _run(ctx, "tgit", "unique")


def run_tgit_med(ctx: EvalContext) -> dict:
    """The seven radiology TGIT kinds."""
    return _run(ctx, "tgit_med", "reference")
