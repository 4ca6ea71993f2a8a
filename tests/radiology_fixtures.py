"""Fixtures of the radiology evaluation tests, written in the publishers' exact formats (field names, types,
nesting), and a planted model with a logit scale and bias."""
from __future__ import annotations

import csv
import math

import torch

from tests.planted import PlantedModel, solid_image

# CheXpert-v1.0(-small) train.csv / valid.csv header (Irvin et al. 2019; the release's CSVs).
CHEXPERT_FINDINGS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
                     "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                     "Pleural Other", "Fracture", "Support Devices")
CHEXPERT_HEADER = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_FINDINGS)


def rgb_of(n: int) -> tuple[int, int, int]:
    """A distinct solid colour for image number n (its id for the planted model is n + 1000)."""
    k = n + 1000
    return (k >> 16) & 255, (k >> 8) & 255, k & 255


def write_chexpert(root, split: str, rows: list[dict], patient0: int = 64541) -> str:
    """``root/CheXpert-v1.0-small/<split>.csv`` + one JPEG per row; ``rows``: {"n": image number,
    finding: "1.0"/"0.0"/"-1.0"/""}. Returns the CSV path."""
    base = root / "CheXpert-v1.0-small"
    lines = []
    for i, row in enumerate(rows):
        rel = f"CheXpert-v1.0-small/{split}/patient{patient0 + i}/study1/view1_frontal.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        if row.get("n") is not None:
            solid_image(root / rel, rgb_of(row["n"]), fmt="PNG")
        lines.append([rel, "Female", "73", "Frontal", "AP", *(row.get(f, "") for f in CHEXPERT_FINDINGS)])
    base.mkdir(parents=True, exist_ok=True)
    with open(base / f"{split}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CHEXPERT_HEADER)
        w.writerows(lines)
    return str(base / f"{split}.csv")


class ScaledPlanted(PlantedModel):
    """PlantedModel with SigLIP's ``logit_scale`` (log t) and ``logit_bias`` b."""

    def __init__(self, *args, t: float = 10.0, b: float = -5.0, **kw):
        super().__init__(*args, **kw)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(t)))
        self.logit_bias = torch.nn.Parameter(torch.tensor(b))
