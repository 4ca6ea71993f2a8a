"""Sanity checks for relevance maps (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018), applied to
the occlusion maps of ``explain.occlusion`` (or any explainer with the same call).

* Model randomisation (Adebayo Sec. 3.1): the map of a copy whose encoder weights are re-initialised (every
  module's ``reset_parameters``, seeded; the frozen TiTok tokenizer is kept, it is not trained) must differ from
  the trained model's map: Spearman rank correlation ``rho`` of the two maps' cells below ``MAX_RHO``.
* Text randomisation (the data-randomisation test of Adebayo Sec. 3.2 carried over to the text that conditions the
  map): the map for an unrelated text must differ in the same sense. A map that ignores the text fails it.
* Pointing game (Zhang et al., "Top-down Neural Attention by Excitation Backprop", ECCV 2016): on demo images whose
  finding the generator placed in a known region (``data.demo.planted_findings``), scored against their captions,
  the cell of the largest drop touches the finding in at least ``POINTING_MIN_SHARE`` of the images, and at least
  ``POINTING_MIN_LIFT`` times the share a uniformly random cell gets (the mean share of cells the finding touches).
  Its line also says whether the model sees the finding at all: in how many images the similarity to the text is
  higher with the finding than for the same image drawn without it. A model whose similarity does not depend on
  the finding cannot pass, whatever the map; a correct map of such a model points elsewhere.

Spearman's rho is scipy's ``spearmanr`` over the ``grid * grid`` cells; a constant map has no ranks and counts as
rho = 0 (it shares no ordering with any map). For several images the median rho is compared. The sign counts
(Adebayo et al. report rank correlations with and without absolute values): a map that ranks the cells in
reverse (rho near -1) differs from the other as much as possible. That is what a text-conditioned occlusion map
shows for an unrelated text: hiding the evidence for the query's text makes the image *more* like an unrelated
one, so the cells the query needs most are those where the unrelated text gains most. A map that ignores the text
gives rho = +1.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["MAX_RHO", "POINTING_MIN_LIFT", "POINTING_MIN_SHARE", "UNRELATED_TEXTS", "Case", "CheckResult",
           "Explainer", "finding_gain", "model_randomisation", "planted_cases", "pointing_game", "randomized_copy",
           "run_sanity", "spearman", "text_randomisation", "unrelated_text"]

MAX_RHO = 0.5  # Spearman rho below this: "differs" (at most a weak agreement in the ranking of the cells)
POINTING_MIN_SHARE = 0.5  # the map's maximum on the finding in at least half of the planted images
POINTING_MIN_LIFT = 3.0  # ... and at least three times as often as a random cell
# Sentences about other body parts and modalities than most queries; the one farthest from the query (in the
# model's own text space) is the unrelated text.
UNRELATED_TEXTS = (
    "Coronal T1-weighted MRI of the left knee showing a small cyst in the proximal tibia.",
    "Pelvic ultrasound revealing a large anechoic cyst in the right lower pelvis.",
    "PA chest radiograph with a large left pleural effusion.",
    "Axial non-contrast CT of the head demonstrating a hyperdense hemorrhage in the right frontal lobe.",
)

Explainer = Callable[..., object]  # (model, image [3,S,S], text, *, query_image=None) -> object with .drops [G, G]


@dataclass(frozen=True)
class Case:
    """One map to check: the model-input ``image`` ``[3, S, S]`` float32 in [0, 1], the ``text`` (or instruction,
    with ``query_image``); for a planted finding, ``without``: the same image drawn without it."""

    image: torch.Tensor
    text: str
    query_image: torch.Tensor | None = None
    without: torch.Tensor | None = None


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check: ``value`` compared with ``threshold`` (``below``: pass when value < threshold,
    else pass when value >= threshold), and a sentence on what was measured."""

    name: str
    value: float
    threshold: float
    below: bool
    passed: bool
    detail: str

    def line(self) -> str:
        """``name: value (pass|FAIL: needs < threshold); detail`` on one line."""
        verdict = "pass" if self.passed else "FAIL"
        relation = "<" if self.below else ">="
        return f"{self.name}: {self.value:.3f} ({verdict}: needs {relation} {self.threshold:.2f}); {self.detail}"

    def to_dict(self) -> dict:
        return {"value": round(self.value, 6), "threshold": self.threshold,
                "rule": "value < threshold" if self.below else "value >= threshold", "passed": self.passed,
                "detail": self.detail}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps' cells (scipy ``spearmanr``); 0.0 when either map is constant."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    rho = float(spearmanr(a, b).statistic)
    return 0.0 if math.isnan(rho) else rho


