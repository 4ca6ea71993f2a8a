"""Chunked ranking: hand-computed ties, several correct candidates, tiny pools, chunk invariance."""
import numpy as np
import pytest
import torch

from fuselip_med.eval.similarity import as_target_matrix, default_chunk_size, rank_targets


def reference_ranks(q, c, targets):
    """The reference's procedure on the full matrix: stable descending argsort, position of the target
    (several targets: the first one found in the ranking)."""
    scores = q @ c.T
    ranking = torch.argsort(scores, dim=1, descending=True, stable=True)
    out = []
    for i, tg in enumerate(targets):
        tg = [tg] if isinstance(tg, int) else list(tg)
        pos = [int((ranking[i] == t).nonzero()[0, 0]) for t in tg]
        out.append(min(pos))
    return torch.tensor(out)


def e(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_tie_with_earlier_candidate_ranks_behind_it():
    q = e([1.0, 0.0])
    c = e([1.0, 0.0], [1.0, 0.0], [0.0, 1.0])
    assert rank_targets(q, c, [1]).ranks.tolist() == [1]  # tied with index 0, which comes first
    assert rank_targets(q, c, [0]).ranks.tolist() == [0]  # tied with index 1, which comes later
    assert rank_targets(q, c, [2]).ranks.tolist() == [2]


def test_tie_with_later_candidate_ranks_ahead_of_it():
    q = e([1.0, 0.0])
    c = e([0.0, 1.0], [1.0, 0.0], [1.0, 0.0])
    assert rank_targets(q, c, [1]).ranks.tolist() == [0]
    assert rank_targets(q, c, [2]).ranks.tolist() == [1]


def test_several_correct_candidates_take_the_best_rank():
    q = e([1.0, 0.0])
    c = e([0.5, 0.5], [0.25, 0.0], [1.0, 0.0], [1.0, 0.0])  # scores .5, .25, 1, 1
    assert rank_targets(q, c, [[1, 3]]).ranks.tolist() == [1]      # 3 is best, but tied with 2 (not correct)
    assert rank_targets(q, c, [[3]]).ranks.tolist() == [1]
    assert rank_targets(q, c, [[2, 3]]).ranks.tolist() == [0]      # duplicate captions, both correct
    assert rank_targets(q, c, [[0, 1]]).ranks.tolist() == [2]
    # best among several is the first correct one in stable order
    r = rank_targets(q, c, [[3, 1]])
    assert r.ranks.tolist() == [1] and r.target_scores.tolist() == [1.0]


def test_target_last_in_pool_and_tiny_pools():
    q = e([1.0, 0.0])
    c = e([1.0, 0.0], [0.5, 0.0], [0.25, 0.0], [-1.0, 0.0])
    assert rank_targets(q, c, [3]).ranks.tolist() == [3]
    assert rank_targets(q, e([0.0, 1.0]), [0]).ranks.tolist() == [0]           # pool of one
    assert rank_targets(q, e([0.0, 1.0], [0.5, 0.0]), [0]).ranks.tolist() == [1]  # pool of two
    assert rank_targets(q, e([0.5, 0.0], [0.5, 0.0]), [1]).ranks.tolist() == [1]  # pool of two, tied


def test_targets_forms_and_errors():
    assert as_target_matrix(torch.tensor([1, 0]), 2, 2).tolist() == [[1], [0]]
    assert as_target_matrix([[0, 1], [1]], 2, 2).tolist() == [[0, 1], [1, -1]]
    assert as_target_matrix(np.array([0, 1]), 2, 2).tolist() == [[0], [1]]
    with pytest.raises(ValueError, match="no correct candidate"):
        as_target_matrix([[0], []], 2, 2)
    with pytest.raises(ValueError, match=">= the number of candidates"):
        as_target_matrix([2], 1, 2)
    with pytest.raises(ValueError, match="targets for 1 queries"):
        as_target_matrix([0], 2, 2)
    with pytest.raises(ValueError, match="NaN"):
        rank_targets(e([float("nan"), 0.0]), e([1.0, 0.0]), [0])
    with pytest.raises(ValueError, match="same D"):
        rank_targets(e([1.0, 0.0]), torch.ones(2, 3), [0])


def _dyadic(n, d, seed):
    """Embeddings with few distinct small dyadic values: every dot product is exact, ties are common."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-2, 3, (n, d), generator=g).to(torch.float32) / 4


def test_matches_reference_on_many_ties_and_any_chunk_size():
    q, c = _dyadic(150, 4, 0), _dyadic(220, 4, 1)
    rng = np.random.default_rng(0)
    targets = [sorted(rng.choice(220, size=rng.integers(1, 4), replace=False).tolist()) for _ in range(150)]
    expected = reference_ranks(q, c, targets)
    for chunk in (1, 7, 64, 150, 1000, None):
        assert torch.equal(rank_targets(q, c, targets, chunk_size=chunk).ranks, expected), chunk


def test_chunked_equals_unchunked_on_real_valued_embeddings():
    g = torch.Generator().manual_seed(3)
    q = torch.nn.functional.normalize(torch.randn(300, 64, generator=g), dim=1)
    c = torch.nn.functional.normalize(torch.randn(500, 64, generator=g), dim=1)
    c[10] = c[20]  # exact duplicates among candidates
    targets = torch.randint(0, 500, (300,), generator=g)
    targets[:5] = 20
    full = rank_targets(q, c, targets, chunk_size=300, topk=5)
    for chunk in (1, 13, 17, 128, 299):
        part = rank_targets(q, c, targets, chunk_size=chunk, topk=5)
        assert torch.equal(part.ranks, full.ranks)
        assert torch.equal(part.topk_indices, full.topk_indices)
        assert torch.equal(part.target_scores, full.target_scores)
    assert torch.equal(full.ranks, reference_ranks(q, c, targets.tolist()))


def test_topk_is_stable_sorted():
    q = e([1.0, 0.0])
    c = e([0.5, 0.0], [1.0, 0.0], [0.5, 0.0], [1.0, 0.0], [0.0, 0.0])
    r = rank_targets(q, c, [0], topk=4)
    assert r.topk_indices.tolist() == [[1, 3, 0, 2]]
    assert r.topk_scores.tolist() == [[1.0, 1.0, 0.5, 0.5]]
    assert rank_targets(q, c, [0], topk=99).topk_indices.shape == (1, 5)


def test_default_chunk_size_bounds_memory():
    assert default_chunk_size(100_000) * 100_000 * 4 <= 256 * 1024 * 1024
    assert default_chunk_size(1) == 4096 and default_chunk_size(10**12) == 16  # whole blocks of 16 rows


def test_topk_takes_the_lowest_indices_among_ties_at_the_cut():
    q, c = _dyadic(120, 3, 5), _dyadic(90, 3, 6)
    r = rank_targets(q, c, [0] * 120, topk=7, chunk_size=32)
    expected = torch.argsort(q @ c.T, dim=1, descending=True, stable=True)[:, :7]
    assert torch.equal(r.topk_indices, expected)
