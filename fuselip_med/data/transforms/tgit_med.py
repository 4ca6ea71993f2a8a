"""Text-guided image transformations for radiology: grayscale sources, instructions a radiologist would give.

Same contract as ``tgit.TGITTransform``; every pool has a fixed size and unique prompts. Sources: an 8-bit
image (made "L") or a 2-D float / signed-int array of HU values, shown in a CT window drawn from ``rng``.
Sides follow the radiological display convention (patient's right = image left); prompts naming a side say
both. Pixel operations: albumentations, and ``images.apply_window`` for windows.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from PIL import Image

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # its import-time PyPI query stalls offline workers
import albumentations as A

from fuselip_med.data.images import apply_window
from fuselip_med.data.transforms.tgit import TGITFamily, TGITTransform
from fuselip_med.vocab import WINDOW_PRESETS

# CT windows offered by name (soft_tissue is the same window as mediastinum, so it is left out).
CT_WINDOWS = ("lung", "mediastinum", "abdomen", "liver", "brain", "bone")
CT_WINDOW_WORDS = {"lung": "lung", "mediastinum": "mediastinal", "abdomen": "abdominal", "liver": "liver",
                   "brain": "brain", "bone": "bone"}
# 8-bit sources: (width, level) as fractions of the 0-255 range.
INTENSITY_WINDOWS = {
    "narrow the window to the dark intensities": (0.5, 0.25),
    "narrow the window to the mid intensities": (0.5, 0.5),
    "narrow the window to the bright intensities": (0.5, 0.75),
    "narrow the window sharply around the mid intensities": (0.25, 0.5),
    "widen the window to lower the contrast": (2.0, 0.5),
}
INVERT_PROMPT = "invert the grayscale"


@dataclass(frozen=True)
class MedicalImage:
    """A prepared source: the 8-bit "L" image shown to the model, and its HU values when it has them."""

    display: Image.Image
    hu: np.ndarray | None = None
    window: str | None = None  # the CT window ``display`` uses (HU sources only)


def is_hu_array(image: Any) -> bool:
    """A 2-D float or signed-integer array is taken as Hounsfield units (8-bit sources are PIL/uint8)."""
    return isinstance(image, np.ndarray) and image.ndim == 2 and image.dtype.kind in "fi"


def _to_uint8(unit: np.ndarray) -> np.ndarray:
    return np.rint(unit * 255.0).astype(np.uint8)


def window_image(hu: np.ndarray, window: str) -> Image.Image:
    """HU values shown in a named CT window: [L - W/2, L + W/2] -> 0..255, clipped."""
    return Image.fromarray(_to_uint8(apply_window(hu, *WINDOW_PRESETS[window])), "L")


def _run(transform: A.BasicTransform, image: Image.Image) -> Image.Image:
    """An albumentations transform on an "L" image (as a 2-D uint8 array)."""
    out = transform(image=np.asarray(image))["image"]
    return Image.fromarray(np.ascontiguousarray(out.reshape(out.shape[:2])), "L")


class MedicalTransform(TGITTransform):
    """Base of the radiology types: ``prepare`` makes a ``MedicalImage`` (drawing an HU source's window)."""

    def prepare(self, image: Any, rng: np.random.Generator) -> MedicalImage:
        if isinstance(image, MedicalImage):
            return image
        if is_hu_array(image):
            hu = np.asarray(image, dtype=np.float32)
            window = CT_WINDOWS[int(rng.integers(len(CT_WINDOWS)))]
            return MedicalImage(window_image(hu, window), hu, window)
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        return MedicalImage(image if image.mode == "L" else image.convert("L"))


class Window(MedicalTransform):
    """Window change ("apply the lung window" for HU sources, ``INTENSITY_WINDOWS`` for 8-bit ones) or inversion."""

    kind = "med_window"
    train_pairs = 3
    eval_pairs = 6

    def sample_params(self, rng, prepared, eval=False):
        if prepared.hu is not None:
            options = [{"window": w} for w in CT_WINDOWS if w != prepared.window]
        else:
            options = [{"intensity_window": prompt} for prompt in INTENSITY_WINDOWS]
        return self._choose(rng, options + [{"invert": True}], eval)

    def apply(self, prepared, params):
        source = prepared.display
        if params.get("invert"):
            return self._pair(INVERT_PROMPT, source, _run(A.InvertImg(p=1.0), source), params)
        if "window" in params:
            target = window_image(prepared.hu, params["window"])
            return self._pair(f"apply the {CT_WINDOW_WORDS[params['window']]} window", source, target, params)
        width, level = INTENSITY_WINDOWS[params["intensity_window"]]
        unit = apply_window(np.asarray(source, dtype=np.float32), width * 255.0, level * 255.0)
        return self._pair(params["intensity_window"], source, Image.fromarray(_to_uint8(unit), "L"), params)


FLIPS = {
    "left-right": "flip left-right (swap the patient's left and right sides)",
    "up-down": "flip up-down (head-foot)",
    "both": "flip both left-right and up-down",
}


class Flip(MedicalTransform):
    """Flips in radiological terms; a left-right flip changes laterality, and the prompt says so."""

    kind = "med_flip"
    train_pairs = 3
    eval_pairs = 3

    def sample_params(self, rng, prepared, eval=False):
        return self._choose(rng, [{"axis": axis} for axis in FLIPS], eval)

    def apply(self, prepared, params):
        target = prepared.display
        if params["axis"] in ("left-right", "both"):
            target = _run(A.HorizontalFlip(p=1.0), target)
        if params["axis"] in ("up-down", "both"):
            target = _run(A.VerticalFlip(p=1.0), target)
        return self._pair(FLIPS[params["axis"]], prepared.display, target, params)


ROTATIONS = [(90, "clockwise"), (180, None), (90, "counter-clockwise")] + [
    (angle, direction) for angle in (5, 10, 15) for direction in ("clockwise", "counter-clockwise")
]


class Rotate(MedicalTransform):
    """Quarter turns (90 cw, 180, 90 ccw = 270 cw; exact) and small tilts of 5/10/15 degrees (bilinear, black
    corners)."""

    kind = "med_rotate"
    train_pairs = 3
    eval_pairs = 9

    def sample_params(self, rng, prepared, eval=False):
        return self._choose(rng, [{"angle": a, "direction": d} for a, d in ROTATIONS], eval)

    def apply(self, prepared, params):
        angle, direction = params["angle"], params["direction"]
        signed = -angle if direction == "clockwise" else angle  # albumentations: positive = counter-clockwise
        rotate = A.Rotate(limit=(signed, signed), interpolation=cv2.INTER_LINEAR,
                          border_mode=cv2.BORDER_CONSTANT, fill=0, p=1.0)
        prompt = f"rotate {angle} degrees" + (f" {direction}" if direction else "")
        return self._pair(prompt, prepared.display, _run(rotate, prepared.display), params)


# region -> (prompt, (x0, y0) of the half-size crop as a fraction of the image)
ZOOM_REGIONS = {
    "right upper": ("zoom into the patient's right upper quadrant (top left of the image)", (0.0, 0.0)),
    "left upper": ("zoom into the patient's left upper quadrant (top right of the image)", (0.5, 0.0)),
    "right lower": ("zoom into the patient's right lower quadrant (bottom left of the image)", (0.0, 0.5)),
    "left lower": ("zoom into the patient's left lower quadrant (bottom right of the image)", (0.5, 0.5)),
    "center": ("zoom into the center of the image", (0.25, 0.25)),
}


class Zoom(MedicalTransform):
    """A half-size crop of a quadrant (named from the patient's side) or the centre, resized back (bicubic)."""

    kind = "med_zoom"
    train_pairs = 5
    eval_pairs = 5

    def sample_params(self, rng, prepared, eval=False):
        return self._choose(rng, [{"region": region} for region in ZOOM_REGIONS], eval)

    def apply(self, prepared, params):
        prompt, (fx, fy) = ZOOM_REGIONS[params["region"]]
        width, height = prepared.display.size
        x0, y0 = round(fx * width), round(fy * height)
        crop = _run(A.Crop(x_min=x0, y_min=y0, x_max=x0 + width // 2, y_max=y0 + height // 2, p=1.0),
                    prepared.display)
        target = _run(A.Resize(height, width, interpolation=cv2.INTER_CUBIC, p=1.0), crop)
        return self._pair(prompt, prepared.display, target, params)


GAMMAS = (0.5, 0.7, 1.5, 2.0)


class Gamma(MedicalTransform):
    """out = in ** gamma on [0, 1]: gamma < 1 brightens (more contrast in the dark range), > 1 darkens."""

    kind = "med_gamma"
    train_pairs = 2
    eval_pairs = 4

    def sample_params(self, rng, prepared, eval=False):
        return self._choose(rng, [{"gamma": g} for g in GAMMAS], eval)

    def apply(self, prepared, params):
        gamma = params["gamma"]
        prompt = f"{'brighten' if gamma < 1 else 'darken'} with gamma {gamma}"
        target = _run(A.RandomGamma(gamma_limit=(gamma * 100, gamma * 100), p=1.0), prepared.display)
        return self._pair(prompt, prepared.display, target, params)


DOWNSAMPLE_SIZES = (32, 64, 128)


class Downsample(MedicalTransform):
    """Resolution loss: area-downsample to N pixels a side, then bilinear back to the original size."""

    kind = "med_downsample"
    train_pairs = 3
    eval_pairs = 3

    def sample_params(self, rng, prepared, eval=False):
        return self._choose(rng, [{"size": s} for s in DOWNSAMPLE_SIZES], eval)

    def apply(self, prepared, params):
        scale = params["size"] / max(prepared.display.size)
        downscale = A.Downscale(scale_range=(scale, scale), p=1.0,
                                interpolation_pair={"downscale": cv2.INTER_AREA, "upscale": cv2.INTER_LINEAR})
        prompt = f"downsample to {params['size']} pixels then back"
        return self._pair(prompt, prepared.display, _run(downscale, prepared.display), params)


NOISE_SIGMAS = (0.05, 0.1)
BLUR_SIGMAS = (1, 2)


class NoiseBlur(MedicalTransform):
    """Gaussian noise (sigma as a fraction of the intensity range; the noise seed is a parameter) or blur."""

    kind = "med_noise_blur"
    train_pairs = 2
    eval_pairs = 4

    def sample_params(self, rng, prepared, eval=False):
        options = [{"noise": s} for s in NOISE_SIGMAS] + [{"blur": s} for s in BLUR_SIGMAS]
        chosen = self._choose(rng, options, eval)
        for params in chosen:
            if "noise" in params:
                params["noise_seed"] = int(rng.integers(2**31))
        return chosen

    def apply(self, prepared, params):
        if "noise" in params:
            sigma = params["noise"]
            noise = A.GaussNoise(std_range=(sigma, sigma), mean_range=(0.0, 0.0), per_channel=False, p=1.0)
            noise.set_random_seed(params["noise_seed"])
            return self._pair(f"add gaussian noise sigma {sigma}", prepared.display,
                              _run(noise, prepared.display), params)
        sigma = params["blur"]
        blur = A.GaussianBlur(blur_limit=0, sigma_limit=(sigma, sigma), p=1.0)
        return self._pair(f"blur with sigma {sigma}", prepared.display, _run(blur, prepared.display), params)


def medical_transforms() -> tuple[TGITTransform, ...]:
    """TGIT-med's seven radiology transforms (window, flip, rotate, zoom, gamma, downsample, noise/blur)."""
    return (Window(), Flip(), Rotate(), Zoom(), Gamma(), Downsample(), NoiseBlur())


MEDICAL = TGITFamily("tgit_med", medical_transforms())