def randomized_copy(model, seed: int = 0):
    """A copy of ``model`` with every trainable module re-initialised (``reset_parameters``, seeded with ``seed``),
    sharing the frozen image tokenizer (TiTok is not trained, and sharing it lets the copy reuse the occluded
    images' codes)."""
    tokenizer = getattr(model, "image_tokenizer", None)
    memo = {id(tokenizer): tokenizer} if tokenizer is not None else {}
    clone = copy.deepcopy(model, memo)
    kept = {id(m) for m in tokenizer.modules()} if tokenizer is not None else set()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for module in clone.modules():
            if id(module) not in kept and callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()
    finally:
        torch.random.set_rng_state(generator_state)
    return clone.eval()


def _median_rho(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[float, list[float]]:
    rhos = [spearman(a, b) for a, b in pairs]
    return float(np.median(rhos)), rhos


def model_randomisation(model, explainer: Explainer, cases: Sequence[Case], seed: int = 0) -> CheckResult:
    """Median Spearman rho between the maps of ``model`` and of ``randomized_copy(model, seed)`` over ``cases``;
    passes below ``MAX_RHO``."""
    randomized = randomized_copy(model, seed)
    pairs = [(explainer(model, c.image, c.text, query_image=c.query_image).drops,
              explainer(randomized, c.image, c.text, query_image=c.query_image).drops) for c in cases]
    value, rhos = _median_rho(pairs)
    return CheckResult("model randomisation", value, MAX_RHO, True, value < MAX_RHO,
                       f"median Spearman rho between the trained and a re-initialised encoder's maps over "
                       f"{len(cases)} image(s) (rho: {', '.join(f'{r:.2f}' for r in rhos)})")


def unrelated_text(model, text: str) -> str:
    """Of ``UNRELATED_TEXTS``, the one least similar to ``text`` in ``model``'s text embedding space."""
    with torch.no_grad():
        embedded = model.encode(texts=[text, *UNRELATED_TEXTS]).float()
    return UNRELATED_TEXTS[int(torch.argmin(embedded[1:] @ embedded[0]))]


def text_randomisation(model, explainer: Explainer, cases: Sequence[Case]) -> CheckResult:
    """Median Spearman rho between each case's map and the map for ``unrelated_text`` (as the text, or as the
    instruction fused with the query image) over ``cases``; passes below ``MAX_RHO``."""
    pairs = []
    for c in cases:
        other = unrelated_text(model, c.text)
        pairs.append((explainer(model, c.image, c.text, query_image=c.query_image).drops,
                      explainer(model, c.image, other, query_image=c.query_image).drops))
    value, rhos = _median_rho(pairs)
    return CheckResult("text randomisation", value, MAX_RHO, True, value < MAX_RHO,
                       f"median Spearman rho between the maps for the text and for an unrelated text over "
                       f"{len(cases)} image(s) (rho: {', '.join(f'{r:.2f}' for r in rhos)})")


def planted_cases(n_images: int, seed: int = 0, image_size: int = 256) -> tuple[list[Case], list[np.ndarray]]:
    """(cases, finding masks ``[S, S]`` bool): the first ``n_images`` test images of the demo dataset written with
    ``seed`` (the demo recipe's is 0) with their captions, decoded as the model sees them (and each drawn without
    its finding, ``Case.without``), and where their finding lies."""
    from fuselip_med.data.demo import planted_findings
    from fuselip_med.data.images import DecodeOptions, decode_image

    options = DecodeOptions(image_size=image_size)
    cases, masks = [], []
    for item in planted_findings(n_images, seed=seed):
        cases.append(Case(decode_image(item.jpeg, options), item.caption,
                          without=decode_image(item.jpeg_without, options)))
        masks.append(_resize_mask(item.mask, image_size))
    return cases, masks


def _resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    if mask.shape == (size, size):
        return mask
    from PIL import Image

    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.NEAREST)) > 0


