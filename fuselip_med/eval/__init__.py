"""Evaluation: retrieval R@k, zero-shot classification, concepts, TGIT, the paper's benchmark suite; JSON + plots.

The names below are imported on first use, so that reading the task table (``fuselip_med.eval.tasks``, e.g. for
the CLI help) does not import torch.
"""
from __future__ import annotations

import importlib

__all__ = ["TASKS", "run_evaluation", "evaluate_retrieval", "rank_targets"]

_HOMES = {"TASKS": "runner", "run_evaluation": "runner", "evaluate_retrieval": "retrieval",
          "rank_targets": "similarity"}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
