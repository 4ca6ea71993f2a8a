"""The paper's pretraining recipes (cc3m_mm, cc12m_mm) and the staged ROCOv2 fine-tune: schema, the paper's
hyperparameters, adapter options that the adapters accept, and the mixture built from fixtures in the published
layouts under ``data.root``."""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest

import fuselip_med.data.transforms.tasks  # noqa: F401  (registers the tgit task adapters)
from fuselip_med.data.adapters import get_adapter
from fuselip_med.data.sampling import GroupedBatchSampler
from fuselip_med.data.transforms.tasks import TGITTask, get_family
from fuselip_med.eval.runner import TASKS
from fuselip_med.recipes import load_recipe
from tests.test_adapters_cc import write_csv
from tests.test_adapters_hq_edit import write_hq_edit
from tests.test_adapters_vg import write_vg
from tests.test_adapters_vqa import write_vqa

PAPER_SOURCES = ["cc", "hq_edit", "cc3m_vqa", "vg_crop", "vg_vqa"]


def pairs_per_image(identity_fraction: float) -> float:
    """Mean TGIT training pairs per base image: identity pairs plus the transform blocks."""
    family = get_family("tgit")
    p = family.identity_probability(identity_fraction)
    pairs = np.array([t.n_pairs(eval=False) for t in family.transforms])
    return p + (1 - p) * float(family.probabilities() @ pairs)


def test_cc3m_mm_has_the_paper_hyperparameters():
    recipe = load_recipe("cc3m_mm")
    train = recipe.train
    assert train.betas == (0.9, 0.98) and train.eps == 1e-8
    assert train.lr == 1e-3 and train.warmup_steps == 12_000 and train.min_lr == 0.0
    assert train.weight_decay == 1.0 and train.decay_embeddings is True
    assert train.batch_size == 2048 and train.grad_accum == 1  # the global batch: 256 x 8 GPUs
    assert train.epochs == 8 and train.steps is None
    assert train.grad_clip == 1.0 and train.seed == 0
    assert train.mlm_probability == 0.1 and train.mmm_weight == 0.25 and train.max_logit_scale == 100.0
    assert train.precision == "bf16"  # the reference's amp fp16 is --set train.precision=fp16
    assert recipe.model.size == "small" and recipe.model.init is None and not recipe.model.lora.enabled

    assert [spec.name for spec in recipe.data.train] == PAPER_SOURCES
    cc, hq, vqa, crop, vg_vqa = recipe.data.train
    assert cc.id == "cc3m" and cc.direct is False and cc.path == "cc3m/cc3m_train.csv"
    assert all(spec.direct and spec.split == "train" for spec in (hq, vqa, crop, vg_vqa))
    assert vg_vqa.options == {"fraction": 0.5} and crop.options == {}
    (task,) = recipe.data.tasks
    assert task.name == "tgit" and task.bases == ["cc3m"]
    assert task.options == {"identity_fraction": 0.9, "eval_fraction": 0.0}
    assert get_family("tgit").identity_probability(0.9) == pytest.approx(0.97089, abs=1e-5)  # reference prob
    assert task.weight == pytest.approx(2.906 * pairs_per_image(0.9), rel=1e-3)
    assert recipe.resolve_path(cc.path) == str(Path("data") / "cc3m" / "cc3m_train.csv")
    assert recipe.eval.tasks == ["tgit"] and recipe.data.eval[0].id == "tgit"


def test_cc12m_mm_differs_where_the_paper_does():
    cc3m, cc12m = load_recipe("cc3m_mm"), load_recipe("cc12m_mm")
    assert cc12m.train.weight_decay == 0.5 and cc12m.train.epochs == 16
    assert cc12m.data.tasks[0].options["identity_fraction"] == 0.971 and cc12m.data.tasks[0].bases == ["cc12m"]
    assert get_family("tgit").identity_probability(0.971) == pytest.approx(0.99201, abs=1e-5)
    assert [spec.name for spec in cc12m.data.train] == PAPER_SOURCES
    assert cc12m.data.train[0].path == "cc12m/cc12m_train.csv"
    assert cc12m.data.train[2].path == "cc3m_vqa/cc3m_vqa_train.csv"
    assert cc12m.data.train[4].options == {}  # vg-vqa is downsampled only with CC3M
    same = ("lr", "betas", "eps", "warmup_steps", "batch_size", "grad_clip", "mlm_probability", "mmm_weight", "seed",
            "min_lr", "decay_embeddings", "precision")
    assert {k: getattr(cc12m.train, k) for k in same} == {k: getattr(cc3m.train, k) for k in same}


