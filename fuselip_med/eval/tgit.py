"""TGIT retrieval (reference section 6.2): find the transformed image from (instruction, source image).

A pool is a list of ``TGITPair(prompt, source_image, target_image, kind, params)`` whose first pair is the
query and its correct target. Query = (prompt, source image) embedded fused; candidates = ("", target
image) of every pair, embedded fused too (the reference's ``force_fused``). The pool is answered correctly
iff the argmax of the cosine similarities is index 0; on an exact tie the first index wins (as
``torch.argmax``), so a distractor identical to the correct target does not count against the model.
Accuracy per kind = correct pools / pools of that kind; ``mean_accuracy`` = the mean over kinds (the
paper's "TGIT" number for the five paper kinds).

Pools come either ready-made (``{kind: [pool, pool, ...]}``) or from the images of a source: the first
``n_images`` samples that have an image (or, with ``rows``, the listed rows of the source in the list's order),
each turned into one pool per kind by ``fuselip_med.data.transforms.tasks.eval_pools`` with one
``numpy.random.default_rng(seed)`` consumed in sample order (so a seed fixes every pool).

Flip pools: ``flip_eval="reference"`` (the default, the official construction of reference section 6.2) is
[first flip of x, x, second flip of x, x] with the query "x + first flip's prompt", so the original image is a
candidate twice; ``flip_eval="unique"`` (task ``tgit-unique``, not the paper's protocol) is x -> horizontal /
vertical / both, three distinct candidates.

Rows: the official evaluation uses the CC3M validation CSV rows listed in ``eval_augmented_idcs.txt`` of the
FuseLIP repository (``src/fuse_eval/``, MIT licence, shipped here as ``eval/data/tgit_eval_idcs.txt``; 1,000
unique 0-based row numbers, at most 13,441). The rows are the same; the transforms' random parameters come from
this toolkit's seeded generator, not the reference's Python/NumPy global state, so individual pools differ.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fuselip_med.errors import UsageError
from fuselip_med.inference.engine import Embedder
from fuselip_med.inference.items import EmbedItem

__all__ = ["pool_items", "score_pools", "summarize_tgit", "evaluate_tgit_pools", "iter_source_pools",
           "evaluate_tgit_source", "OFFICIAL_ROWS", "read_row_list", "source_positions"]

OFFICIAL_ROWS = "official"
_OFFICIAL_ROWS_FILE = "tgit_eval_idcs.txt"


def pool_items(pool: Sequence[Any]) -> tuple[EmbedItem, list[EmbedItem]]:
    """The query item and the candidate items of one pool (first pair = the query and its target)."""
    if not pool:
        raise ValueError("a TGIT pool needs at least one pair")
    first = pool[0]
    query = EmbedItem(image=first.source_image, text=first.prompt)
    return query, [EmbedItem(image=p.target_image, text="") for p in pool]


def score_pools(queries: torch.Tensor, candidates: Sequence[torch.Tensor]) -> np.ndarray:
    """Per pool, whether the argmax over its candidates is index 0. queries (P, D); candidates[p] (n_p, D)."""
    if len(queries) != len(candidates):
        raise ValueError(f"{len(queries)} queries but {len(candidates)} candidate sets")
    out = np.zeros(len(candidates), dtype=bool)
    for p, (q, c) in enumerate(zip(queries, candidates)):
        if c.ndim != 2 or c.shape[0] == 0:
            raise ValueError(f"pool {p} has no candidates")
        out[p] = int(torch.argmax(c.to(torch.float32) @ q.to(torch.float32))) == 0
    return out


def summarize_tgit(correct: Mapping[str, Sequence[bool] | np.ndarray]) -> dict:
    """Task entry from per-kind correctness: ``metrics`` {kind}_accuracy and mean_accuracy, ``per_kind``."""
    kinds = [k for k in correct if len(correct[k])]
    if not kinds:
        raise ValueError("no TGIT pools were scored")
    acc = {k: float(np.mean(correct[k])) for k in kinds}
    metrics = {f"{k}_accuracy": v for k, v in acc.items()}
    metrics["mean_accuracy"] = float(np.mean(list(acc.values())))
    return {
        "metrics": metrics,
        "per_kind": {k: {"correct": int(np.sum(correct[k])), "n": len(correct[k]), "accuracy": acc[k]}
                     for k in kinds},
    }


def _score_kind_pools(embedder: Embedder, pools: Sequence[Sequence[Any]], desc: str) -> np.ndarray:
    items_per_pool = [pool_items(p) for p in pools]
    flat = [q for q, _ in items_per_pool] + [c for _, cs in items_per_pool for c in cs]
    table = embedder.embed(flat, desc=desc)
    keep, queries, cands = [], [], []
    for p, (q, cs) in enumerate(items_per_pool):
        keys = [q.key] + [c.key for c in cs]
        if any(k not in table for k in keys):  # an image failed to decode: the pool cannot be scored
            continue
        keep.append(p)
        queries.append(table[q.key])
        cands.append(table.lookup(c.key for c in cs))
    if not keep:
        return np.zeros(0, dtype=bool)
    return score_pools(torch.stack(queries), cands)


def _as_pool_list(value) -> list[Sequence[Any]]:
    """{kind: pool} (one pool) or {kind: [pool, ...]} -> list of pools."""
    value = list(value)
    if value and hasattr(value[0], "prompt"):
        return [value]
    return value


def evaluate_tgit_pools(embedder: Embedder, pools: Mapping[str, Sequence[Any]]) -> dict:
    """Score ready-made pools ``{kind: [pool, ...]}`` (a single pool per kind is accepted too)."""
    correct = {kind: _score_kind_pools(embedder, _as_pool_list(v), f"tgit {kind}") for kind, v in pools.items()}
    out = summarize_tgit(correct)
    out["n_pools_scored"] = int(sum(len(v) for v in correct.values()))
    return out


@dataclass(frozen=True)
class TgitRows:
    """The TGIT source rows, read once where the user names them (the CLI or ``run_evaluation``): ``rows`` the
    0-based CSV rows in order, ``source`` what named them (``"official"`` or the file's path)."""

    source: str
    rows: tuple[int, ...]

    @classmethod
    def of(cls, spec: str | os.PathLike | TgitRows) -> TgitRows:
        """``spec`` itself when already read, else ``read_row_list(spec)``; raises its ``UsageError``."""
        if isinstance(spec, TgitRows):
            return spec
        return cls(os.fspath(spec), tuple(read_row_list(spec)))


def read_row_list(spec: str | os.PathLike) -> list[int]:
    """The 0-based source rows listed in ``spec``: ``"official"`` (the shipped ``eval_augmented_idcs.txt`` of the
    FuseLIP repository) or a file holding a Python/JSON list (``[5981, 10040, ...]``) or one number per line.

    Raises ``UsageError`` (a ``ValueError``) naming the file when it is missing, holds anything but non-negative
    integers, or lists a row twice (the official evaluation asserts unique indices)."""
    if os.fspath(spec) == OFFICIAL_ROWS:
        text = files("fuselip_med.eval").joinpath("data", _OFFICIAL_ROWS_FILE).read_text(encoding="utf-8")
        where = f"the shipped {_OFFICIAL_ROWS_FILE}"
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise UsageError(f"--tgit-rows {path}: no such file (give 'official' or a file of row numbers)")
        text, where = path.read_text(encoding="utf-8"), str(path)
    tokens = [t for t in re.split(r"[\s,\[\]]+", text) if t]
    if not tokens or not all(t.isdigit() for t in tokens):
        raise UsageError(f"{where}: expected a list of non-negative row numbers such as [5981, 10040, ...]")
    rows = [int(t) for t in tokens]
    if len(set(rows)) != len(rows):
        raise UsageError(f"{where}: lists a row more than once")
    return rows


def source_positions(source, rows: Sequence[int]) -> tuple[list[int], list[int]]:
    """(positions in ``source`` of the listed ``rows``, in the list's order; the rows the source does not hold).

    A source that left rows out (the ``cc`` adapter skips rows without an image) says which data row each
    sample came from in ``row_numbers``; any other source's rows are its positions."""
    numbers = getattr(source, "row_numbers", None)
    where = {int(r): i for i, r in enumerate(numbers)} if numbers is not None else None
    found, missing = [], []
    for row in rows:
        position = where.get(row) if where is not None else (row if row < len(source) else None)
        (missing if position is None else found).append(row if position is None else position)
    return found, missing


def iter_source_pools(source, *, family: str = "tgit", n_images: int = 1000, seed: int = 0,
                      flip_eval: str = "reference", decode=None, skipped: Counter | None = None,
                      rows: Sequence[int] | None = None) -> Iterator[tuple[str, dict[str, list]]]:
    """(sample id, {kind: pool}) for the first ``n_images`` samples of ``source`` whose image decodes.

    ``rows``: use these 0-based data rows of the source instead, in the list's order (the first ``n_images`` of
    them, as the official evaluation takes ``idcs[:1000]``); a listed row the source lacks is counted as
    ``listed row missing``. ``decode``: the ``DecodeOptions`` for loading the source image (window, frame, image
    size); samples without an image or whose image fails to decode are counted in ``skipped`` (reason -> count).
    """
    from fuselip_med.data.images import DecodeOptions, ImageDecodeError, load_image
    from fuselip_med.data.transforms.tasks import eval_pools, image_and_caption

    options = decode if decode is not None else DecodeOptions()
    skipped = skipped if skipped is not None else Counter()
    if rows is None:
        positions: Sequence[int] = range(len(source))
    else:
        positions, missing = source_positions(source, list(rows)[:n_images])
        if missing:
            skipped["listed row missing"] += len(missing)
    rng = np.random.default_rng(seed)
    used = 0
    for i in positions:
        if used >= n_images:
            break
        sample = source[i]
        image = image_and_caption(sample)[0]
        if image is None:
            skipped["no image"] += 1
            continue
        if not isinstance(image, np.ndarray):  # an array may hold HU values for the radiology set
            try:
                image = load_image(image, options)  # once, not once per kind
            except ImageDecodeError as e:
                skipped[e.reason] += 1
                continue
        used += 1
        yield sample.id, eval_pools(image, family, rng, size=options.image_size, flip_eval=flip_eval)


def evaluate_tgit_source(embedder: Embedder, source, *, family: str = "tgit", n_images: int = 1000,
                         seed: int = 0, flip_eval: str = "reference", images_per_step: int = 64,
                         decode=None, rows: Sequence[int] | None = None) -> dict:
    """TGIT accuracies on pools built from ``source``'s images, streamed ``images_per_step`` images at a
    time so that the rendered pixels of only a few pools are held at once."""
    correct: dict[str, list[bool]] = {}
    skipped: Counter = Counter()
    buffer: dict[str, list] = {}
    n_used = 0

    def flush():
        for kind, pools in buffer.items():
            scored = _score_kind_pools(embedder.fresh(), pools, f"tgit {kind}")
            correct.setdefault(kind, []).extend(bool(x) for x in scored)
        buffer.clear()

    for _, pools in iter_source_pools(source, family=family, n_images=n_images, seed=seed,
                                      flip_eval=flip_eval, decode=decode, skipped=skipped, rows=rows):
        n_used += 1
        for kind, pool in pools.items():
            buffer.setdefault(kind, []).append(pool)
        if n_used % images_per_step == 0:
            flush()
    flush()
    if not n_used:
        raise ValueError(f"no image in {getattr(source, 'name', 'the source')} could be used for TGIT")
    out = summarize_tgit(correct)
    out.update(n_images=n_used, family=family, flip_eval=flip_eval, seed=seed, skipped=dict(skipped),
               rows="listed" if rows is not None else f"first {n_images}")
    return out
