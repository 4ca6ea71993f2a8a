"""Retrieval metrics: hand-computed R@k / mean / median rank, correct sets from keys, seeded pools."""
import numpy as np
import pytest
import torch

from fuselip_med.eval.retrieval import (
    evaluate_retrieval,
    pair_positives,
    rank_metrics,
    recall_curve,
    retrieval_metrics,
    sample_pools,
)


def test_rank_metrics_hand_computed():
    m = rank_metrics([0, 1, 5, 12], "x")
    assert m == {"x_R@1": 0.25, "x_R@5": 0.5, "x_R@10": 0.75, "x_mean_rank": 5.5, "x_median_rank": 4.0}
    # even count: median 0.5 -> floor 0 -> + 1
    assert rank_metrics([0, 1], "y")["y_median_rank"] == 1.0
    assert rank_metrics([3], "z") == {"z_R@1": 0.0, "z_R@5": 1.0, "z_R@10": 1.0, "z_mean_rank": 4.0,
                                      "z_median_rank": 4.0}
    assert recall_curve([0, 1, 5], 3) == pytest.approx([1 / 3, 2 / 3, 2 / 3])
    with pytest.raises(ValueError):
        rank_metrics([], "x")


def test_pair_positives_duplicate_captions_and_images():
    # samples: (imgA, "c1"), (imgB, "c1"), (imgC, "c2"), (imgA, "c3")
    l2r, r2l = pair_positives(["A", "B", "C", "A"], ["c1", "c1", "c2", "c3"])
    assert l2r == [[0, 1, 3], [0, 1], [2], [0, 1, 3]]  # A's captions: c1 (positions 0, 1) and c3
    assert r2l == [[0, 1, 3], [0, 1, 3], [2], [0, 3]]  # caption c1 describes A (0, 3) and B (1)


def e(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_duplicate_captions_are_all_correct():
    # Three images; images 1 and 2 share the caption "same", so its two copies embed identically.
    img = e([1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0])
    txt = e([1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.0, 0.5, 0.5])
    m, curves = retrieval_metrics(img, txt, ["i0", "i1", "i2"], ["a", "same", "same"])
    # image 2's own caption copy (index 2) is tied with index 1 and ranks behind it, but index 1 is
    # "same" too, so both are correct -> rank 0.
    assert m["image_to_text_R@1"] == 1.0
    # text "same" (index 1 and 2) accepts images 1 and 2, both tied at 0.5 -> rank 0 for both.
    assert m["text_to_image_R@1"] == 1.0
    # without the duplicate rule, image 2 would rank its caption second:
    m2, _ = retrieval_metrics(img, txt, ["i0", "i1", "i2"], ["a", "same1", "same2"])
    assert m2["image_to_text_R@1"] == pytest.approx(2 / 3)
    assert m2["image_to_text_mean_rank"] == pytest.approx((0 + 0 + 1) / 3 + 1)
    assert curves["image_to_text"] == [1.0, 1.0, 1.0]


def test_sample_pools_seeded_without_replacement():
    a = sample_pools(50, 10, 3, seed=0)
    b = sample_pools(50, 10, 3, seed=0)
    c = sample_pools(50, 10, 3, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    for p in a:
        assert len(np.unique(p)) == 10 and np.all(np.diff(p) > 0) and p.max() < 50
    # the documented recipe
    rng = np.random.default_rng(0)
    assert np.array_equal(a[0], np.sort(rng.choice(50, size=10, replace=False)))
    with pytest.raises(ValueError):
        sample_pools(5, 10, 1, 0)


def _random_pairs(n, d=16, seed=0, noise=1.0):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    txt = torch.nn.functional.normalize(img + noise * torch.randn(n, d, generator=g), dim=1)
    return img, txt


def test_evaluate_retrieval_pools_are_the_mean_of_per_pool_metrics():
    img, txt = _random_pairs(60)
    keys_i, keys_t = [f"i{k}" for k in range(60)], [f"t{k}" for k in range(60)]
    res = evaluate_retrieval(img, txt, keys_i, keys_t, pool_size=20, n_pools=4, seed=7)
    assert (res["pool_size"], res["n_pools"], res["seed"], res["n"]) == (20, 4, 7, 60)
    per = []
    for idx in sample_pools(60, 20, 4, 7):
        sel = torch.from_numpy(idx)
        per.append(retrieval_metrics(img[sel], txt[sel], [keys_i[i] for i in idx], [keys_t[i] for i in idx])[0])
    for k, v in res["metrics"].items():
        assert v == pytest.approx(np.mean([p[k] for p in per]))
        assert res["metrics_std"][k] == pytest.approx(np.std([p[k] for p in per]))
    assert len(res["recall_curve"]["image_to_text"]) == 20
    assert res["full_pool"]["pool_size"] == 60 and len(res["full_pool"]["recall_curve"]["text_to_image"]) == 50
    # reproducible
    again = evaluate_retrieval(img, txt, keys_i, keys_t, pool_size=20, n_pools=4, seed=7)
    assert again["metrics"] == res["metrics"]
    # a smaller pool is easier than the full one for these noisy embeddings
    assert res["metrics"]["image_to_text_R@1"] >= res["full_pool"]["metrics"]["image_to_text_R@1"]


def test_evaluate_retrieval_small_data_uses_the_whole_pool():
    img, txt = _random_pairs(8, noise=0.0)
    res = evaluate_retrieval(img, txt, list("abcdefgh"), list("ABCDEFGH"), pool_size=1000, n_pools=5)
    assert res["pool_size"] == 8 and res["n_pools"] == 1 and res["requested_pool_size"] == 1000
    assert res["metrics"] == res["full_pool"]["metrics"]
    assert res["metrics"]["image_to_text_R@1"] == 1.0 and res["metrics"]["text_to_image_median_rank"] == 1.0


def test_composed_one_direction_names():
    q, t = _random_pairs(10, noise=0.0)
    res = evaluate_retrieval(q, t, list(range(10)), list(range(10)), names=("composed", "image"),
                             both_directions=False, pool_size=None)
    assert set(res["metrics"]) == {"composed_to_image_R@1", "composed_to_image_R@5", "composed_to_image_R@10",
                                   "composed_to_image_mean_rank", "composed_to_image_median_rank"}
    assert res["metrics"]["composed_to_image_R@1"] == 1.0
