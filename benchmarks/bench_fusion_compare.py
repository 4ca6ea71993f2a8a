"""Early vs late fusion at toy scale: FuseLIP-tiny vs SigLIP-SF-tiny vs SigLIP-MLF-tiny on the demo data.

Each arch is trained twice through the real ``Trainer`` (``--set model.arch=...``, same seed, data and steps):
on the ``tgit_demo`` recipe (TGIT and TGIT-med flips and rotations of the demo images) and on the
``rocov2_demo`` recipe (image-caption pairs). The TGIT models are scored on the tasks' held-out pools (demo
images never trained on, one pool per image and kind, first pair = the query; as
``bench_tgit_learning.py``), the ROCOv2 models by the recipe's final evaluation on the demo test split
(seeded retrieval pools, zero-shot modality). One table: task, trials, chance, each arch's score with the
one-sided binomial p-value of doing that well by guessing, and, for TGIT, the exact one-sided McNemar
p-value of FuseLIP beating SF on the same pools (the paper's central claim). About 30 minutes on 2 CPU cores.

    python benchmarks/bench_fusion_compare.py
    python benchmarks/bench_fusion_compare.py --steps 2 --pools 2        # a smoke run
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from fuselip_med.core.loading import load_model
from fuselip_med.eval.tgit import pool_items, score_pools
from fuselip_med.inference.engine import Embedder
from fuselip_med.recipes import load_recipe
from fuselip_med.train.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tgit_learning import guessing_p_value, heldout_pools  # noqa: E402

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
ARCHS = {"fuselip": "FuseLIP", "siglip_sf": "SigLIP-SF", "siglip_mlf": "SigLIP-MLF"}


def mcnemar_p_value(better: np.ndarray, worse: np.ndarray) -> float:
    """Exact one-sided McNemar test that ``better`` (bool per pool) beats ``worse`` on the same pools:
    P(X >= b) for X ~ Binomial(b + c, 1/2), b = pools only ``better`` got right, c = only ``worse``."""
    b = int(np.sum(better & ~worse))
    c = int(np.sum(~better & worse))
    return guessing_p_value(b, b + c, 0.5) if b + c else 1.0


def pool_correctness(model, pools: dict[str, list], batch_size: int) -> dict[str, np.ndarray]:
    """{kind: bool per pool}: whether ``model`` ranks each pool's correct target first (``eval.tgit`` rules)."""
    embedder = Embedder(model.eval(), batch_size=batch_size, progress=False)
    correct = {}
    with torch.no_grad():
        for kind, kind_pools in pools.items():
            items = [pool_items(pool) for pool in kind_pools]
            table = embedder.embed([q for q, _ in items] + [c for _, cs in items for c in cs])
            queries = torch.stack([table[q.key] for q, _ in items])
            correct[kind] = score_pools(queries, [table.lookup(c.key for c in cs) for _, cs in items])
    return correct


