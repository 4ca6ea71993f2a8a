"""A few CPU steps of the cc3m_mm recipe on a tiny model over fixtures of every paper source (CC + TGIT, HQ-Edit,
CC3M-VQA, VG-Crop, VG-VQA): the trainer runs, losses stay finite, and every batch keeps its hard-negative groups."""
from __future__ import annotations

import math

import numpy as np

import fuselip_med.data.sampling as sampling
from fuselip_med.recipes import load_recipe
from fuselip_med.train.trainer import Trainer
from tests.test_paper_recipes import paper_overrides, write_paper_data

STEPS = 4
BATCH = 12


def test_tiny_paper_mixture_trains_with_whole_groups(tmp_path, monkeypatch):
    root = write_paper_data(tmp_path / "data")
    overrides = paper_overrides(root, tmp_path) + [
        "model.size=tiny", "train.epochs=null", f"train.steps={STEPS}", f"train.batch_size={BATCH}",
        "train.warmup_steps=1", "train.precision=fp32", "train.log_every=1", "data.num_workers=0", "data.eval=[]",
        "eval.at_start=false", "eval.at_end=false", "checkpoint.every_steps=null", "logging.trackers=[jsonl]",
        "logging.progress=false", f"output.dir={tmp_path / 'run'}",
    ]
    recipe = load_recipe("cc3m_mm", overrides)
    batches: list[tuple[list[int], np.ndarray]] = []
    real_shard = sampling.shard_of_batch

    def recording_shard(batch, group_of, rank, world):
        batches.append((list(batch), group_of))
        return real_shard(batch, group_of, rank, world)

    monkeypatch.setattr(sampling, "shard_of_batch", recording_shard)
    result = Trainer(recipe).run()

    assert result.steps == STEPS and len(result.losses) == STEPS
    assert all(math.isfinite(loss) for loss in result.losses)
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert len(batches) >= STEPS
    largest = 0
    for batch, group_of in batches:
        assert 0 < len(batch) <= BATCH
        groups_in_batch = group_of[batch]
        for g in set(groups_in_batch.tolist()):
            assert (group_of == g).sum() == (groups_in_batch == g).sum()  # every member of the group is there
            largest = max(largest, int((groups_in_batch == g).sum()))
    assert largest > 1  # hard-negative groups (HQ-Edit pairs, VG fours, TGIT blocks) did reach the batches