def _touched_cells(mask: np.ndarray, grid: int) -> np.ndarray:
    """[grid, grid] bool: the cells holding at least one finding pixel."""
    cell = mask.shape[0] // grid
    return mask[:cell * grid, :cell * grid].reshape(grid, cell, grid, cell).any(axis=(1, 3))


def finding_gain(model, case: Case) -> float:
    """cos(image, target) - cos(image without its finding, target) for a planted ``case`` (``case.without`` set):
    how much the finding itself raises the model's similarity to the text (target as in ``explain.occlusion``)."""
    from fuselip_med.explain.occlusion import target_embedding

    target = target_embedding(model, case.text, case.query_image)
    device = target.device
    with torch.no_grad():
        images = torch.stack([case.image, case.without]).to(device, torch.float32)
        with_finding, without = model.encode(images=images).float()
    return float((with_finding - without) @ target)


def pointing_game(model, explainer: Explainer, cases: Sequence[Case], masks: Sequence[np.ndarray]) -> CheckResult:
    """Share of ``cases`` whose map's largest-drop cell touches the finding (``masks``); passes when the share is at
    least ``POINTING_MIN_SHARE`` and ``POINTING_MIN_LIFT`` times the random-cell share. When every case carries its
    image ``without`` the finding, the detail also gives ``finding_gain``: in how many images the finding raises the
    similarity, and the median gain."""
    hits, chance = [], []
    for case, mask in zip(cases, masks):
        drops = np.asarray(explainer(model, case.image, case.text, query_image=case.query_image).drops)
        touched = _touched_cells(mask, drops.shape[0])
        row, col = np.unravel_index(int(np.argmax(drops)), drops.shape)
        hits.append(bool(touched[row, col]))
        chance.append(float(touched.mean()))
    share, random_share = float(np.mean(hits)), float(np.mean(chance))
    passed = share >= POINTING_MIN_SHARE and share >= POINTING_MIN_LIFT * random_share
    detail = (f"map maximum on the planted finding in {sum(hits)} of {len(hits)} demo images; a random cell: "
              f"{random_share:.3f} (needs >= {POINTING_MIN_LIFT:g}x that)")
    if cases and all(case.without is not None for case in cases):
        gains = [finding_gain(model, case) for case in cases]
        detail += (f"; the finding raises the similarity in {sum(g > 0 for g in gains)} of {len(gains)} images "
                   f"(median gain {float(np.median(gains)):+.4f})")
    return CheckResult("pointing game", share, POINTING_MIN_SHARE, False, passed, detail)


def run_sanity(model, explainer: Explainer, cases: Sequence[Case], n_planted: int = 16,
               seed: int = 0) -> list[CheckResult]:
    """The three checks: model randomisation (re-initialised with ``seed``) and text randomisation on ``cases``,
    the pointing game on the first ``n_planted`` demo test images (skipped when 0)."""
    results = [model_randomisation(model, explainer, cases, seed=seed), text_randomisation(model, explainer, cases)]
    if n_planted:
        size = cases[0].image.shape[-1] if cases else 256
        planted, masks = planted_cases(n_planted, image_size=size)
        results.append(pointing_game(model, explainer, planted, masks))
    return results
