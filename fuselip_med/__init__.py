"""fuselip_med: FuseLIP early-fusion multimodal embeddings for medical imaging.

The public names load on first use (PEP 562 ``__getattr__``), so importing a light submodule (the command line,
``fuselip_med.errors``) does not import torch.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_HOMES = {
    "load_model": "fuselip_med.core.loading",
    "save_pretrained": "fuselip_med.core.pretrained",
    "FuseLIP": "fuselip_med.core.fuselip",
    "FuseLIPConfig": "fuselip_med.core.fuselip",
    "LateFusion": "fuselip_med.core.late_fusion",
    "LateFusionConfig": "fuselip_med.core.late_fusion",
    "TextTokenizer": "fuselip_med.core.text_tokenizer",
    "TiTokTokenizer": "fuselip_med.core.titok",
    "Sample": "fuselip_med.data.schema",
}
__all__ = list(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'fuselip_med' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
