"""benchmarks/bench_tgit_learning.py: held-out pools of the tgit_demo recipe and a short end-to-end run."""
import importlib.util
import math
from pathlib import Path

import pytest

from fuselip_med.recipes import load_recipe

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_tgit_learning.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_tgit_learning", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_heldout_pools_cover_both_sets_with_answerable_pools(bench, tmp_path):
    recipe = load_recipe(str(bench.RECIPE), [f"output.dir={tmp_path}"])
    pools = bench.heldout_pools(recipe, per_kind=3)
    assert {kind: len(p) for kind, p in pools.items()} == {"flip": 3, "rotate": 3, "med_flip": 3, "med_rotate": 3}
    sizes = {kind: {len(pool) for pool in p} for kind, p in pools.items()}
    assert sizes == {"flip": {3}, "rotate": {18}, "med_flip": {3}, "med_rotate": {9}}
    for kind_pools in pools.values():
        for pool in kind_pools:
            assert len({pair.prompt for pair in pool}) == len(pool)  # unique prompts: answerable
            assert all(pair.source_image is pool[0].source_image for pair in pool)  # one query image per pool


def test_guessing_p_value_is_the_binomial_tail(bench):
    assert bench.guessing_p_value(1, 1, 0.5) == pytest.approx(0.5)
    assert bench.guessing_p_value(0, 7, 0.2) == pytest.approx(1.0)
    direct = sum(math.comb(10, k) * 0.3**k * 0.7 ** (10 - k) for k in (8, 9, 10))
    assert bench.guessing_p_value(8, 10, 0.3) == pytest.approx(direct)


def test_short_run_prints_one_table(bench, capsys):
    bench.main(["--steps", "2", "--pools", "2"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("# TGIT held-out pools") and "2 steps x batch 48" in lines[0]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[3:]]
    assert sorted(row[0] for row in rows[:-1]) == ["flip", "med_flip", "med_rotate", "rotate"]
    assert rows[-1][0] == "mean" and rows[-1][1] == "8"
    for kind, pools, size, chance, *_ in rows[:-1]:
        assert pools == "2" and float(chance) == pytest.approx(1 / int(size), abs=1e-3)
