"""Text-guided image transformations (TGIT), the FuseLIP paper's set ("cc3m-aug", reference-facts §4.4, §6.2).

A pair is left = (prompt, source image), right = ("", transformed image); the sibling pairs of one type and
one image are hard negatives. Prompts are the reference's verbatim; pixel operations are Pillow's, as the
reference runs them (crop + bicubic resize, rotate NEAREST with black fill, ImageEnhance, luma "L").
``rng`` is a ``numpy.random.Generator``: the same state gives the same pairs.
"""
from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from PIL import Image, ImageEnhance


@dataclass(frozen=True)
class TGITPair:
    """One instruction pair: left = (prompt, source_image), right = ("", target_image)."""

    prompt: str
    source_image: Any  # PIL image (the medical set's HU sources are displayed before they get here)
    target_image: Any
    kind: str
    params: dict[str, Any] = field(default_factory=dict)


class TGITTransform(ABC):
    """A transformation type: ``sample_params`` draws distinct variants, ``apply`` renders one ``TGITPair``.

    ``weight`` is the sampling weight before division by ``train_pairs``; ``prepare`` draws from rng first."""

    kind: ClassVar[str]
    weight: ClassVar[float] = 1.0
    train_pairs: ClassVar[int]
    eval_pairs: ClassVar[int]

    def n_pairs(self, eval: bool = False) -> int:
        return self.eval_pairs if eval else self.train_pairs

    def prepare(self, image: Any, rng: np.random.Generator) -> Any:
        return image

    @abstractmethod
    def sample_params(self, rng: np.random.Generator, prepared: Any, eval: bool = False) -> list[dict[str, Any]]:
        """The distinct variants' parameters (``eval=True``: the whole evaluation pool, query first)."""

    @abstractmethod
    def apply(self, prepared: Any, params: dict[str, Any]) -> TGITPair:
        """Render one pair from the prepared source image and one variant's parameters."""

    def variants(self, image: Any, rng: np.random.Generator, *, eval: bool = False) -> list[TGITPair]:
        """The sibling pairs of one item (``eval=True``: the evaluation pool, query first)."""
        prepared = self.prepare(image, rng)
        return [self.apply(prepared, params) for params in self.sample_params(rng, prepared, eval)]

    def eval_pool(self, image: Any, rng: np.random.Generator) -> list[TGITPair]:
        return self.variants(image, rng, eval=True)

    def _pair(self, prompt: str, source: Any, target: Any, params: dict[str, Any]) -> TGITPair:
        return TGITPair(prompt, source, target, self.kind, dict(params))

    def _choose(self, rng: np.random.Generator, options: Sequence[dict[str, Any]], eval: bool) -> list[dict[str, Any]]:
        """The first ``n_pairs(eval)`` of a random permutation of ``options`` (distinct variants)."""
        return [dict(options[i]) for i in rng.permutation(len(options))[: self.n_pairs(eval)]]