def test_sizes_and_the_staged_recipe_follow_each_other():
    for size in ("small", "base"):
        stage1 = load_recipe("cc3m_mm", size=size)
        stage2 = load_recipe("pretrain_then_rocov2", size=size)
        assert stage1.model.size == stage2.model.size == size
        assert stage1.run_dir() == Path(f"runs/cc3m_mm_{size}")
        assert stage2.model.init == str(stage1.run_dir() / "final")  # where the trainer saves the final model
    stage2 = load_recipe("pretrain_then_rocov2", ["model.init=chs20/FuseLIP-S-CC3M-MM"])
    assert stage2.model.init == "chs20/FuseLIP-S-CC3M-MM"
    assert [spec.name for spec in stage2.data.train] == ["rocov2"] and stage2.data.eval[0].id == "test"
    assert stage2.train.lr < 1e-3 and stage2.train.warmup_steps < 1000


@pytest.mark.parametrize("name", ["cc3m_mm", "cc12m_mm", "pretrain_then_rocov2"])
def test_options_are_accepted_by_the_adapters(name):
    recipe = load_recipe(name)
    for spec in recipe.data.train + recipe.data.eval:
        inspect.signature(get_adapter(spec.name)).bind("PATH", split=spec.split, limit=spec.limit, strict=False,
                                                       **spec.options)
    labels = {spec.id or spec.name for spec in recipe.data.train}
    for task in recipe.data.tasks:
        assert set(task.bases) <= labels
        inspect.signature(TGITTask).bind(object(), split="train", limit=None, strict=False, seed=0, **task.options)
    assert set(recipe.eval.tasks) <= set(TASKS)


def write_paper_data(root: Path) -> Path:
    """Every source of the paper mixture in its published layout, where the recipes look for it."""
    write_csv(root / "cc3m")
    write_vqa(root / "cc3m_vqa").rename(root / "cc3m_vqa" / "cc3m_vqa_train.csv")
    write_hq_edit(root / "hq_edit")
    vg = write_vg(root / "visual_genome")
    qas = json.loads((vg / "question_answers.json").read_text())
    qas.append({"id": 2, "qas": [{"qa_id": 290 + k, "image_id": 2, "question": f"More {k}?", "answer": f"more {k}."}
                                 for k in range(10)]})
    (vg / "question_answers.json").write_text(json.dumps(qas))
    return root


def paper_overrides(root: Path, tmp_path: Path) -> list[str]:
    return [f"data.root={root}", f"data.train.1.options.cache_dir={tmp_path / 'hf_cache'}"]


def test_mixture_builds_from_the_recipe_and_keeps_groups_whole(tmp_path):
    from fuselip_med.data.dataset import MixtureDataset, SampleDataset
    from fuselip_med.data.sampling import mixture_group_weights
    from fuselip_med.train.data import build_sources

    root = write_paper_data(tmp_path / "data")
    recipe = load_recipe("cc3m_mm", paper_overrides(root, tmp_path))
    sources = build_sources(recipe)
    assert [s.label for s in sources] == ["hq_edit", "cc3m_vqa", "vg_crop", "vg_vqa", "tgit:cc3m"]
    sizes = {s.label: len(s.source) for s in sources}
    assert sizes["hq_edit"] == 9 and sizes["cc3m_vqa"] == 4 and sizes["vg_crop"] == 8
    assert sizes["vg_vqa"] == 8  # 16 train QAs = 4 groups, half of them kept
    assert sources[-1].source.base.name == "cc/train" and sources[-1].weight == recipe.data.tasks[0].weight

    mixture = MixtureDataset([SampleDataset(s.source) for s in sources], [s.weight for s in sources])
    groups = mixture.groups()
    owner = {i: g for g, members in enumerate(groups) for i in members}
    sampler = GroupedBatchSampler(groups, 10, seed=0, group_weights=mixture_group_weights(mixture))
    for epoch in range(3):
        sampler.set_epoch(epoch)
        for batch in sampler:
            assert len(batch) <= 10
            for g in {owner[i] for i in batch}:
                assert set(groups[g]) <= set(batch)
