"""A small synthetic radiology dataset in the official ROCOv2 layout (captions state modality, region and a
finding's kind, size and side, all visible in the image), plus a few real DICOMs from pydicom's test data."""
from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import math
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from fuselip_med.errors import InputError, OutputExistsError
from fuselip_med.io import atomic_directory
from fuselip_med.vocab import MODALITY_CUIS, ROCOV2_MANUAL_CUI_NAMES

__all__ = ["DEMO_DICOM_FILES", "DicomEntry", "PlantedFinding", "Study", "demo_dataset_path", "demo_split_counts",
           "planted_findings", "render_study", "write_demo_dataset"]

DEMO_FORMAT_VERSION = 1
MARKER_NAME = ".fuselip_med_demo.json"
SIZE = 256

REGION_CUIS = {"chest": "C0817096", "abdomen": "C0000726", "head": "C0037303", "knee": "C0023216",
               "pelvis": "C0030797"}
DIRECTION_CUIS = {"PA": "C1996865", "AP": "C1999039"}
FINDING_CUIS = {"nodule": "C0034079", "mass": "C0577559", "cyst": "C0010709", "hemorrhage": "C0019080",
                "effusion": "C0032227", "fracture": "C0016658"}
FINDING_NAMES = {"nodule": "Lung nodule", "mass": "Mass of body structure", "cyst": "Cyst", "hemorrhage": "Hemorrhage",
                 "effusion": "Pleural effusion", "fracture": "Fracture"}

# (modality, region) -> findings it may show; the modality is drawn first (uniformly), then region and finding.
STUDIES: dict[str, dict[str, tuple[str, ...]]] = {
    "X-ray": {"chest": ("nodule", "mass", "effusion"), "knee": ("fracture",), "head": ("fracture",)},
    "CT": {"chest": ("nodule", "mass", "effusion"), "abdomen": ("mass", "cyst"), "head": ("hemorrhage", "mass")},
    "MRI": {"head": ("mass", "cyst"), "knee": ("cyst",), "abdomen": ("mass", "cyst")},
    "ultrasound": {"abdomen": ("cyst", "mass"), "pelvis": ("cyst", "mass")},
}

# cui_mapping.csv: the demo's manual concepts (modality, region, direction) by their ROCOv2 names, and findings.
CUI_NAMES = {
    **{cui: ROCOV2_MANUAL_CUI_NAMES[cui] for cui in (*(MODALITY_CUIS[m] for m in STUDIES), *REGION_CUIS.values(),
                                                     *DIRECTION_CUIS.values())},
    **{FINDING_CUIS[finding]: name for finding, name in FINDING_NAMES.items()},
}

MM_PER_PIXEL = {"chest": 1.5, "abdomen": 1.5, "pelvis": 1.2, "head": 0.9, "knee": 0.6}
# Finding extent in pixels (blob radius; effusion depth; fracture gap) for the small and large classes.
EXTENT_PX = {
    "nodule": ((2.5, 4.5), (7.0, 9.5)),
    "mass": ((9.0, 11.0), (14.0, 20.0)),
    "cyst": ((3.5, 6.0), (10.0, 15.0)),
    "hemorrhage": ((4.5, 7.0), (12.0, 17.0)),
    "effusion": ((10.0, 18.0), (32.0, 46.0)),
    "fracture": ((1.5, 2.5), (6.0, 10.0)),
}


class DicomEntry(NamedTuple):
    """One real DICOM file of pydicom's test data in the demo dataset: where it goes and its caption."""

    file: str  # a file name in pydicom/data/test_files
    modality: str
    region: str | None
    split: str
    caption: str


# Real DICOM files shipped inside pydicom, in the order n_dicom takes them (they decode with pydicom, its RLE
# decoder and pylibjpeg-openjpeg: uncompressed, RLE, JPEG 2000 lossless and lossy).
DEMO_DICOM_FILES: tuple[DicomEntry, ...] = (
    DicomEntry("CT_small.dcm", "CT", "chest", "train",
               "Axial CT image of the chest at the level of a thoracic vertebra."),
    DicomEntry("examples_overlay.dcm", "MRI", "abdomen", "test",
               "Axial T1-weighted MRI of the upper abdomen showing a lesion in the liver."),
    DicomEntry("MR_small.dcm", "MRI", None, "train", "Small MRI slice, downsized from a clinical MR image."),
    DicomEntry("693_J2KI.dcm", "CT", "head", "test", "Axial non-contrast CT of the head."),
    DicomEntry("J2K_pixelrep_mismatch.dcm", "CT", "head", "train",
               "Axial CT of the head at the level of the skull base."),
    DicomEntry("MR_small_RLE.dcm", "MRI", None, "train",
               "Small MRI slice, downsized from a clinical MR image (RLE compressed)."),
)


# ----------------------------------------------------------------------------------------- study specs


@dataclass(frozen=True)
class Study:
    """One synthetic image: what it shows (and its caption says) and how large the finding is drawn."""

    modality: str
    region: str
    finding: str
    side: str  # patient side: "right" or "left" (right appears on the image's left)
    vertical: str  # "upper" or "lower"
    large: bool
    extent_px: float
    mm: int
    variant: int  # phrasing variant


def _draw_study(rng: np.random.Generator) -> Study:
    modality = list(STUDIES)[rng.integers(len(STUDIES))]
    regions = STUDIES[modality]
    region = list(regions)[rng.integers(len(regions))]
    finding = regions[region][rng.integers(len(regions[region]))]
    side = ("right", "left")[rng.integers(2)]
    vertical = "lower" if finding == "effusion" else ("upper", "lower")[rng.integers(2)]
    large = bool(rng.integers(2))
    low, high = EXTENT_PX[finding][int(large)]
    extent = float(rng.uniform(low, high))
    scale = MM_PER_PIXEL[region] if finding in ("effusion", "fracture") else 2 * MM_PER_PIXEL[region]
    mm = max(1, round(extent * scale))
    return Study(modality, region, finding, side, vertical, large, extent, mm, int(rng.integers(4)))


