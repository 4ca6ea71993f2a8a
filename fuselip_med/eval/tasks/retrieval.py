"""Retrieval tasks: ``rocov2-retrieval`` (image <-> caption of role ``test``) and ``composed-retrieval``
((query image + query text) -> target image of role ``composed``). Metrics: :mod:`fuselip_med.eval.retrieval`
(reference section 6.1)."""
from __future__ import annotations

from collections import Counter

from fuselip_med.errors import InputError
from fuselip_med.inference.items import EmbedItem

from ..retrieval import evaluate_retrieval
from .context import EvalContext, describe

__all__ = ["run_image_caption", "run_composed"]


def run_image_caption(ctx: EvalContext) -> dict:
    """Image -> caption and caption -> image R@1/5/10, mean/median rank on the full pool and seeded pools."""
    o = ctx.opts
    ic, keep, img, txt = ctx.embed_image_caption("test")
    res = evaluate_retrieval(img, txt, [ic.images[i].image_key for i in keep], [ic.texts[i].text for i in keep],
                             names=("image", "text"), pool_size=o.pool_size, n_pools=o.n_pools, seed=o.seed,
                             chunk_size=o.chunk_size)
    res.update(ctx.rows(ic, keep))
    return res


def run_composed(ctx: EvalContext) -> dict:
    """(query image + query text) -> target image, one direction."""
    o = ctx.opts
    source = ctx.source("composed")
    queries, targets, skipped = [], [], Counter()
    for i in range(len(source)):
        s = source[i]
        if s.query.image is None or s.query.text is None or s.target.image is None:
            skipped["not an (image + text -> image) sample"] += 1
            continue
        queries.append(EmbedItem(image=s.query.image, text=s.query.text))
        targets.append(EmbedItem(image=s.target.image))
    if not queries:
        raise InputError(f"{describe(source)} has no sample with query image, query text and target image")
    table = ctx.embedder.embed(queries + targets, desc="embedding composed")
    keep = [i for i in range(len(queries)) if queries[i].key in table and targets[i].key in table]
    for it in queries + targets:
        if it.key in table.failed:
            skipped[table.failed[it.key]] += 1
    res = evaluate_retrieval(table.lookup(queries[i].key for i in keep), table.lookup(targets[i].key for i in keep),
                             [queries[i].key for i in keep], [targets[i].image_key for i in keep],
                             names=("composed", "image"), both_directions=False, pool_size=o.pool_size,
                             n_pools=o.n_pools, seed=o.seed, chunk_size=o.chunk_size)
    res["skipped"] = dict(skipped)
    return res