def train(recipe_name: str, arch: str, out: Path, steps: int | None, overrides: list[str]):
    """Train ``recipe_name`` with ``model.arch=arch``; returns (recipe, TrainResult)."""
    sets = [f"model.arch={arch}", f"output.dir={out / recipe_name / arch}", "logging.progress=false", *overrides]
    if steps:
        sets.append(f"train.steps={steps}")
    recipe = load_recipe(str(RECIPES / f"{recipe_name}.yaml"), sets)
    return recipe, Trainer(recipe, console=Console(quiet=True)).run()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", default=",".join(ARCHS), help="comma-separated model.arch values to compare")
    p.add_argument("--steps", type=int, default=None, help="training steps of both recipes (default: the recipes')")
    p.add_argument("--pools", type=int, default=None, help="at most this many held-out TGIT pools per kind")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="override for both recipes")
    p.add_argument("--out", default=None, help="run directory (default: a temporary one, removed at the end)")
    args = p.parse_args(argv)
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    unknown = sorted(set(archs) - set(ARCHS))
    if unknown:
        p.error(f"--archs: unknown {unknown}; choose from {', '.join(ARCHS)}")

    correct: dict[str, dict[str, np.ndarray]] = {}
    retrieval: dict[str, dict] = {}
    losses: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="bench_fusion_") as tmp:
        out = Path(args.out or tmp)
        for arch in archs:
            recipe, result = train("tgit_demo", arch, out, args.steps, args.overrides)
            pools = heldout_pools(recipe, args.pools)
            correct[arch] = pool_correctness(load_model(result.final_dir)[0], pools, recipe.eval.batch_size)
            demo_recipe, demo = train("rocov2_demo", arch, out, args.steps, [*args.overrides, "eval.at_start=false"])
            retrieval[arch] = {"metrics": demo.eval_after, "pool_size": demo_recipe.eval.pool_size,
                               "n_pools": demo_recipe.eval.n_pools}
            losses[arch] = (f"{ARCHS[arch]}: tgit loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}, "
                            f"rocov2 loss {demo.losses[0]:.3f} -> {demo.losses[-1]:.3f}")

    sizes = {kind: len(kind_pools[0]) for kind, kind_pools in pools.items()}
    print(f"# Early vs late fusion, tiny models, {result.steps} tgit_demo / {demo.steps} rocov2_demo steps "
          f"(seed {recipe.train.seed}); " + "; ".join(losses.values()))
    names = [ARCHS[a] for a in archs]
    compare = "fuselip" in archs and "siglip_sf" in archs
    print("| task | trials | chance | " + " | ".join(names) + (" | p (FuseLIP > SF) |" if compare else " |"))
    print("|---|---|---|" + "---|" * len(names) + ("---|" if compare else ""))
    for kind in pools:
        trials, chance = len(correct[archs[0]][kind]), 1.0 / sizes[kind]
        cells = [_cell(float(np.mean(correct[a][kind])), trials, chance) for a in archs]
        extra = [f"{mcnemar_p_value(correct['fuselip'][kind], correct['siglip_sf'][kind]):.1e}"] if compare else []
        print(f"| TGIT {kind} accuracy | {trials} | {chance:.3f} | " + " | ".join(cells + extra) + " |")
    mean_chance = float(np.mean([1.0 / s for s in sizes.values()]))
    means = [f"{np.mean([np.mean(correct[a][k]) for k in pools]):.3f}" for a in archs]
    print(f"| TGIT mean accuracy | - | {mean_chance:.3f} | " + " | ".join(means + (["-"] if compare else [])) + " |")
    for metric in ("image_to_text_R@1", "text_to_image_R@1"):
        first = retrieval[archs[0]]
        trials, chance = first["pool_size"] * first["n_pools"], 1.0 / first["pool_size"]
        cells = [_cell(retrieval[a]["metrics"].get(f"eval/rocov2-retrieval/{metric}", float("nan")), trials, chance)
                 for a in archs]
        print(f"| ROCOv2-demo {metric} (pool {first['pool_size']}) | {trials} | {chance:.3f} | "
              + " | ".join(cells + (["-"] if compare else [])) + " |")
    chance = retrieval[archs[0]]["metrics"].get("eval/rocov2-modality/chance_accuracy", float("nan"))
    cells = [f"{retrieval[a]['metrics'].get('eval/rocov2-modality/accuracy', float('nan')):.3f}" for a in archs]
    print(f"| ROCOv2-demo modality accuracy | - | {chance:.3f} | " + " | ".join(cells + (["-"] if compare else []))
          + " |")


def _cell(value: float, trials: int, chance: float) -> str:
    """``0.812 (p 3.1e-09)``: the score and its one-sided binomial p-value under guessing."""
    if math.isnan(value):
        return "-"
    return f"{value:.3f} (p {guessing_p_value(round(value * trials), trials, chance):.1e})"


if __name__ == "__main__":
    main()
