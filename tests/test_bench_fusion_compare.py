"""benchmarks/bench_fusion_compare.py: the paired McNemar p-value, pool scoring, and a short end-to-end run."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_fusion_compare.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_fusion_compare", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mcnemar_counts_only_discordant_pools(bench):
    better = np.array([True, True, True, False, True, False])
    worse = np.array([True, False, False, False, False, True])
    # discordant: 3 pools only `better` got, 1 only `worse` got -> P(X >= 3), X ~ Bin(4, 1/2) = 5/16
    assert bench.mcnemar_p_value(better, worse) == pytest.approx(5 / 16)
    assert bench.mcnemar_p_value(worse, worse) == 1.0


@pytest.mark.slow
def test_short_run_prints_one_table(bench, capsys):
    bench.main(["--steps", "1", "--pools", "2", "--archs", "fuselip,siglip_sf"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("# Early vs late fusion") and "SigLIP-SF" in lines[0]
    assert lines[1] == "| task | trials | chance | FuseLIP | SigLIP-SF | p (FuseLIP > SF) |"
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[3:]]
    assert [row[0] for row in rows[:4]] == [f"TGIT {k} accuracy" for k in ("rotate", "flip", "med_flip", "med_rotate")]
    assert rows[5][0].startswith("ROCOv2-demo image_to_text_R@1") and rows[5][1] == "96"
    assert all(len(row) == 6 for row in rows)
