"""Batches of whole hard-negative groups: shuffled, optionally weighted across datasets, resumable.

``GroupedBatchSampler`` is a batch sampler (``DataLoader(dataset, batch_sampler=...)``). Per epoch it:

1. lays out a stream of groups: a permutation of all groups seeded by (seed, epoch); with
   ``group_weights``, groups drawn with replacement in proportion to their weight (``len(groups)`` draws);
   with ``epoch_length``, the stream goes on (further permutations / draws) until that many batches
   per rank are filled. Only a single permutation (no weights, no ``epoch_length``) visits each group
   exactly once; the other streams may repeat a group in an epoch (never within one batch);
2. packs it into batches of at most ``batch_size`` indices, first-fit: a batch first takes the groups
   deferred from earlier batches that fit, then the next groups of the stream that fit; a group that does
   not fit (or is already in the batch) is deferred, kept in stream order for the next batches; a batch
   closes when it is full or after ``lookahead`` deferred groups. Groups are never split, so unlike the
   reference sampler (which spills a group's overflow into the next batch) a batch may be a few indices
   short of ``batch_size``;
3. with ``drop_last``, drops the epoch's final batch when it is short (only without ``epoch_length``).

These are *global* batches: every process builds the same sequence (everything is a function of (seed,
epoch), for any number of workers), and ``RankShard`` gives each process its contiguous share of each
global batch, cut at group boundaries, so one process and P processes train on the same global batches.

Position: the sampler counts the batches it hands out. After an epoch's batches are all out, the next
iteration starts the following epoch by itself; ``set_epoch(e)`` with a new epoch also starts it from its
first batch, while ``set_epoch`` with the current epoch keeps the position (so a resumed run may call
``set_epoch(start_epoch)`` as usual). ``state_dict()`` stores the position in *samples* of the epoch's global
order: {seed, epoch, samples_done, segments}, ``segments`` being the epoch's history as [batch size, batches]
runs. A new sampler given it by ``load_state_dict`` yields exactly the samples of that epoch not yet drawn,
then the later epochs as an uninterrupted run would. With the same batch size that is the rest of the
saved plan; with another one, the groups the earlier runs packed are replayed from the history and the rest
of the epoch's group order is packed in batches of the new size (each sample still drawn once per epoch).
Weighted draws and ``epoch_length`` streams repeat groups, so the drawn groups cannot be told from the stream:
there a changed batch size mid-epoch is refused (``SamplerResumeError``, naming ``train.batch_size``).
The number of processes never matters (the batches are global). A DataLoader with workers asks for batches
ahead of the training loop: pass the number of this epoch's batches the loop actually consumed,
``state_dict(batches_done=k)``.
"""
from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from fuselip_med.errors import UserError

if TYPE_CHECKING:
    from fuselip_med.data.dataset import MixtureDataset

_DRAW_CHUNK = 4096


class SamplerResumeError(UserError, ValueError):
    """A saved sampler position this sampler cannot continue exactly (the message names the setting)."""


def mixture_group_weights(mixture: MixtureDataset) -> list[float]:
    """Per-group weights (aligned with ``mixture.groups()``) under which dataset d supplies a share of the
    drawn *samples* proportional to its weight: a group of d weighs w_d / (number of samples in d's groups),
    whatever its size, so the expected samples drawn from d per draw is w_d / sum(w)."""
    weights: list[float] = []
    for weight, groups in zip(mixture.weights, mixture.dataset_groups()):
        total = sum(len(group) for group in groups)
        weights.extend([weight / total] * len(groups))
    return weights


