"""The project's shared vocabulary: special token ids, modality names and their spellings, ROCOv2 concept ids
(UMLS CUIs) and CT window presets. Constants only, standard library only; every layer may import it.

Sources: token ids from the CLIP BPE vocabulary (``assets/bpe_simple_vocab_16e6.txt.gz``: 256 bytes x 2,
48,894 merges, then ``<start_of_text>``, ``<end_of_text>``) and FuseLIP's ``[MASK]`` appended after them
(reference-facts.md); ROCOv2 manual concepts from the ROCOv2 paper (Rückert et al., 2024) and its
``cui_mapping.csv`` (data-formats.md); CT windows from common radiology practice (window width/level in HU).
"""
from __future__ import annotations

__all__ = [
    "CLIP_BPE_VOCAB_SIZE",
    "EOT_TOKEN",
    "EOT_TOKEN_ID",
    "MASK_TOKEN",
    "MASK_TOKEN_ID",
    "MODALITIES",
    "MODALITY_ALIASES",
    "MODALITY_CUIS",
    "PAD_TOKEN_ID",
    "ROCOV2_MANUAL_CUI_NAMES",
    "ROCOV2_MODALITIES",
    "SOT_TOKEN",
    "SOT_TOKEN_ID",
    "TEXT_VOCAB_SIZE",
    "WINDOW_PRESETS",
    "modality_name",
]

# ------------------------------------------------------------------------------------------ special tokens
SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
MASK_TOKEN = "[MASK]"
PAD_TOKEN_ID = 0  # text rows are right-padded with 0 (open_clip convention)
SOT_TOKEN_ID = 49406
EOT_TOKEN_ID = 49407
CLIP_BPE_VOCAB_SIZE = 49408  # ids 0 ... 49407
MASK_TOKEN_ID = 49408  # FuseLIP's [MASK], appended after the CLIP BPE vocabulary
TEXT_VOCAB_SIZE = 49409  # CLIP BPE + [MASK]: the released models' text vocabulary; image codes follow it

# -------------------------------------------------------------------------------------------- modalities
# The six imaging modalities of ROCOv2's manual concepts, by the short names used across the project.
MODALITIES: tuple[str, ...] = ("CT", "MRI", "X-ray", "ultrasound", "angiography", "PET")

# Manual modality concept (one per ROCOv2 image) -> short modality name.
ROCOV2_MODALITIES: dict[str, str] = {
    "C0040405": "CT",
    "C0024485": "MRI",
    "C1306645": "X-ray",
    "C0041618": "ultrasound",
    "C0002978": "angiography",
    "C0032743": "PET",
}
MODALITY_CUIS: dict[str, str] = {name: cui for cui, name in ROCOV2_MODALITIES.items()}

# Names of ROCOv2's manually curated concepts (modality; body region and direction for X-rays). The Hugging
# Face mirror ships no cui_mapping.csv, so these are the names it gets.
ROCOV2_MANUAL_CUI_NAMES: dict[str, str] = {
    "C0040405": "X-Ray Computed Tomography",
    "C0024485": "Magnetic Resonance Imaging",
    "C1306645": "Plain x-ray",
    "C0041618": "Ultrasonography",
    "C0002978": "angiogram",
    "C0032743": "Positron-Emission Tomography",
    "C0817096": "Chest",
    "C0023216": "Lower Extremity",
    "C1140618": "Upper Extremity",
    "C0030797": "Pelvis",
    "C0037303": "Bone structure of cranium",
    "C0037949": "Vertebral column",
    "C0000726": "Abdomen",
    "C1996865": "Postero-Anterior",
    "C1999039": "Anterior-Posterior",
    "C0205129": "Sagittal",
}

# Spellings users and datasets write (lower case: names, DICOM Modality codes, CUIs) -> short modality name.
MODALITY_ALIASES: dict[str, str] = {
    **{name.lower(): name for name in MODALITIES},
    **{cui.lower(): name for cui, name in ROCOV2_MODALITIES.items()},
    **{ROCOV2_MANUAL_CUI_NAMES[cui].lower(): name for cui, name in ROCOV2_MODALITIES.items()},
    "computed tomography": "CT",
    "mr": "MRI",
    "xray": "X-ray", "x ray": "X-ray", "radiograph": "X-ray", "radiography": "X-ray", "cr": "X-ray", "dx": "X-ray",
    "us": "ultrasound", "sonography": "ultrasound",
    "xa": "angiography",
    "pt": "PET", "positron emission tomography": "PET",
}


def modality_name(value: object) -> str | None:
    """The short modality name (one of ``MODALITIES``) for a known spelling, DICOM code or CUI, case and
    surrounding spaces ignored (``" mr "`` -> ``"MRI"``, ``"C0024485"`` -> ``"MRI"``); None otherwise."""
    if value is None:
        return None
    return MODALITY_ALIASES.get(str(value).strip().lower())


# ------------------------------------------------------------------------------------------- CT windows
# name -> (width, level) in HU. Windowing maps [level - width/2, level + width/2] to [0, 1] with clipping.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (1500.0, -600.0),
    "mediastinum": (400.0, 40.0),
    "soft_tissue": (400.0, 40.0),
    "abdomen": (400.0, 50.0),
    "liver": (150.0, 30.0),
    "brain": (80.0, 40.0),
    "bone": (1800.0, 400.0),
}
