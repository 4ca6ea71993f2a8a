"""TGIT scoring: argmax == 0 per pool, accuracy per kind + mean; pools from real transforms."""
import numpy as np
import pytest
import torch
from PIL import Image

from fuselip_med.data.schema import Sample, SampleSide
from fuselip_med.data.transforms.tgit import TGITPair
from fuselip_med.eval.tgit import evaluate_tgit_pools, evaluate_tgit_source, pool_items, score_pools, summarize_tgit
from fuselip_med.inference.engine import Embedder
from tests.test_eval_fakes import HashModel, _unit


def identity_decode(x):
    return x


def test_score_pools_argmax_first_index_wins():
    q = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    cands = [torch.tensor([[1.0, 0.0], [0.5, 0.5]]),           # correct
             torch.tensor([[0.5, 0.0], [1.0, 0.0]]),           # a distractor is closer
             torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])]  # tie with index 2: index 0 wins
    assert score_pools(q, cands).tolist() == [True, False, True]
    assert score_pools(q[:1], [torch.tensor([[0.0, 1.0]])]).tolist() == [True]  # pool of one
    with pytest.raises(ValueError):
        score_pools(q, cands[:2])


def test_summarize_mean_over_kinds():
    s = summarize_tgit({"crop": [True, False, True, True], "flip": [False, False]})
    assert s["metrics"] == {"crop_accuracy": 0.75, "flip_accuracy": 0.0, "mean_accuracy": 0.375}
    assert s["per_kind"]["crop"] == {"correct": 3, "n": 4, "accuracy": 0.75}


class ImageOnlyModel(HashModel):
    """Embeds only the pixels: (prompt, source) lands on the candidate whose target equals the source."""

    def row_vector(self, pixel_key, text):
        return _unit(str(pixel_key), self.dim)


def _img(seed):
    return torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(seed))


def test_evaluate_ready_made_pools():
    imgs = [_img(i) for i in range(6)]
    easy = [[TGITPair("p", imgs[i], imgs[i], "easy"), TGITPair("p", imgs[i], imgs[i + 1], "easy")] for i in range(3)]
    hard = [[TGITPair("p", imgs[i], imgs[i + 2], "hard"), TGITPair("p", imgs[i], imgs[i], "hard")] for i in range(2)]
    model = ImageOnlyModel()
    res = evaluate_tgit_pools(Embedder(model, decode=identity_decode, progress=False),
                              {"easy": easy, "hard": hard, "single": easy[0]})
    assert res["metrics"] == {"easy_accuracy": 1.0, "hard_accuracy": 0.0, "single_accuracy": 1.0,
                              "mean_accuracy": pytest.approx(2 / 3)}
    assert res["n_pools_scored"] == 6
    # the query is fused (prompt + source), candidates are ("" + target)
    q, cands = pool_items(easy[0])
    assert q.kind == "pair" and q.text == "p" and all(c.kind == "pair" and c.text == "" for c in cands)
    assert set(model.seen.values()) == {1}


class ListSource:
    def __init__(self, samples):
        self.samples, self.name = samples, "imgs"

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


def _source(tmp_path, n=3):
    samples = [Sample(id="none", source="t", target=SampleSide(text="caption only"))]
    for i in range(n):
        path = tmp_path / f"{i}.png"
        arr = np.random.default_rng(i).integers(0, 256, (24, 32, 3), dtype=np.uint8)
        Image.fromarray(arr).save(path)
        samples.append(Sample(id=f"s{i}", source="t", query=SampleSide(image=str(path)),
                              target=SampleSide(text=f"caption {i}")))
    return ListSource(samples)


def test_pools_from_source_are_seeded_and_streamed(tmp_path):
    source = _source(tmp_path, n=2)
    run = lambda step: evaluate_tgit_source(  # noqa: E731
        Embedder(HashModel(), progress=False), source, n_images=2, seed=0, images_per_step=step)
    a, b = run(1), run(10)
    assert a["metrics"] == b["metrics"]  # streaming does not change the pools (one generator, sample order)
    assert list(a["per_kind"]) == ["randomcrop", "rotate", "colorjitterv2", "flip", "colorize_grayscale"]
    assert all(v["n"] == 2 for v in a["per_kind"].values())
    assert a["n_images"] == 2 and a["skipped"] == {"no image": 1} and a["family"] == "tgit"
    assert 0.0 <= a["metrics"]["mean_accuracy"] <= 1.0
