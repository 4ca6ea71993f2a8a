"""``leakage`` (``eval --check-leakage TRAIN``): every test item of role ``test`` against every item of role
``train`` (any source an adapter reads: ROCOv2's train split by default), by content hash, perceptual hash,
embedding cosine and article ID (:mod:`fuselip_med.eval.leakage`). Writes ``leakage.csv`` (``test_id``,
``train_id``, ``kind``, ``value``; one row per match) beside ``metrics.json``; the counts are the task's metrics,
the leaked test IDs its ``leaked_ids`` (``--exclude-leaked`` scores the ``test`` tasks again without them).
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from fuselip_med.data.skips import SkipReport
from fuselip_med.inference.items import EmbedItem, sample_image_key
from fuselip_med.io import atomic_write_text

from ..intervals import binomial_interval
from ..leakage import LEAKAGE_KINDS, LeakMatch, article_id, cosine_pairs, equal_pairs, hamming_pairs, perceptual_hash
from .context import EvalContext

__all__ = ["run", "LEAKAGE_CSV_COLUMNS"]

LEAKAGE_CSV_COLUMNS = ("test_id", "train_id", "kind", "value")


def _items(ctx: EvalContext, role: str, skips: SkipReport) -> list[tuple[str, object, str, str | None, str]]:
    """(id, image, embedding key, article ID, content hash) of every sample of ``role`` with a readable image."""
    from fuselip_med.data.hashing import content_hash

    source = ctx.source(role)
    out = []
    for i in range(len(source)):
        s = source[i]
        image = s.query.image if s.query.image is not None else s.target.image
        if image is None:
            skips.add(s.id, role, "no image")
            continue
        try:
            digest = content_hash(image)
        except OSError as error:
            skips.add(s.id, role, "unreadable image", str(error))
            continue
        out.append((str(s.id), image, sample_image_key(s, image), article_id(s.id, image, s.meta), digest))
    return out


def _phashes(items, role: str, skips: SkipReport, decode_options) -> list[int | None]:
    from fuselip_med.data.images import ImageDecodeError

    out = []
    for row_id, image, *_ in items:
        try:
            out.append(perceptual_hash(image, decode_options))
        except ImageDecodeError as error:
            skips.add(row_id, role, "image does not decode", str(error))
            out.append(None)
    return out


def run(ctx: EvalContext) -> dict:
    """Matches of each kind, the leaked test items, leakage.csv (module docstring)."""
    o = ctx.opts
    skips = SkipReport()
    test, train = _items(ctx, "test", skips), _items(ctx, "train", skips)
    matches: list[LeakMatch] = []
    for i, j, value in equal_pairs([t[4] for t in test], [t[4] for t in train]):
        matches.append(LeakMatch(test[i][0], train[j][0], "exact", value[:16]))
    t_hash, n_hash = _phashes(test, "test", skips, o.decode_options), _phashes(train, "train", skips, o.decode_options)
    t_pos = [i for i, h in enumerate(t_hash) if h is not None]
    n_pos = [j for j, h in enumerate(n_hash) if h is not None]
    for i, j, d in hamming_pairs([t_hash[i] for i in t_pos], [n_hash[j] for j in n_pos], o.phash_distance):
        matches.append(LeakMatch(test[t_pos[i]][0], train[n_pos[j]][0], "phash", str(d)))
    table = ctx.embedder.embed([EmbedItem(image=t[1], image_key=t[2]) for t in test + train],
                               desc="embedding images for the leakage check")
    te = [i for i, t in enumerate(test) if ("image", t[2]) in table]
    tr = [j for j, t in enumerate(train) if ("image", t[2]) in table]
    if te and tr:
        emb_t = table.lookup(("image", test[i][2]) for i in te).numpy()
        emb_n = table.lookup(("image", train[j][2]) for j in tr).numpy()
        for i, j, c in cosine_pairs(emb_t, emb_n, o.leak_cosine):
            matches.append(LeakMatch(test[te[i]][0], train[tr[j]][0], "embedding", f"{c:.4f}"))
    for i, j, value in equal_pairs([t[3] for t in test], [t[3] for t in train]):
        matches.append(LeakMatch(test[i][0], train[j][0], "same_article", value))
    ctx.add_skips(skips)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(LEAKAGE_CSV_COLUMNS)
    writer.writerows((m.test_id, m.train_id, m.kind, m.value) for m in matches)
    path = atomic_write_text(Path(o.out_dir or ".") / "leakage.csv", buffer.getvalue()) if o.out_dir else None
    leaked = sorted({m.test_id for m in matches})
    metrics = {f"{kind}_test_items": float(len({m.test_id for m in matches if m.kind == kind}))
               for kind in LEAKAGE_KINDS}
    metrics.update({"leaked_test_items": float(len(leaked)), "test_items": float(len(test)),
                    "train_items": float(len(train)), "leaked_fraction": len(leaked) / max(1, len(test))})
    return {"metrics": metrics, "n": len(test), "n_pairs": {k: sum(m.kind == k for m in matches)
                                                            for k in LEAKAGE_KINDS},
            "leaked_ids": leaked, "intervals": {"leaked_fraction": list(binomial_interval(len(leaked), len(test)))},
            "counts": {"leaked_fraction": len(test)}, "leakage_csv": str(path) if path else None, "seed": None,
            "thresholds": {"phash_max_hamming_bits": o.phash_distance, "embedding_min_cosine": o.leak_cosine},
            "skipped": skips.by_reason(), "skip_examples": skips.examples,
            "rows": {"test": len(test), "train": len(train)},
            "article_ids_found": {"test": int(np.sum([t[3] is not None for t in test])),
                                  "train": int(np.sum([t[3] is not None for t in train]))}}


def without_leaked(ctx: EvalContext, data: dict, leaked_ids: list[str]) -> dict:
    """``data`` with role ``test`` replaced by its samples minus ``leaked_ids`` (for ``--exclude-leaked``)."""
    from fuselip_med.data.adapters import ListSource

    from . import role_of_key

    source = ctx.source("test")
    leaked = set(leaked_ids)
    kept = ListSource((source[i] for i in range(len(source)) if str(source[i].id) not in leaked),
                      name=f"{getattr(source, 'name', 'test')} without {len(leaked)} leaked")
    out = {k: v for k, v in data.items() if role_of_key(k.partition(":")[0]) != "test"}
    out["test"] = kept
    return out