_VERBS = ("showing", "demonstrating", "with", "revealing")
_SUFFIXES = (".", ".", " (arrow).", ", with no other abnormality.")


def _finding_words(s: Study) -> str:
    """How the caption names the finding: with the appearance words radiologists use for that modality."""
    if s.modality == "ultrasound":
        return {"mass": "hyperechoic mass", "cyst": "anechoic cyst"}[s.finding]
    if s.finding == "mass" and s.modality != "X-ray":
        return "mass with surrounding edema" if (s.modality, s.region) == ("CT", "head") else "enhancing mass"
    return {("CT", "cyst"): "hypodense cyst", ("CT", "hemorrhage"): "hyperdense hemorrhage"}.get(
        (s.modality, s.finding), s.finding)


def _caption(s: Study) -> str:
    size = "large" if s.large else "small"
    verb = _VERBS[s.variant]
    suffix = _SUFFIXES[s.variant]
    words = _finding_words(s)
    lobe = {"upper": "frontal", "lower": "occipital"}[s.vertical]
    if s.finding == "effusion":
        study = "PA chest radiograph" if s.modality == "X-ray" else "Axial CT of the chest"
        return f"{study} {verb} a {size} {s.mm} mm {s.side} pleural effusion{suffix}"
    if s.finding == "fracture":
        kind = f"{size} {s.mm} mm {'displaced' if s.large else 'non-displaced'} fracture"
        if s.region == "knee":
            bone = {"upper": "distal femur", "lower": "proximal tibia"}[s.vertical]
            return f"AP radiograph of the {s.side} knee {verb} a {kind} of the {bone}{suffix}"
        bone = {"upper": "parietal", "lower": "temporal"}[s.vertical]
        return f"AP skull radiograph {verb} a {kind} of the {s.side} {bone} bone{suffix}"
    where = {
        "chest": f"in the {s.side} {s.vertical} lobe",
        "abdomen": f"in the {s.side} {s.vertical} quadrant",
        "pelvis": f"in the {s.side} {s.vertical} pelvis",
        "head": f"in the {s.side} {lobe} lobe",
        "knee": f"in the {'distal femur' if s.vertical == 'upper' else 'proximal tibia'}",
    }[s.region]
    study = {
        ("X-ray", "chest"): "PA chest radiograph",
        ("CT", "chest"): "Axial CT of the chest",
        ("CT", "abdomen"): "Axial contrast-enhanced CT of the abdomen",
        ("CT", "head"): "Axial non-contrast CT of the head",
        ("MRI", "head"): "Axial T1-weighted MRI of the brain",
        ("MRI", "knee"): f"Coronal T1-weighted MRI of the {s.side} knee",
        ("MRI", "abdomen"): "Axial T1-weighted MRI of the abdomen",
        ("ultrasound", "abdomen"): "Abdominal ultrasound",
        ("ultrasound", "pelvis"): "Pelvic ultrasound",
    }[(s.modality, s.region)]
    if s.variant == 3 and (s.modality, s.finding) == ("ultrasound", "cyst"):
        suffix = ", consistent with a \u201csimple\u201d cyst."
    return f"{study} {verb} a {size} {s.mm} mm {words} {where}{suffix}"


def _concepts(s: Study) -> tuple[list[str], list[str]]:
    """(all concepts, manual concepts): manual = modality (+ region and direction for X-rays), as in ROCOv2."""
    manual = [MODALITY_CUIS[s.modality]]
    if s.modality == "X-ray":
        manual += [REGION_CUIS[s.region], DIRECTION_CUIS["PA" if s.region == "chest" else "AP"]]
        return manual + [FINDING_CUIS[s.finding]], manual
    return manual + [REGION_CUIS[s.region], FINDING_CUIS[s.finding]], manual


# ----------------------------------------------------------------------------------------------- drawing

_Y, _X = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
_FREQ = np.fft.fftfreq(SIZE).astype(np.float32)
_RFREQ = np.fft.rfftfreq(SIZE).astype(np.float32)


def _blur(a: np.ndarray, sigma_y: float, sigma_x: float | None = None) -> np.ndarray:
    """Gaussian blur through the FFT (periodic edges; the drawings keep away from them)."""
    sigma_x = sigma_y if sigma_x is None else sigma_x
    gy = np.exp(-2 * (math.pi * sigma_y * _FREQ) ** 2)
    gx = np.exp(-2 * (math.pi * sigma_x * _RFREQ) ** 2)
    return np.fft.irfft2(np.fft.rfft2(a) * gy[:, None] * gx[None, :], s=a.shape).astype(np.float32)


