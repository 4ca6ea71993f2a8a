"""Several processes on one machine for the tests: a gloo group on loopback that is torn down safely.

A process that destroys its group while another still talks over it, or that runs the interpreter's
teardown with gloo threads alive, can die with SIGABRT ("terminate called without an active exception");
so every worker ends with a barrier, the group destroyed, and ``os._exit(0)``.
"""
from __future__ import annotations

import os
import socket
from collections.abc import Callable

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(rank: int, world: int, port: int, worker: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        worker(rank, *args)
        dist.barrier()  # no rank tears the group down while another still uses it
    finally:
        dist.destroy_process_group()
    os._exit(0)  # skip interpreter teardown, where gloo's threads sometimes abort the process


def spawn_gloo(worker: Callable, *args, world: int = 2) -> None:
    """Run ``worker(rank, *args)`` in ``world`` processes joined in one gloo group (a module-level function:
    it is pickled); raises ``ProcessRaisedException`` / ``ProcessExitedException`` when any process fails."""
    mp.spawn(_run, args=(world, _free_port(), worker, args), nprocs=world)
