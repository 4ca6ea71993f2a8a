"""Does a tiny FuseLIP learn TGIT? Held-out pool accuracy per kind before and after a short CPU training.

Trains the ``tgit_demo`` recipe (tiny FuseLIP, flips and rotations of the paper's TGIT set and of the
radiology set over the bundled demo images) through the real ``Trainer`` and scores every task's "eval" split
(demo images held out from training by the tasks' id hash, one pool per image and kind, first pair = the
query) with ``run_evaluation``. Prints one table: kind, pool size, chance (1 / pool size), accuracy before
and after, and the one-sided binomial p-value of the accuracy after under guessing. About 4 minutes on 2 CPU
cores.

    python benchmarks/bench_tgit_learning.py
    python benchmarks/bench_tgit_learning.py --steps 100 --set train.lr=1e-3
"""
from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
from accelerate.utils import set_seed
from rich.console import Console

from fuselip_med.core.loading import build_model, load_model
from fuselip_med.data.transforms.tasks import TGITTask
from fuselip_med.data.transforms.tgit import TGITPair
from fuselip_med.eval.runner import run_evaluation
from fuselip_med.recipes import load_recipe
from fuselip_med.train.data import build_source
from fuselip_med.train.trainer import Trainer

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "tgit_demo.yaml"


def heldout_pools(recipe, per_kind: int | None = None) -> dict[str, list[list[TGITPair]]]:
    """{kind: [pool, ...]} from each of the recipe's TGIT tasks on the "eval" split of its first base (images
    never trained on), at most ``per_kind`` pools per kind."""
    pools: dict[str, list[list[TGITPair]]] = {}
    for task_spec in recipe.data.tasks:
        spec = next(s for s in recipe.data.train if (s.id or s.name) in (task_spec.bases or [s.id or s.name]))
        options = dict(task_spec.options)
        task = TGITTask(build_source(recipe, spec), options.pop("kinds", task_spec.name), split="eval",
                        seed=recipe.train.seed, **options)
        for group in task.groups():
            if per_kind is not None and len(pools.get(task.item_kind(group[0]), [])) >= per_kind:
                continue
            samples = [task[i] for i in group]
            pool = [TGITPair(s.query.text, s.query.image, s.target.image, s.meta["kind"], s.meta["params"])
                    for s in samples]
            pools.setdefault(pool[0].kind, []).append(pool)
    return pools


def guessing_p_value(correct: int, trials: int, chance: float) -> float:
    """P(at least ``correct`` of ``trials`` right by guessing with success probability ``chance``)."""
    return sum(math.comb(trials, k) * chance**k * (1 - chance) ** (trials - k) for k in range(correct, trials + 1))


def accuracies(model, pools, out_dir: Path, batch_size: int) -> dict[str, float]:
    report = run_evaluation(model.eval(), ["tgit"], {"tgit": pools}, out_dir, batch_size=batch_size, progress=False)
    return report["tasks"]["tgit"]["metrics"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=str(RECIPE))
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override key=value")
    p.add_argument("--pools", type=int, default=None, help="at most this many held-out pools per kind (default: all)")
    p.add_argument("--out", default=None, help="run directory (default: a temporary one, removed at the end)")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench_tgit_") as tmp:
        out = Path(args.out or tmp)
        overrides = [f"output.dir={out / 'run'}", "logging.progress=false", *args.overrides]
        if args.steps:
            overrides.append(f"train.steps={args.steps}")
        recipe = load_recipe(args.recipe, overrides)
        pools = heldout_pools(recipe, args.pools)
        batch = recipe.eval.batch_size

        set_seed(recipe.train.seed)  # the same initial weights as the trainer's
        before = accuracies(build_model(recipe.model.size, init=recipe.model.init), pools, out / "eval_before", batch)
        start = time.perf_counter()
        result = Trainer(recipe, console=Console(quiet=True)).run()
        seconds = time.perf_counter() - start
        after = accuracies(load_model(result.final_dir)[0], pools, out / "eval_after", batch)

    print(f"# TGIT held-out pools ({len(next(iter(pools.values())))} demo images per kind, never trained on), "
          f"tiny FuseLIP, {result.steps} steps x batch {recipe.train.batch_size}, lr {recipe.train.lr:g}, "
          f"train {seconds:.0f} s, loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}")
    print("| kind | pools | pool size | chance | accuracy before | accuracy after | p (guessing) |")
    print("|---|---|---|---|---|---|---|")
    chances = []
    for kind, kind_pools in pools.items():
        size, accuracy = len(kind_pools[0]), after[f"{kind}_accuracy"]
        chances.append(1.0 / size)
        p_value = guessing_p_value(round(accuracy * len(kind_pools)), len(kind_pools), 1.0 / size)
        print(f"| {kind} | {len(kind_pools)} | {size} | {1.0 / size:.3f} | {before[f'{kind}_accuracy']:.3f} "
              f"| {accuracy:.3f} | {p_value:.1e} |")
    print(f"| mean | {sum(len(v) for v in pools.values())} | - | {np.mean(chances):.3f} "
          f"| {before['mean_accuracy']:.3f} | {after['mean_accuracy']:.3f} | |")


if __name__ == "__main__":
    main()
