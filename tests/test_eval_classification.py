"""Zero-shot modality classification and concept detection on synthetic embeddings; modality gap."""

import numpy as np
import pytest
import torch

from fuselip_med.eval import classification as cls
from fuselip_med.eval.modality_gap import modality_gap


def test_class_weights_normalise_average_renormalise():
    a = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # normalised: (1,0), (0,1) -> mean (.5,.5) -> (.707,.707)
    b = torch.tensor([[0.0, -1.0]])
    w = cls.class_weights([a, b])
    assert torch.allclose(w, torch.tensor([[2**-0.5, 2**-0.5], [0.0, -1.0]]))


def test_prompts_and_modality_names():
    p = cls.class_prompts(["CT", "PET"], ["a {c} image.", "{c} scan."])
    assert p == [["a CT image.", "CT scan."], ["a PET image.", "PET scan."]]
    assert cls.normalize_modality("ct") == "CT"
    assert cls.normalize_modality("C0024485") == "MRI"
    assert cls.normalize_modality("Plain x-ray") == "X-ray"
    assert cls.normalize_modality("Ultrasonography") == "ultrasound"
    assert cls.normalize_modality(None) is None and cls.normalize_modality("histology") is None
    assert cls.normalize_modality("PET", classes=("CT",)) is None


def test_classification_metrics_hand_computed():
    m = cls.classification_metrics([0, 0, 1, 2], [0, 1, 1, 1], ["A", "B", "C", "D"])
    assert m["confusion_matrix"]["counts"] == [[1, 1, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    assert m["accuracy"] == 0.5
    pc = m["per_class"]
    assert pc["A"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert pc["B"]["precision"] == pytest.approx(1 / 3) and pc["B"]["f1"] == pytest.approx(0.5)
    assert pc["C"]["f1"] == 0.0
    # D occurs nowhere: left out of the macro average; C (true but never predicted) counts as 0
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.5 + 0.0) / 3)
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    with pytest.raises(ValueError):
        cls.classification_metrics([0, 5], [0, 0], ["A", "B"])


def _orthonormal(n, d, seed=0):
    q, _ = torch.linalg.qr(torch.randn(d, n, generator=torch.Generator().manual_seed(seed)))
    return q.T  # (n, d) orthonormal rows


def test_zero_shot_recovers_known_classes_and_is_at_chance_for_random():
    n_cls, d = 6, 32
    directions = _orthonormal(n_cls, d)
    g = torch.Generator().manual_seed(1)
    # three noisy prompts per class around the class direction
    prompts = [torch.nn.functional.normalize(directions[c] + 0.2 / d**0.5 * torch.randn(3, d, generator=g), dim=1)
               for c in range(n_cls)]
    w = cls.class_weights(prompts)
    y = torch.randint(0, n_cls, (600,), generator=g)
    images = torch.nn.functional.normalize(directions[y] + 0.3 / d**0.5 * torch.randn(600, d, generator=g), dim=1)
    pred, scores = cls.zero_shot_predict(images, w)
    assert scores.shape == (600, n_cls)
    m = cls.classification_metrics(y.tolist(), pred.tolist(), [str(c) for c in range(n_cls)])
    assert m["accuracy"] == 1.0 and m["macro_f1"] == 1.0
    rand = torch.nn.functional.normalize(torch.randn(3000, d, generator=g), dim=1)
    y_rand = torch.randint(0, n_cls, (3000,), generator=g)
    acc = cls.classification_metrics(y_rand.tolist(), cls.zero_shot_predict(rand, w)[0].tolist(),
                                     [str(c) for c in range(n_cls)])["accuracy"]
    assert abs(acc - 1 / n_cls) < 0.04


def test_argmax_tie_goes_to_first_class():
    pred, _ = cls.zero_shot_predict(torch.tensor([[1.0, 1.0]]), torch.eye(2))
    assert pred.tolist() == [0]


def test_sample_f1_empty_set_conventions():
    pred = np.array([[0, 0], [1, 0], [0, 0], [1, 1]], dtype=bool)
    truth = np.array([[0, 0], [0, 0], [1, 0], [1, 0]], dtype=bool)
    assert cls.sample_f1(pred, truth).tolist() == [1.0, 0.0, 0.0, pytest.approx(2 / 3)]
    m = cls.concept_metrics(pred.astype(float), truth, 0.5)
    assert m["samples_f1"] == pytest.approx((1 + 0 + 0 + 2 / 3) / 4)
    assert m["samples_precision"] == pytest.approx((1 + 0 + 0 + 0.5) / 4)
    assert m["samples_recall"] == pytest.approx((1 + 0 + 0 + 1) / 4)  # empty truth, 1 predicted -> 0
    assert m["micro_f1"] == pytest.approx(2 * 1 / (3 + 2))
    assert m["mean_predicted"] == 0.75 and m["mean_true"] == 0.5


def test_top_concepts_and_matrix():
    lists = [["C2", "C1"], ["C1", "C1"], ["C3", "C2"], ["C4"]]
    assert cls.top_concepts(lists, 2) == [("C1", 2), ("C2", 2)]
    assert cls.top_concepts(lists, 10)[-2:] == [("C3", 1), ("C4", 1)]
    m = cls.concept_matrix(lists, ["C1", "C2"])
    assert m.tolist() == [[True, True], [True, False], [False, True], [False, False]]


def _brute_force_threshold(scores, truth):
    best = (-1.0, None)
    for t in sorted(set(scores.ravel().tolist()) | {np.inf}, reverse=True):
        f1 = cls.sample_f1(scores >= t, truth).mean()
        if f1 > best[0] + 1e-12:
            best = (f1, t)
    return best[1], best[0]


@pytest.mark.parametrize("seed", range(6))
def test_choose_threshold_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n, k = rng.integers(1, 12), rng.integers(1, 6)
    scores = np.round(rng.normal(size=(n, k)), 1)  # rounded: many exact ties
    truth = rng.random((n, k)) < 0.3
    t, f1 = cls.choose_threshold(scores, truth)
    bt, bf1 = _brute_force_threshold(scores, truth)
    assert f1 == pytest.approx(bf1) and t == bt
    assert cls.concept_metrics(scores, truth, t)["samples_f1"] == pytest.approx(f1)


def test_choose_threshold_separable_and_empty_cases():
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.1]])
    truth = np.array([[1, 0], [0, 1], [0, 0]], dtype=bool)
    t, f1 = cls.choose_threshold(scores, truth)
    assert f1 == 1.0 and 0.3 < t <= 0.8
    # nothing is true anywhere: predicting nothing (t = inf) is perfect
    t, f1 = cls.choose_threshold(scores, np.zeros_like(truth))
    assert t == np.inf and f1 == 1.0
    with pytest.raises(ValueError):
        cls.choose_threshold(scores, truth[:2])


def test_modality_gap_hand_computed():
    a = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # normalised: both (1, 0)
    b = torch.tensor([[0.0, 2.0], [0.0, 1.0]])  # both (0, 1)
    m = modality_gap(a, b, paired=True)
    assert m["gap"] == pytest.approx(2**0.5) and m["cosine_of_means"] == pytest.approx(0.0)
    assert m["mean_paired_cosine"] == pytest.approx(0.0)
    same = modality_gap(a, a)
    assert same["gap"] == 0.0 and same["cosine_of_means"] == pytest.approx(1.0)
    c = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert modality_gap(c, b)["gap"] == pytest.approx(float(torch.tensor([0.5, -0.5]).norm()))
    with pytest.raises(ValueError):
        modality_gap(a, torch.ones(2, 3))
