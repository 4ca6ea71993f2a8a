"""Rank, world size and cross-process collectives for the losses (one home; torch.distributed underneath).

Everything here degrades to the single-process identity when no process group is initialised, so the same
loss code runs under ``python``, ``torchrun`` and ``accelerate launch``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, number of processes); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


_HOST_GROUPS: dict[int, object] = {}


def _host_group():
    """A gloo group for exchanging host integers (None: the default group is gloo already). Under NCCL this
    keeps row counts off the GPU stream, so reading them never waits for the device. Created collectively on
    first use, which every rank reaches at the same point of the step."""
    if dist.get_backend() == "gloo":
        return None
    key = id(dist.group.WORLD)
    if key not in _HOST_GROUPS:
        _HOST_GROUPS[key] = dist.new_group(backend="gloo")
    return _HOST_GROUPS[key]


def rows_per_rank(local_rows: int) -> list[int]:
    """Every rank's row count, in rank order (one all_reduce of host integers when world > 1).

    Ranks may hold different numbers of rows: batches are cut at hard-negative group boundaries.
    """
    rank, world = rank_and_world()
    if world == 1:
        return [local_rows]
    sizes = torch.zeros(world, dtype=torch.long)
    sizes[rank] = local_rows
    dist.all_reduce(sizes, group=_host_group())
    return sizes.tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on any (one all_reduce of a host integer when world > 1; under
    NCCL on the gloo host group, so it never waits for the device)."""
    if rank_and_world()[1] == 1:
        return flag
    value = torch.tensor([int(flag)], dtype=torch.long)
    dist.all_reduce(value, group=_host_group())
    return bool(value.item())


def gather_objects(value: object) -> list[object]:
    """Every rank's picklable ``value``, in rank order (``[value]`` in one process; on the gloo host group)."""
    if rank_and_world()[1] == 1:
        return [value]
    gathered: list[object] = [None] * rank_and_world()[1]
    dist.all_gather_object(gathered, value, group=_host_group())
    return gathered


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum of a non-differentiable tensor over ranks (a copy; the input is left alone)."""
    if rank_and_world()[1] == 1:
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value


def gather_rows(features: torch.Tensor, sizes: list[int] | None = None) -> tuple[torch.Tensor, int, float]:
    """All ranks' rows ``[sum(sizes), D]`` in rank order with gradients flowing back to their owners.

    Returns (gathered rows, offset of this rank's rows, mean rows per rank). ``sizes`` (from
    ``rows_per_rank``) avoids a second size exchange when the caller already has it. Rows are padded to the
    largest rank for ``torch.distributed.nn.functional.all_gather`` (equal shapes) and the padding dropped.
    """
    rank, world = rank_and_world()
    if world == 1:
        return features, 0, float(features.shape[0])
    sizes = rows_per_rank(features.shape[0]) if sizes is None else sizes
    padded = F.pad(features, (0, 0, 0, max(sizes) - features.shape[0]))
    parts = dist_fn.all_gather(padded)
    gathered = torch.cat([part[:size] for part, size in zip(parts, sizes)], dim=0)
    return gathered, sum(sizes[:rank]), sum(sizes) / world