def _pack(stream: Iterator[int], sizes: list[int], batch_size: int, lookahead: int,
          max_batches: int | None) -> tuple[np.ndarray, np.ndarray]:
    """First-fit packing of a group stream; returns (group ids in batch order, batch boundaries)."""
    out: list[int] = []
    bounds = [0]
    pending: list[int] = []
    while max_batches is None or len(bounds) - 1 < max_batches:
        space = batch_size
        start = len(out)
        taken: set[int] = set()  # a stream that repeats groups must not put one twice in a batch
        keep: list[int] = []
        for position, group in enumerate(pending):
            if sizes[group] <= space and group not in taken:
                out.append(group)
                taken.add(group)
                space -= sizes[group]
                if space == 0:
                    keep.extend(pending[position + 1:])
                    break
            else:
                keep.append(group)
        pending = keep
        misses = 0
        while space > 0 and misses < lookahead:
            group = next(stream, None)
            if group is None:
                break
            if sizes[group] <= space and group not in taken:
                out.append(group)
                taken.add(group)
                space -= sizes[group]
            else:
                pending.append(group)
                misses += 1
        if len(out) == start:
            break
        bounds.append(len(out))
    return np.asarray(out, dtype=np.int64), np.asarray(bounds, dtype=np.int64)


class GroupedBatchSampler(Sampler[list[int]]):
    """Yields lists of dataset indices; every group of ``groups`` lands whole in one batch (see module doc)."""

    def __init__(
        self,
        groups: Sequence[Sequence[int]],
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        group_weights: Sequence[float] | None = None,
        epoch_length: int | None = None,
        lookahead: int = 64,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not groups:
            raise ValueError("GroupedBatchSampler got no groups: the dataset is empty")
        if epoch_length is not None and epoch_length < 1:
            raise ValueError(f"epoch_length must be a positive number of batches, got {epoch_length}")
        sizes = np.fromiter((len(group) for group in groups), dtype=np.int64, count=len(groups))
        if sizes.min() < 1:
            raise ValueError(f"group {int(np.argmin(sizes))} is empty")
        if sizes.max() > batch_size:
            big = int(np.argmax(sizes))
            raise ValueError(f"group {big} has {int(sizes[big])} samples, more than batch_size={batch_size}; "
                             f"raise the batch size or split that group")
        self._cdf: np.ndarray | None = None
        if group_weights is not None:
            if not shuffle:
                raise ValueError("group_weights draw groups at random; they need shuffle=True")
            probs = np.asarray(group_weights, dtype=np.float64)
            if probs.shape != (len(groups),):
                raise ValueError(f"group_weights has {probs.size} entries for {len(groups)} groups")
            if not np.isfinite(probs).all() or (probs < 0).any() or probs.sum() <= 0:
                raise ValueError("group_weights must be finite, non-negative and not all zero")
            self._cdf = np.cumsum(probs / probs.sum())
        self._sizes = sizes
        self._size_list = sizes.tolist()
        self._starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self._members = np.fromiter(itertools.chain.from_iterable(groups), dtype=np.int64, count=int(sizes.sum()))
        self._singletons = int(sizes.max()) == 1
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch_length = epoch_length
        self.lookahead = lookahead
        self.epoch = 0
        self._position = 0  # batches of the current epoch handed out, including those of ``_history``
        self._history: list[tuple[int, int]] = []  # this epoch's closed (batch size, batches) runs before this one
        self._plans: dict[int, tuple[np.ndarray, np.ndarray, int]] = {}  # the last two epochs' plans

    # ---- the epoch plan -------------------------------------------------------------------------------
    def _stream(self, rng: np.random.Generator) -> Iterator[int]:
        num_groups = len(self._sizes)
        endless = self.epoch_length is not None
        if self._cdf is not None:
            draws = itertools.count() if endless else range(0, num_groups, _DRAW_CHUNK)
            for start in draws:
                count = _DRAW_CHUNK if endless else min(_DRAW_CHUNK, num_groups - start)
                picks = np.searchsorted(self._cdf, rng.random(count) * self._cdf[-1], side="right")
                yield from np.minimum(picks, num_groups - 1).tolist()
            return
        for _ in itertools.count() if endless else range(1):
            yield from (rng.permutation(num_groups) if self.shuffle else np.arange(num_groups)).tolist()

    def _pack_groups(self, stream: Iterator[int], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        if self._singletons and self._cdf is None and self.epoch_length is None:
            # one permutation of singletons: packing is chunking (same result as _pack, much faster)
            order = np.fromiter(stream, dtype=np.int64)
            return order, np.append(np.arange(0, len(order), batch_size), len(order))
        return _pack(stream, self._size_list, batch_size, self.lookahead, self.epoch_length)

    def _plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(group order, batch boundaries, number of batches) of the current run of ``epoch``, cached: the whole
        epoch, or (after a resume with another batch size) what the runs of ``_history`` left of it."""
        if epoch in self._plans:
            return self._plans[epoch]
        rng = np.random.default_rng([self.seed & (2**64 - 1), epoch])
        wanted = self.epoch_length
        history = self._history if epoch == self.epoch else []
        if history:
            order, bounds = self._pack_groups(iter(self._replay(rng, history)), self.batch_size)
        else:
            order, bounds = self._pack_groups(self._stream(rng), self.batch_size)
        total = len(bounds) - 1
        if self.drop_last and wanted is None and total:
            last_size = int(self._sizes[order[bounds[-2]:]].sum())
            if last_size < self.batch_size:
                total -= 1
        if len(self._plans) >= 2:
            del self._plans[min(self._plans)]
        self._plans[epoch] = (order, bounds, total)
        return order, bounds, total

    def _replay(self, rng: np.random.Generator, history: list[tuple[int, int]]) -> list[int]:
        """The epoch's group order without the groups the ``history`` runs ((batch size, batches) each, packing
        what the runs before them left) drew."""
        remaining = list(self._stream(rng))
        for batch_size, batches in history:
            order, bounds = self._pack_groups(iter(remaining), batch_size)
            drawn = set(order[:bounds[min(batches, len(bounds) - 1)]].tolist())
            remaining = [group for group in remaining if group not in drawn]
        return remaining

    def _indices(self, order: np.ndarray, bounds: np.ndarray, batch: int) -> list[int]:
        groups = order[bounds[batch]:bounds[batch + 1]]
        if self._singletons:
            return self._members[self._starts[groups]].tolist()
        lengths = self._sizes[groups]
        shift = np.repeat(self._starts[groups] - (np.cumsum(lengths) - lengths), lengths)
        return self._members[shift + np.arange(int(lengths.sum()))].tolist()

    # ---- Sampler API ----------------------------------------------------------------------------------
    def _offset(self) -> int:
        """Batches of the current epoch drawn by the closed runs of ``_history``."""
        return sum(batches for _, batches in self._history)

    def batches_per_epoch(self, epoch: int | None = None) -> int:
        """Number of batches in ``epoch`` (default: the current one), from its start."""
        epoch = self.epoch if epoch is None else epoch
        return self._plan(epoch)[2] + (self._offset() if epoch == self.epoch else 0)

    @property
    def position(self) -> int:
        """Batches of the current epoch handed out (by this sampler and the runs it resumed from)."""
        return self._position

    def batches_left(self) -> int:
        """Batches of the current epoch not yet handed out."""
        return max(0, self.batches_per_epoch() - self._position)

    def __len__(self) -> int:
        """Batches the next iteration yields: the rest of the current epoch, or the next epoch if it is done."""
        remaining = self.batches_left()
        return remaining if remaining > 0 else self.batches_per_epoch(self.epoch + 1)

    def _next_epoch(self, epoch: int) -> None:
        self.epoch, self._position = int(epoch), 0
        if self._history:
            self._history = []
            self._plans.clear()

    def __iter__(self) -> Iterator[list[int]]:
        if self._position >= self.batches_per_epoch():
            self._next_epoch(self.epoch + 1)
        order, bounds, total = self._plan(self.epoch)
        offset = self._offset()
        while self._position - offset < total:
            self._position += 1
            yield self._indices(order, bounds, self._position - offset - 1)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch; the current epoch keeps its position (resume)."""
        if epoch != self.epoch:
            self._next_epoch(epoch)

    def state_dict(self, batches_done: int | None = None) -> dict[str, Any]:
        """{seed, epoch, samples_done, segments}: the position in samples of the epoch's global order and the
        (batch size, batches) runs that drew them. ``batches_done`` overrides the count of batches handed out
        in the current epoch (pass the training loop's count when a DataLoader prefetches). A finished epoch is
        saved as the start of the next."""
        done = self._position if batches_done is None else int(batches_done)
        if done >= self.batches_per_epoch():
            return {"seed": self.seed, "epoch": self.epoch + 1, "samples_done": 0, "segments": []}
        order, bounds, _ = self._plan(self.epoch)
        current = done - self._offset()
        samples = int(self._sizes[order[:bounds[current]]].sum())
        before = self._history_samples()
        segments = [list(run) for run in self._history] + ([[self.batch_size, current]] if current else [])
        return {"seed": self.seed, "epoch": self.epoch, "samples_done": before + samples, "segments": segments}

    def _history_samples(self) -> int:
        """Samples the closed runs of ``_history`` drew (their groups' sizes)."""
        if not self._history:
            return 0
        seed = [self.seed & (2**64 - 1), self.epoch]
        everything = list(self._stream(np.random.default_rng(seed)))
        left = self._replay(np.random.default_rng(seed), self._history)
        return int(self._sizes[everything].sum() - self._sizes[left].sum())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()`` (or the older {seed, epoch, batches_done}, read as batches of this
        sampler's size). Raises ``SamplerResumeError`` when the batch size changed mid-epoch on a stream that
        repeats groups (weights or ``epoch_length``)."""
        self._plans.clear()
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        if "segments" in state:
            runs = [(int(size), int(batches)) for size, batches in state["segments"] if int(batches)]
        else:
            runs = [(self.batch_size, int(state["batches_done"]))] if int(state["batches_done"]) else []
        merged: list[tuple[int, int]] = []
        for size, batches in runs:
            if merged and merged[-1][0] == size:
                merged[-1] = (size, merged[-1][1] + batches)
            else:
                merged.append((size, batches))
        current = merged.pop()[1] if merged and merged[-1][0] == self.batch_size else 0
        if merged and (self._cdf is not None or self.epoch_length is not None):
            raise SamplerResumeError(
                f"train.batch_size is {self.batch_size} but epoch {self.epoch} was started with batch size "
                f"{merged[-1][0]}, and this data is drawn by weight or with an epoch length (groups repeat), so the "
                f"rest of the epoch cannot be told apart; resume with train.batch_size={merged[-1][0]}.")
        self._history = merged
        self._position = self._offset() + current
        if "samples_done" in state and int(state["samples_done"]) != self.state_dict()["samples_done"]:
            raise SamplerResumeError(
                f"the saved sampler position ({state['samples_done']} samples into epoch {self.epoch}) does not fit "
                "this data: the training data or its grouping changed since the checkpoint; resume with the same data.")


def shard_of_batch(batch: list[int], group_of: np.ndarray, rank: int, world: int) -> list[int]:
    """Rows of a global ``batch`` for ``rank`` of ``world``: each group goes to the rank whose equal share
    of the batch holds the group's first row, so shares are contiguous, whole groups, and cover the batch."""
    if world == 1:
        return list(batch)
    groups = group_of[np.asarray(batch)]
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
    owner_of_start = np.minimum(starts * world // len(batch), world - 1)
    lengths = np.diff(np.r_[starts, len(batch)])
    owner = np.repeat(owner_of_start, lengths)
    return [index for index, who in zip(batch, owner) if who == rank]


class RankShard(Sampler[list[int]]):
    """This rank's share (``shard_of_batch``) of each global batch of a ``GroupedBatchSampler``.

    ``group_of`` ``[N]`` int64 maps a dataset index to its group number. Every rank gets one (possibly
    short, possibly empty) share per global batch, so all ranks take the same number of steps.
    """

    def __init__(self, sampler: GroupedBatchSampler, group_of: np.ndarray, rank: int, world: int):
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, world={world})")
        self.sampler = sampler
        self.group_of = group_of
        self.rank = rank
        self.world = world

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.sampler:
            yield shard_of_batch(batch, self.group_of, self.rank, self.world)