def _noise(rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Smooth Gaussian noise with unit standard deviation and correlation length ``sigma`` pixels."""
    n = _blur(rng.standard_normal((SIZE, SIZE)).astype(np.float32), sigma)
    return n / (n.std() + 1e-6)


def _ellipse(cx: float, cy: float, rx: float, ry: float, soft: float = 1.0, wobble: tuple = (),
             x: np.ndarray | None = None) -> np.ndarray:
    """Soft ellipse mask, its radius wobbling with the angle (``wobble`` = ((k, amplitude, phase), ...)); ``x``
    replaces the column coordinates (to shift image parts), else only the bounding box is computed."""
    out = np.zeros((SIZE, SIZE), np.float32)
    grow = 1 + sum(abs(a) for _, a, _ in wobble)
    pad = soft + 2
    y0, y1 = max(int(cy - ry * grow - pad), 0), min(int(cy + ry * grow + pad) + 1, SIZE)
    if x is None:
        x0, x1 = max(int(cx - rx * grow - pad), 0), min(int(cx + rx * grow + pad) + 1, SIZE)
        xs = _X[y0:y1, x0:x1]
    else:
        x0, x1 = 0, SIZE
        xs = x[y0:y1]
    if y0 >= y1 or x0 >= x1:
        return out
    dx, dy = (xs - cx) / rx, (_Y[y0:y1, x0:x1] - cy) / ry
    d = np.sqrt(dx * dx + dy * dy)
    if wobble:
        theta = np.arctan2(dy, dx)
        d = d / (1 + sum(a * np.sin(k * theta + p) for k, a, p in wobble))
    out[y0:y1, x0:x1] = np.clip((1 - d) * min(rx, ry) / soft + 0.5, 0, 1)
    return out


def _band(x0: float, y0: float, angle: float, half_width: float) -> np.ndarray:
    """Soft mask of a straight band through (x0, y0) running at ``angle`` (radians from the image's x axis)."""
    dist = np.abs((_X - x0) * math.sin(angle) - (_Y - y0) * math.cos(angle))
    return np.clip(half_width - dist + 0.5, 0, 1)


def _columns(half_width: np.ndarray | float, x: np.ndarray, cx: float = 128.0) -> np.ndarray:
    """Soft mask of a vertical strip of (row-dependent) half width around column ``cx``."""
    return np.clip(half_width - np.abs(x - cx) + 0.5, 0, 1)


def _paint(img: np.ndarray, mask: np.ndarray, value: float | np.ndarray) -> np.ndarray:
    return img * (1 - mask) + value * mask


def _lobes(rng: np.random.Generator, amount: float) -> tuple:
    return tuple((k, amount * float(rng.uniform(0.5, 1.0)), float(rng.uniform(0, 2 * math.pi))) for k in (3, 5))


_GLYPHS = {"R": ("1110", "1001", "1001", "1110", "1010", "1001", "1001"),
           "L": ("1000", "1000", "1000", "1000", "1000", "1000", "1111")}


def _marker(img: np.ndarray, letter: str, x0: int = 10, y0: int = 10, scale: int = 3) -> np.ndarray:
    """A radiographic side marker (R/L) burned into the corner, as on real radiographs."""
    glyph = np.array([[c == "1" for c in row] for row in _GLYPHS[letter]], dtype=np.float32)
    big = np.kron(glyph, np.ones((scale, scale), np.float32))
    h, w = big.shape
    img[y0:y0 + h, x0:x0 + w] = np.maximum(img[y0:y0 + h, x0:x0 + w], big)
    return img


def _side_x(side: str, offset: float) -> float:
    """Image column ``offset`` pixels off the midline on the patient's ``side`` (patient right = image left)."""
    return SIZE / 2 + (-offset if side == "right" else offset)


def _image_x(s: Study, offset: float) -> float:
    return _side_x(s.side, offset)


def _jitter(rng: np.random.Generator, amount: float = 7.0) -> float:
    return float(rng.uniform(-amount, amount))


def _blob(rng: np.random.Generator, s: Study, cx: float, cy: float) -> np.ndarray:
    lobulated = s.finding == "mass"
    return _ellipse(cx, cy, s.extent_px, s.extent_px * float(rng.uniform(0.85, 1.0)), soft=1.2,
                    wobble=_lobes(rng, 0.12) if lobulated else ())


def _ct_grain(rng: np.random.Generator, img: np.ndarray, support: np.ndarray) -> np.ndarray:
    grain = _blur(rng.standard_normal((SIZE, SIZE)).astype(np.float32), 0.6) * 0.06
    return img + grain * np.clip(support, 0.1, 1)


def _mri_finish(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    img = _blur(img, 1.1)
    bias = 1 + 0.12 * (_X - 128) / 128 * float(rng.choice((-1, 1))) - 0.08 * (_Y - 128) / 128
    img = img * bias
    sigma = 0.025
    n1 = rng.standard_normal((SIZE, SIZE)).astype(np.float32) * sigma
    n2 = rng.standard_normal((SIZE, SIZE)).astype(np.float32) * sigma
    return np.sqrt((img + n1) ** 2 + n2 ** 2)  # Rician background, as in magnitude images


def _ct_table(img: np.ndarray, top: float) -> np.ndarray:
    curve = top + 6 * ((_X - 128) / 115) ** 2
    table = np.clip(2.5 - np.abs(_Y - curve) + 0.5, 0, 1) * (np.abs(_X - 128) < 118)
    return _paint(img, table, 0.6)


def _xray_chest(rng, s: Study) -> np.ndarray:
    img = np.full((SIZE, SIZE), 0.04, np.float32)
    img = _paint(img, np.maximum(_ellipse(128, 150, 110, 118), _ellipse(128, 62, 122, 40, 6.0)), 0.42)
    lung_cy, lung_ry, lung_rx = 122 + _jitter(rng, 4), 72.0, 37.0
    lungs = {side: _ellipse(_side_x(side, 50), lung_cy, lung_rx, lung_ry, 2.0) for side in ("right", "left")}
    img = _paint(img, np.maximum(*lungs.values()), 0.15 + 0.03 * _noise(rng, 3.0))
    img = _paint(img, _ellipse(141, 176, 42, 33, 2.0), 0.46)  # heart, to the patient's left
    img = _paint(img, (np.abs(_X - 128) < 15) * (_Y > 40) * (_Y < 190), 0.5)  # mediastinum
    img = img + 0.25 * np.clip(8 - np.abs(_X - 128), 0, 1) * (_Y > 30)  # spine
    for k in range(8):  # posterior ribs
        curve = 64 + 15 * k + 20 * ((_X - 128) / 100) ** 2
        img = img + 0.18 * np.clip(2.5 - np.abs(_Y - curve), 0, 1) * (np.abs(_X - 128) > 12) * (np.abs(_X - 128) < 98)
    for sign in (-1, 1):  # clavicles
        img = img + 0.25 * _band(128 + sign * 40, 64, sign * 0.22, 3.0) * (np.abs(_X - 128 - sign * 40) < 40)
    lung = lungs[s.side]
    cx = _image_x(s, 50) + _jitter(rng, 6)
    if s.finding == "effusion":
        bottom = lung_cy + lung_ry
        lateral = np.clip((_X - cx) * (-1 if s.side == "right" else 1) / lung_rx, 0, 1)
        fluid = lung * np.clip(_Y - (bottom - s.extent_px - 14 * lateral) + 0.5, 0, 1)
        img = _paint(img, fluid, 0.5)
    else:
        cy = (95 if s.vertical == "upper" else 150) + _jitter(rng)
        img = img + 0.4 * _blob(rng, s, cx, cy)
    img = _marker(_blur(img, 0.8), "R")
    return img + rng.standard_normal((SIZE, SIZE)).astype(np.float32) * 0.015


def _ct_chest(rng, s: Study) -> np.ndarray:
    img = np.zeros((SIZE, SIZE), np.float32)
    body = _ellipse(128, 125, 108, 80, 1.5)
    img = _paint(img, body, 0.33)
    img = _paint(img, _ellipse(128, 125, 98, 71, 1.5), 0.5)
    lung_cy, lung_ry = 118.0, 52.0
    lungs = {side: _ellipse(_side_x(side, 50), lung_cy, 38, lung_ry, 1.0, wobble=_lobes(rng, 0.04))
             for side in ("right", "left")}
    vessels = np.clip(_noise(rng, 1.2) - 1.8, 0, 1) * 0.4
    img = _paint(img, np.maximum(*lungs.values()), 0.05 + vessels)
    img = _paint(img, _ellipse(128, 112, 24, 36, 1.5), 0.55)  # mediastinum
    img = _paint(img, _ellipse(142, 96, 10, 10), 0.64)  # aorta
    img = _paint(img, _ellipse(128, 178, 14, 13), 0.92)  # vertebral body
    img = _paint(img, _ellipse(128, 197, 6, 5), 0.35)  # spinal canal
    img = _ct_table(img, 214)
    lung = lungs[s.side]
    cx = _image_x(s, 50) + _jitter(rng, 6)
    if s.finding == "effusion":
        img = _paint(img, lung * np.clip(_Y - (lung_cy + lung_ry - s.extent_px) + 0.5, 0, 1), 0.42)
    else:
        cy = (98 if s.vertical == "upper" else 140) + _jitter(rng, 5)
        img = _paint(img, _blob(rng, s, cx, cy), 0.56)
    return _ct_grain(rng, img, body)


def _abdomen_layout(rng, img: np.ndarray, values: dict[str, float]) -> np.ndarray:
    img = _paint(img, _ellipse(88, 112, 52, 46, 1.5, wobble=_lobes(rng, 0.05)), values["liver"])
    img = _paint(img, _ellipse(188, 112, 22, 32, 1.5), values["spleen"])
    for x in (96, 160):
        img = _paint(img, _ellipse(x, 160, 13, 20, 1.0), values["kidney"])
    img = _paint(img, _ellipse(138, 158, 8, 8), values["aorta"])
    img = _paint(img, _ellipse(128, 186, 15, 13), values["spine"])
    for _ in range(int(rng.integers(4, 8))):  # bowel loops
        cx, cy = float(rng.uniform(110, 180)), float(rng.uniform(85, 140))
        img = _paint(img, _ellipse(cx, cy, float(rng.uniform(4, 8)), float(rng.uniform(4, 8))),
                     values["bowel"][int(rng.integers(len(values["bowel"])))])
    return img


def _quadrant_center(rng, s: Study, dx: float = 45, upper: float = 105, lower: float = 165) -> tuple[float, float]:
    return _image_x(s, dx) + _jitter(rng), (upper if s.vertical == "upper" else lower) + _jitter(rng)


def _ct_abdomen(rng, s: Study) -> np.ndarray:
    img = np.zeros((SIZE, SIZE), np.float32)
    body = _ellipse(128, 128, 112, 86, 1.5)
    img = _paint(img, body, 0.33)
    img = _paint(img, _ellipse(128, 128, 101, 76, 1.5), 0.46)
    img = _abdomen_layout(rng, img, {"liver": 0.6, "spleen": 0.57, "kidney": 0.7, "aorta": 0.74, "spine": 0.92,
                                     "bowel": (0.03, 0.8, 0.5)})
    img = _ct_table(img, 220)
    cx, cy = _quadrant_center(rng, s)
    if s.finding == "cyst":
        img = _paint(img, _blob(rng, s, cx, cy), 0.3)
    else:
        img = _paint(img, _blob(rng, s, cx, cy), 0.8 + 0.04 * _noise(rng, 2.0))
    return _ct_grain(rng, img, body)


def _head_center(rng, s: Study) -> tuple[float, float]:
    return _image_x(s, 36) + _jitter(rng, 6), (80 if s.vertical == "upper" else 176) + _jitter(rng, 6)


def _ct_head(rng, s: Study) -> np.ndarray:
    img = np.zeros((SIZE, SIZE), np.float32)
    img = _paint(img, _ellipse(128, 128, 93, 109, 1.5), 0.45)  # scalp
    img = _paint(img, _ellipse(128, 128, 88, 104, 1.0), 0.95)  # skull
    head = _ellipse(128, 128, 80, 96, 1.0)
    img = _paint(img, head, 0.53)
    img = _paint(img, _ellipse(128, 128, 60, 74, 3.0, wobble=_lobes(rng, 0.05)), 0.47)  # white matter
    for x in (119, 137):
        img = _paint(img, _ellipse(x, 122, 6, 18), 0.18)  # lateral ventricles
    img = _paint(img, _band(128, 128, math.pi / 2, 0.8) * head, 0.62)  # falx
    cx, cy = _head_center(rng, s)
    blob = _blob(rng, s, cx, cy)
    if s.finding == "mass":
        img = _paint(img, _ellipse(cx, cy, s.extent_px * 1.6, s.extent_px * 1.5, 3.0), 0.4)  # edema
        img = _paint(img, blob, 0.66)
    else:
        img = _paint(img, blob, 0.85)
    return _ct_grain(rng, img, head)


def _mri_head(rng, s: Study) -> np.ndarray:
    img = np.zeros((SIZE, SIZE), np.float32)
    img = _paint(img, _ellipse(128, 128, 92, 108, 1.5), 0.85)  # scalp fat
    img = _paint(img, _ellipse(128, 128, 87, 103, 1.0), 0.08)  # cortical bone (dark on MRI)
    img = _paint(img, _ellipse(128, 128, 82, 98, 1.0), 0.15)  # CSF
    gyri = ((14, 0.035, float(rng.uniform(0, 6.3))), (9, 0.02, float(rng.uniform(0, 6.3))))
    img = _paint(img, _ellipse(128, 128, 79, 95, 1.0, wobble=gyri), 0.5)  # gray matter
    img = _paint(img, _ellipse(128, 128, 62, 76, 2.0, wobble=gyri), 0.72)  # white matter
    for x in (119, 137):
        img = _paint(img, _ellipse(x, 122, 6, 18), 0.1)
    cx, cy = _head_center(rng, s)
    img = _paint(img, _blob(rng, s, cx, cy), 0.97 if s.finding == "mass" else 0.1)
    return _mri_finish(rng, img)


def _knee_bones(s: Study, femur_shift: np.ndarray | float = 0.0, tibia_shift: np.ndarray | float = 0.0,
                shrink: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Femur and tibia+fibula masks of a frontal knee view (fibula lateral, on the patient's side of the image);
    shifts displace a fragment's columns, ``shrink`` erodes the shapes (medulla inside cortex)."""
    fx, tx = _X - femur_shift, _X - tibia_shift
    flare = 24 + 16 * np.clip((_Y - 60) / 50, 0, 1)
    femur = np.maximum(_columns(flare - shrink, fx) * (_Y < 114),
                       np.maximum(_ellipse(110, 114, 24 - shrink, 17 - shrink, x=fx),
                                  _ellipse(146, 114, 24 - shrink, 17 - shrink, x=fx)))
    taper = 40 - 16 * np.clip((_Y - 150) / 40, 0, 1)
    tibia = np.maximum(_ellipse(128, 150, 44 - shrink, 13 - shrink, x=tx), _columns(taper - shrink, tx) * (_Y > 150))
    fibula_x = _side_x(s.side, 50)
    head = 11 - 3 * np.clip((_Y - 172) / 20, 0, 1)
    fibula = _columns(head - shrink * 0.5, tx, fibula_x) * np.clip(_Y - (168 + shrink) + 0.5, 0, 1)
    return femur, np.maximum(tibia, fibula)


def _xray_knee(rng, s: Study) -> np.ndarray:
    img = np.full((SIZE, SIZE), 0.03, np.float32)
    img = _paint(img, _columns(84, _X), 0.28)  # the leg's soft tissue
    y0 = (84 if s.vertical == "upper" else 200) + _jitter(rng, 8)
    angle = float(rng.uniform(-0.35, 0.35))
    below = np.clip((_Y - y0) * math.cos(angle) - (_X - 128) * math.sin(angle) + 0.5, 0, 1)
    offset = (s.extent_px if s.large else 0.0) * float(rng.choice((-1, 1)))  # a displaced distal fragment
    shifts = {"femur_shift": below * offset} if s.vertical == "upper" else {"tibia_shift": below * offset}
    femur, tibia = _knee_bones(s, **shifts)
    femur_in, tibia_in = _knee_bones(s, shrink=4.0, **shifts)
    img = _paint(img, np.maximum(femur, tibia), 0.9)  # cortex
    img = _paint(img, np.maximum(femur_in, tibia_in), 0.72 + 0.03 * _noise(rng, 2.0))  # medulla
    img = img + 0.08 * _ellipse(128, 100, 22, 26, 3.0)  # patella, seen through the femur
    broken = femur if s.vertical == "upper" else tibia
    img = _paint(img, _band(128, y0, angle, s.extent_px / 2 + 0.3) * broken, 0.3)  # the fracture gap
    img = _marker(_blur(img, 0.7), "R" if s.side == "right" else "L")
    return img + rng.standard_normal((SIZE, SIZE)).astype(np.float32) * 0.015


def _xray_skull(rng, s: Study) -> np.ndarray:
    img = np.full((SIZE, SIZE), 0.03, np.float32)
    img = _paint(img, _ellipse(128, 120, 93, 113, 2.0), 0.3)
    ring = _ellipse(128, 118, 88, 104, 1.0) * (1 - _ellipse(128, 118, 78, 94, 1.0))
    img = _paint(img, _ellipse(128, 118, 88, 104, 1.0), 0.45)
    img = _paint(img, ring, 0.85)  # the vault
    for x in (100, 156):  # orbits
        img = _paint(img, _ellipse(x, 150, 17, 14, 1.0), 0.7)
        img = _paint(img, _ellipse(x, 150, 14, 11, 1.0), 0.28)
    img = _paint(img, _ellipse(128, 176, 9, 15), 0.22)  # nasal cavity
    jaw = _ellipse(128, 200, 56, 38, 1.0) * (1 - _ellipse(128, 198, 46, 30, 1.0)) * (_Y > 200)
    img = _paint(img, jaw, 0.82)
    img = img + 0.15 * (np.abs(_Y - 204) < 5) * (np.abs(_X - 128) < 40) * (np.sin(_X * 0.8) > 0)  # teeth
    angle = math.radians(55 if s.vertical == "upper" else -20) + _jitter(rng, 0.12)
    cx, cy = _image_x(s, 83 * math.cos(angle)), 118 - 99 * math.sin(angle)
    radial = math.atan2(cy - 118, cx - 128)
    gap = _band(cx, cy, radial, s.extent_px / 2 + 0.3) * _ellipse(cx, cy, 16, 16)
    img = _paint(img, gap * ring, 0.35)
    img = _marker(_blur(img, 0.7), "R")
    return img + rng.standard_normal((SIZE, SIZE)).astype(np.float32) * 0.015


def _mri_knee(rng, s: Study) -> np.ndarray:
    img = np.zeros((SIZE, SIZE), np.float32)
    img = _paint(img, _columns(86, _X), 0.8)  # subcutaneous fat
    img = _paint(img, _blur(_columns(76, _X), 2.0), 0.33)  # muscle
    femur, tibia = _knee_bones(s)
    femur_in, tibia_in = _knee_bones(s, shrink=3.0)
    img = _paint(img, _ellipse(128, 131, 48, 9, 1.5), 0.5)  # cartilage / joint
    img = _paint(img, np.maximum(femur, tibia), 0.1)  # cortex (dark)
    img = _paint(img, np.maximum(femur_in, tibia_in), 0.82 + 0.03 * _noise(rng, 2.5))  # fatty marrow (bright T1)
    cx = 128 + _jitter(rng, 10)
    cy = (86 if s.vertical == "upper" else 188) + _jitter(rng, 8)
    img = _paint(img, _blob(rng, s, cx, cy), 0.12)
    return _mri_finish(rng, img)


def _mri_abdomen(rng, s: Study) -> np.ndarray:
    img = np.zeros((SIZE, SIZE), np.float32)
    img = _paint(img, _ellipse(128, 128, 112, 86, 1.5), 0.85)  # subcutaneous fat (bright T1)
    img = _paint(img, _ellipse(128, 128, 101, 76, 1.5), 0.42)
    img = _abdomen_layout(rng, img, {"liver": 0.56, "spleen": 0.42, "kidney": 0.48, "aorta": 0.04, "spine": 0.66,
                                     "bowel": (0.1, 0.6)})
    cx, cy = _quadrant_center(rng, s)
    img = _paint(img, _blob(rng, s, cx, cy), 0.95 if s.finding == "mass" else 0.08)
    return _mri_finish(rng, img)


def _ultrasound(rng, s: Study) -> np.ndarray:
    apex_y = -30.0
    r = np.sqrt((_X - 128) ** 2 + (_Y - apex_y) ** 2)
    theta = np.arctan2(_X - 128, _Y - apex_y)
    sector = (np.clip((0.66 - np.abs(theta)) * 120, 0, 1) * np.clip((r - 40) * 0.5, 0, 1)
              * np.clip((265 - r) * 0.5, 0, 1))
    echo = np.full((SIZE, SIZE), 0.5, np.float32) + 0.08 * _noise(rng, 6.0)
    anechoic = np.zeros((SIZE, SIZE), np.float32)
    if s.region == "abdomen":
        for _ in range(3):  # vessel segments
            x0, y0 = float(rng.uniform(80, 176)), float(rng.uniform(60, 200))
            band = _band(x0, y0, float(rng.uniform(-0.6, 0.6)), float(rng.uniform(1.2, 2.2)))
            vessel = band * _ellipse(x0, y0, 26, 26, 8)
            echo, anechoic = _paint(echo, vessel, 0.03), np.maximum(anechoic, vessel)
        diaphragm = np.clip(3 - np.abs(r - 245), 0, 1)
        echo = _paint(echo, diaphragm, 1.4)
    else:
        bladder = _ellipse(128, 70, 46, 30, 1.5)
        echo, anechoic = _paint(echo, bladder, 0.02), bladder
        echo = _paint(echo, _ellipse(128, 150, 42, 26, 3.0), 0.68)  # uterus
    cx = _image_x(s, 40) + _jitter(rng, 6)
    cy = (92 if s.vertical == "upper" else 176) + _jitter(rng, 6)
    blob = _blob(rng, s, cx, cy)
    if s.finding == "cyst":
        echo, anechoic = _paint(echo, blob, 0.02), np.maximum(anechoic, blob)
    else:
        echo = _paint(echo, blob, 1.3)
        echo = echo * (1 - 0.35 * _shadow(blob))  # shadowing behind the echogenic mass
    echo = echo * (1 + 0.45 * _shadow(anechoic))  # posterior acoustic enhancement
    speckle = rng.rayleigh(1.0, (SIZE, SIZE)).astype(np.float32)
    speckle = _blur(speckle, 0.7, 1.6)
    speckle /= speckle.mean()
    img = echo * speckle * np.exp(-0.004 * np.maximum(r - 40, 0)) * (1 + 0.003 * np.maximum(r - 40, 0))
    img = (1 - np.exp(-1.6 * img)) * sector
    img[8:240:20, 244:247] = 0.8  # depth scale
    return img


def _shadow(mask: np.ndarray) -> np.ndarray:
    """What lies beneath (deeper than) a mask: its running maximum down the columns, softened."""
    return _blur(np.maximum.accumulate(mask, axis=0) - mask, 1.5).clip(0, 1)


_RENDERERS = {
    ("X-ray", "chest"): _xray_chest, ("X-ray", "knee"): _xray_knee, ("X-ray", "head"): _xray_skull,
    ("CT", "chest"): _ct_chest, ("CT", "abdomen"): _ct_abdomen, ("CT", "head"): _ct_head,
    ("MRI", "head"): _mri_head, ("MRI", "knee"): _mri_knee, ("MRI", "abdomen"): _mri_abdomen,
    ("ultrasound", "abdomen"): _ultrasound, ("ultrasound", "pelvis"): _ultrasound,
}


def render_study(s: Study, rng: np.random.Generator) -> np.ndarray:
    """The study's image as uint8 (256, 256)."""
    img = _RENDERERS[(s.modality, s.region)](rng, s)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


FINDING_CHANGE = 8  # grey levels: a pixel belongs to the finding when removing the finding changes it this much


@dataclass(frozen=True)
class PlantedFinding:
    """One demo image with its finding's place: ``jpeg`` as the dataset stores it, ``mask`` bool (256, 256) of the
    pixels the finding changes (its own, and the edema, displaced fragment or acoustic shadow it brings), the
    study and its caption; ``jpeg_without`` the same image drawn without its finding (the same random values, the
    finding shrunk to nothing), which shows whether a model's similarity depends on the finding at all."""

    study: Study
    caption: str
    jpeg: bytes
    mask: np.ndarray
    jpeg_without: bytes


def _finding_mask(s: Study, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image uint8, the image without its finding uint8, finding mask): the study rendered as ``render_study``
    does and again from the same random state with the finding shrunk to nothing; the mask holds the pixels that
    differ by ``FINDING_CHANGE`` or more (the renderers draw the same number of random values whatever the
    finding's extent)."""
    twin = copy.deepcopy(rng)
    image = render_study(s, rng)
    without = render_study(dataclasses.replace(s, extent_px=1e-3), twin)
    return image, without, np.abs(image.astype(np.int16) - without.astype(np.int16)) >= FINDING_CHANGE


def planted_findings(n: int, seed: int = 0, split: str = "test") -> list[PlantedFinding]:
    """The first ``n`` synthetic images of a demo split (the images ``write_demo_dataset(seed=seed)`` writes there,
    byte for byte) with the region of their finding, for the pointing game of the saliency sanity checks."""
    index = ("train", "valid", "test").index(split)
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, index, 1, i])  # the per-image stream of _write_split
        study = _draw_study(rng)
        image, without, mask = _finding_mask(study, rng)
        out.append(PlantedFinding(study, _caption(study), _jpeg(image), mask, _jpeg(without)))
    return out


def _jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- writing


_DEFAULTS = {"seed": 0, "n_train": 480, "n_valid": 96, "n_test": 96, "n_dicom": 6}  # what demo_dataset_path writes


def _params(seed: int, n_train: int, n_valid: int, n_test: int, n_dicom: int) -> dict:
    return {"format": DEMO_FORMAT_VERSION, "seed": seed, "n_train": n_train, "n_valid": n_valid, "n_test": n_test,
            "n_dicom": n_dicom}


def _read_marker(out: Path) -> dict | None:
    try:
        return json.loads((out / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


def demo_split_counts(out: str | os.PathLike) -> dict[str, dict[str, int]]:
    """{split: {"images": all its images, "dicom": how many of them are real DICOM files}} of the demo dataset
    written at ``out`` (its marker file; empty when there is none)."""
    marker = _read_marker(Path(out))
    return dict(marker.get("splits", {})) if marker else {}


def _dicom_sources(n_dicom: int) -> list[tuple[Path, DicomEntry]]:
    """(file, entry) for the first ``n_dicom`` entries of DEMO_DICOM_FILES that pydicom ships here."""
    try:
        from pydicom.data import get_testdata_file
    except ImportError:
        warnings.warn("pydicom is not installed: the demo dataset gets no DICOM images", stacklevel=3)
        return []
    found = []
    for entry in DEMO_DICOM_FILES[:n_dicom]:
        try:
            path = get_testdata_file(entry.file, download=False)  # never get_testdata_files("*"): it downloads
        except Exception:  # noqa: BLE001 - a missing test file must not stop the demo
            path = None
        if path is None:
            warnings.warn(f"pydicom's test file {entry.file} is not installed: left out of the demo dataset",
                          stacklevel=3)
            continue
        found.append((Path(path), entry))
    return found


def _write_csv(path: Path, header: tuple[str, str], rows: list[tuple[str, str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _write_split(root: Path, split: str, index: int, seed: int, n: int,
                 dicoms: list[tuple[Path, DicomEntry]]) -> dict:
    """Draw, render and write one split; DICOM files are slotted in at seeded positions, IDs have gaps."""
    rng = np.random.default_rng([seed, index, 0])
    items: list[tuple[Study, np.random.Generator] | tuple[Path, DicomEntry]] = []
    for i in range(n):
        study_rng = np.random.default_rng([seed, index, 1, i])  # per image: a sample does not depend on n
        items.append((_draw_study(study_rng), study_rng))
    for dicom in dicoms:
        items.insert(int(rng.integers(len(items) + 1)), dicom)
    image_dir = root / f"{split}_images" / split
    image_dir.mkdir(parents=True)
    captions, concepts, manual = [], [], []
    counts: dict[str, int] = {}
    number = int(rng.integers(1, 20))
    for first, second in items:
        image_id = f"ROCOv2_2023_{split}_{number:06d}"
        number += 1 + int(rng.integers(0, 3))  # IDs are not contiguous, as in the real release
        if isinstance(first, Study):
            (image_dir / f"{image_id}.jpg").write_bytes(_jpeg(render_study(first, second)))
            caption, modality = _caption(first), first.modality
            all_cuis, manual_cuis = _concepts(first)
        else:
            shutil.copyfile(first, image_dir / f"{image_id}.dcm")
            caption, modality = second.caption, second.modality
            manual_cuis = [MODALITY_CUIS[modality]]
            all_cuis = manual_cuis + ([REGION_CUIS[second.region]] if second.region else [])
        captions.append((image_id, caption))
        concepts.append((image_id, ";".join(all_cuis)))
        manual.append((image_id, ";".join(manual_cuis)))
        counts[modality] = counts.get(modality, 0) + 1
    _write_csv(root / f"{split}_captions.csv", ("ID", "Caption"), captions)
    _write_csv(root / f"{split}_concepts.csv", ("ID", "CUIs"), concepts)
    _write_csv(root / f"{split}_concepts_manual.csv", ("ID", "CUIs"), manual)
    return {"images": len(items), "dicom": len(dicoms), "modalities": dict(sorted(counts.items()))}


_README = """\
fuselip_med demo dataset: SYNTHETIC radiology-like images, not real patients.

Written by fuselip_med.data.demo.write_demo_dataset (seed {seed}) in the layout of the official ROCOv2
release, so `--set data.train.path={{this folder}}` with the rocov2 adapter reads it like the real thing:
  {{split}}_captions.csv (ID,Caption), {{split}}_concepts.csv and {{split}}_concepts_manual.csv (ID,CUIs),
  cui_mapping.csv (CUI,Canonical name), images in {{split}}_images/{{split}}/<ID>.jpg (or .dcm).

Images are drawn procedurally (numpy + Pillow): radiographs, CT slices, MRI slices and ultrasound of the chest,
abdomen, pelvis, head and knee, each with one finding (nodule, mass, cyst, hemorrhage, pleural effusion or
fracture) whose kind, size (small/large, in mm) and location the caption states. Radiological convention:
the patient's right is on the image's left. Concepts use real UMLS CUIs (modality, body region, X-ray
direction, finding); the manual concepts hold the modality (plus region and direction for X-rays).

Split sizes (synthetic + DICOM): {splits}.
DICOM images are real files copied from pydicom's test data (pydicom/data/test_files; see pydicom's licence
and that folder's README for their origin): {dicoms}.
The synthetic images and captions carry no licence restriction (CC0); use them freely for testing.
"""


def _write_all(root: Path, params: dict) -> None:
    seed = params["seed"]
    dicoms = _dicom_sources(params["n_dicom"])
    splits = {}
    for index, (split, n) in enumerate((("train", params["n_train"]), ("valid", params["n_valid"]),
                                        ("test", params["n_test"]))):
        chosen = [(path, entry) for path, entry in dicoms if entry.split == split]
        splits[split] = _write_split(root, split, index, seed, n, chosen)
    _write_csv(root / "cui_mapping.csv", ("CUI", "Canonical name"), sorted(CUI_NAMES.items()))
    split_text = ", ".join(f"{k} {v['images']} ({v['dicom']} DICOM)" for k, v in splits.items())
    dicom_text = ", ".join(f"{entry.file} ({entry.split})" for _, entry in dicoms) or "none"
    readme = _README.format(seed=seed, splits=split_text, dicoms=dicom_text)
    (root / "README.txt").write_text(readme, encoding="utf-8")
    marker = dict(params, splits=splits, dicom_files=[entry.file for _, entry in dicoms])
    (root / MARKER_NAME).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _marker_matches(out: Path, params: dict) -> bool:
    marker = _read_marker(out)
    return marker is not None and all(marker.get(k) == v for k, v in params.items())


def write_demo_dataset(out_dir: str | os.PathLike, *, seed: int = 0, n_train: int = 480, n_valid: int = 96,
                       n_test: int = 96, n_dicom: int = 6, overwrite: bool = False) -> Path:
    """Write the demo dataset to ``out_dir`` atomically and return it; a complete one with these parameters is
    reused, ``overwrite`` replaces a demo dataset (never a folder of other files)."""
    for name, value in (("seed", seed), ("n_train", n_train), ("n_valid", n_valid), ("n_test", n_test),
                        ("n_dicom", n_dicom)):
        if not isinstance(value, int) or value < 0:
            raise InputError(f"{name} must be a non-negative integer, got {value!r}")
    if n_dicom > len(DEMO_DICOM_FILES):
        raise InputError(f"n_dicom must be at most {len(DEMO_DICOM_FILES)}, got {n_dicom}")
    out = Path(out_dir).expanduser().absolute()
    params = _params(seed, n_train, n_valid, n_test, n_dicom)
    if out.exists():
        if not out.is_dir():
            raise OutputExistsError(f"{out} exists and is not a folder: choose another output folder.")
        is_demo = _read_marker(out) is not None
        if is_demo and not overwrite and _marker_matches(out, params):
            return out
        if any(out.iterdir()) and not (is_demo and overwrite):
            what = "a demo dataset with other parameters" if is_demo else "files that are not a demo dataset"
            advice = "pass overwrite=True (--overwrite) to replace it" if is_demo else "choose an empty or new folder"
            raise OutputExistsError(f"{out} already holds {what}: {advice}.")
    try:
        with atomic_directory(out) as tmp:
            os.chmod(tmp, 0o755)
            _write_all(tmp, params)
    except OSError:
        if _marker_matches(out, params):  # another process finished the same dataset first
            return out
        raise
    return out


def demo_dataset_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """The default demo dataset, generated on first use under ``<cache>/demo_rocov2``; the cache root is
    ``cache_dir``, else ``$FUSELIP_MED_CACHE``, else ``~/.cache/fuselip_med``."""
    root = Path(cache_dir or os.environ.get("FUSELIP_MED_CACHE") or Path.home() / ".cache" / "fuselip_med")
    path = root.expanduser() / "demo_rocov2"
    if _marker_matches(path, _params(**_DEFAULTS)):
        return path
    return write_demo_dataset(path, overwrite=_read_marker(path) is not None, **_DEFAULTS)