class PaperTransform(TGITTransform):
    """The paper's types take a 256x256 RGB PIL image; another mode is converted to RGB first."""

    def prepare(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        return image if image.mode == "RGB" else image.convert("RGB")


# ---------------------------------------------------------------------------------------------------------
# The five reference types, in the reference's table order (weights 2, 1, 1, 2, 1).

CROP_LOCATIONS = (
    "upper left", "upper center", "upper right",
    "center left", "center center", "center right",
    "lower left", "lower center", "lower right",
)
ROTATION_ANGLES = (10, 20, 30, 40, 50, 60, 70, 80, 90)
ROTATION_DIRECTIONS = ("clockwise", "counter-clockwise")
JITTER_ATTRIBUTES = (("brightness", ImageEnhance.Brightness), ("contrast", ImageEnhance.Contrast),
                     ("saturation", ImageEnhance.Color))


class RandomCrop(PaperTransform):
    """"crop to {upper|center|lower} {left|center|right}": a c x c crop, c = min(W//2, 256, W, H), resized back."""

    kind = "randomcrop"
    weight = 2
    train_pairs = 9
    eval_pairs = 9

    def __init__(self, output_size: int = 256):
        self.output_size = output_size

    def sample_params(self, rng, prepared, eval=False):
        return self._choose(rng, [{"location": loc} for loc in CROP_LOCATIONS], eval)

    def apply(self, prepared, params):
        width, height = prepared.size
        side = min(width // 2, 256, width, height)
        vertical, horizontal = params["location"].split()
        top = {"upper": 0, "center": (height - side) // 2, "lower": height - side}[vertical]
        left = {"left": 0, "center": (width - side) // 2, "right": width - side}[horizontal]
        target = prepared.crop((left, top, left + side, top + side))
        target = target.resize((self.output_size, self.output_size), Image.BICUBIC)
        return self._pair(f"crop to {params['location']}", prepared, target, params)


class Rotate(PaperTransform):
    """"rotate {a} degrees {clockwise|counter-clockwise}": Pillow rotate, NEAREST, same size, black corners."""

    kind = "rotate"
    weight = 1
    train_pairs = 3
    eval_pairs = 18

    def sample_params(self, rng, prepared, eval=False):
        options = itertools.product(ROTATION_ANGLES, ROTATION_DIRECTIONS)
        return self._choose(rng, [{"angle": a, "direction": d} for a, d in options], eval)

    def apply(self, prepared, params):
        angle, direction = params["angle"], params["direction"]
        signed = -angle if direction == "clockwise" else angle  # Pillow: positive = counter-clockwise
        target = prepared.rotate(signed, resample=Image.NEAREST, expand=False, fillcolor=0)
        return self._pair(f"rotate {angle} degrees {direction}", prepared, target, params)


def jitter_factor(rng: np.random.Generator) -> float:
    """round(U(0.3, 2.0), 1), with 1.0 (no change) replaced by 1.1, as in the reference."""
    factor = round(float(rng.uniform(0.3, 2.0)), 1)
    return 1.1 if factor == 1.0 else factor


class ColorJitterV2(PaperTransform):
    """Brightness -> contrast -> saturation (ImageEnhance.Color); a draw repeating an earlier prompt of the same
    item is drawn again, so pool prompts are unique (the reference allows a rare repeat)."""

    kind = "colorjitterv2"
    weight = 1
    train_pairs = 3
    eval_pairs = 10

    def sample_params(self, rng, prepared, eval=False):
        drawn: dict[tuple[float, ...], dict[str, float]] = {}
        while len(drawn) < self.n_pairs(eval):
            params = {name: jitter_factor(rng) for name, _ in JITTER_ATTRIBUTES}
            drawn.setdefault(tuple(params.values()), params)
        return list(drawn.values())

    def apply(self, prepared, params):
        target = prepared
        phrases = []
        for name, enhancer in JITTER_ATTRIBUTES:
            factor = params[name]
            phrases.append(f"{'increase' if factor > 1 else 'decrease'} {name} by factor {factor}")
            target = enhancer(target).enhance(factor)
        return self._pair(" and ".join(phrases), prepared, target, params)


FLIP_PROMPTS = {"horizontal": "horizontal flip", "vertical": "vertical flip",
                "both": "horizontal and vertical flip"}


class Flip(PaperTransform):
    """Training: both flips in random order, each (orig -> flipped) then (flipped -> orig), as the reference. Eval:
    "unique" (default; orig -> h / v / both, all distinct) or "reference" (the paper's pool, original twice)."""

    kind = "flip"
    weight = 2
    train_pairs = 4

    def __init__(self, eval_mode: str = "unique"):
        if eval_mode not in ("unique", "reference"):
            raise ValueError(f"Flip eval_mode must be 'unique' or 'reference', got {eval_mode!r}.")
        self.eval_mode = eval_mode

    @property
    def eval_pairs(self) -> int:  # type: ignore[override]
        return 3 if self.eval_mode == "unique" else 4

    def sample_params(self, rng, prepared, eval=False):
        if eval and self.eval_mode == "unique":
            return self._choose(rng, [{"axis": axis, "inverse": False} for axis in FLIP_PROMPTS], eval)
        axes = [("horizontal", "vertical")[i] for i in rng.permutation(2)]
        return [{"axis": axis, "inverse": inverse} for axis in axes for inverse in (False, True)]

    def apply(self, prepared, params):
        flipped = prepared
        if params["axis"] in ("horizontal", "both"):
            flipped = flipped.transpose(Image.FLIP_LEFT_RIGHT)
        if params["axis"] in ("vertical", "both"):
            flipped = flipped.transpose(Image.FLIP_TOP_BOTTOM)
        source, target = (flipped, prepared) if params["inverse"] else (prepared, flipped)
        return self._pair(FLIP_PROMPTS[params["axis"]], source, target, params)


def grayscale_rgb(image: Image.Image) -> Image.Image:
    """Luma ("L") replicated to three channels, like torchvision's to_grayscale(num_output_channels=3)."""
    return image.convert("L").convert("RGB")


class ColorizeGrayscale(PaperTransform):
    """"grayscale": color -> gray and "colorize": gray -> color, both built from the original, in random order."""

    kind = "colorize_grayscale"
    weight = 1
    train_pairs = 2
    eval_pairs = 2

    def sample_params(self, rng, prepared, eval=False):
        return self._choose(rng, [{"direction": d} for d in ("colorize", "grayscale")], eval)

    def apply(self, prepared, params):
        gray = grayscale_rgb(prepared)
        if params["direction"] == "grayscale":
            return self._pair("grayscale", prepared, gray, params)
        return self._pair("colorize", gray, prepared, params)


# ---------------------------------------------------------------------------------------------------------
# A family: the set of types one task samples from, with the reference's sampling arithmetic.


@dataclass(frozen=True)
class TGITFamily:
    """Ordered transformation types, sampled as the reference: P(type) proportional to weight / train_pairs."""

    name: str
    transforms: tuple[TGITTransform, ...]

    def __post_init__(self):
        kinds = [t.kind for t in self.transforms]
        if not kinds or len(set(kinds)) != len(kinds):
            raise ValueError(f"TGIT family {self.name!r} needs distinct transform kinds, got {kinds}.")

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(t.kind for t in self.transforms)

    def __getitem__(self, kind: str) -> TGITTransform:
        for transform in self.transforms:
            if transform.kind == kind:
                return transform
        raise KeyError(f"TGIT family {self.name!r} has no kind {kind!r}; it has {', '.join(self.kinds)}.")

    def subset(self, kinds: Iterable[str]) -> TGITFamily:
        """The same family restricted to ``kinds`` (kept in family order)."""
        wanted = list(kinds)
        for kind in wanted:
            self[kind]
        return TGITFamily(self.name, tuple(t for t in self.transforms if t.kind in wanted))

    def probabilities(self) -> np.ndarray:
        raw = np.array([t.weight / t.train_pairs for t in self.transforms], dtype=np.float64)
        return raw / raw.sum()

    def mean_pairs(self) -> float:
        return float(np.dot(self.probabilities(), [t.train_pairs for t in self.transforms]))

    def identity_probability(self, identity_fraction: float) -> float:
        """P(identity item) = u*m / (1 + u*(m-1)), so that a fraction u of all *pairs* is identity."""
        u, m = identity_fraction, self.mean_pairs()
        return u * m / (1 + u * (m - 1))

    def eval_pools(self, image: Any, rng: np.random.Generator,
                   kinds: Iterable[str] | None = None) -> dict[str, list[TGITPair]]:
        """kind -> evaluation pool for ``image`` (first pair = the query and its correct target)."""
        chosen = self.kinds if kinds is None else tuple(kinds)
        return {kind: self[kind].eval_pool(image, rng) for kind in chosen}


def paper_transforms(flip_eval: str = "unique") -> tuple[TGITTransform, ...]:
    """The paper's five TGIT transforms (crop, rotate, colour jitter, flip, colourise; reference-facts §4.4) in the
    reference's order; ``flip_eval`` is ``Flip``'s evaluation mode."""
    return (RandomCrop(), Rotate(), ColorJitterV2(), Flip(eval_mode=flip_eval), ColorizeGrayscale())


PAPER = TGITFamily("tgit", paper_transforms())
