"""Write a FuseLIP model as two ONNX graphs (fp32, or int8 by ONNX Runtime's quantization: ``export.quantize``).

An export directory holds::

    titok.onnx                   pixels [B, 3, S, S] float32 in [0, 1] -> codes [B, 128] int64 (VQ argmin inside)
    encoder.onnx                 input_ids [B, L] int64 joint ids, 0 = padding -> embeddings [B, D] float32, unit L2
    bpe_simple_vocab_16e6.txt.gz the CLIP BPE vocabulary the text tokenizer reads (+ its licence)
    config.json                  format, precision, graph inputs/outputs, the FuseLIP config, the source model
    export_report.json, README.md  the quality gate's figures (written by ``export.gate``)

Graphs are traced with ``torch.onnx.export(dynamo=True)`` (``torch.export``; the TorchScript exporter is
deprecated since PyTorch 2.9) with a dynamic batch, and a dynamic length (2 ... context_length) for the encoder.
The encoder graph is ``FuseLIP.encode_ids`` itself: padding (id 0) is masked inside, the embedding is the
L2-normalised ``ln_final`` state at the first eot (reference-facts.md 2.5-2.6). The TiTok graph is
``TiTokTokenizer.codes``: encoder, fp32 squared-distance VQ and argmin (reference-facts.md 1.3-1.4).

int8: the fp32 graphs quantized in place by ``export.quantize.quantize_int8`` (dynamic, or static with a
calibration set).
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from fuselip_med.core.configs import FuseLIPConfig
from fuselip_med.core.fuselip import FuseLIP
from fuselip_med.core.text_tokenizer import DEFAULT_BPE_PATH
from fuselip_med.io import atomic_write_json

if TYPE_CHECKING:
    from fuselip_med.export.quantize import CalibrationInputs, Int8Settings

__all__ = ["EXPORT_CONFIG", "ENCODER_GRAPH", "FORMAT", "PRECISIONS", "REPORT_NAME", "TITOK_GRAPH", "export_graphs",
           "graph_signatures", "write_export"]

FORMAT = "fuselip_med-onnx"
FORMAT_VERSION = 1
TITOK_GRAPH = "titok.onnx"
ENCODER_GRAPH = "encoder.onnx"
EXPORT_CONFIG = "config.json"
#: The quality gate's report (``export.gate``), which records each graph's sha256 (``graphs``).
REPORT_NAME = "export_report.json"
BPE_FILE = Path(DEFAULT_BPE_PATH).name
BPE_LICENSE = "LICENSE-CLIP-BPE.txt"
PRECISIONS = ("fp32", "int8")
Precision = Literal["fp32", "int8"]


class _CodesGraph(nn.Module):
    """The exported TiTok graph: ``TiTokTokenizer.codes``."""

    def __init__(self, model: FuseLIP):
        super().__init__()
        self.image_tokenizer = model.image_tokenizer

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image_tokenizer.codes(pixels)


class _EmbeddingGraph(nn.Module):
    """The exported encoder graph: joint ids -> L2-normalised embeddings (``FuseLIP.encode_ids``)."""

    def __init__(self, model: FuseLIP):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.encode_ids(input_ids).embeddings


def _export(module: nn.Module, example: torch.Tensor, path: Path, input_name: str, output_name: str,
            dynamic: dict[int, Any]) -> None:
    import warnings

    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)  # "torchvision is not installed. Skipping torchvision::nms" and the like
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation notes on torch internals
            torch.onnx.export(module, (example,), str(path), dynamo=True, external_data=False, verbose=False,
                              input_names=[input_name], output_names=[output_name],
                              dynamic_shapes={input_name: dynamic})
    finally:
        registration.setLevel(level)


def export_graphs(model: FuseLIP, directory: str | os.PathLike) -> dict[str, dict[str, dict[str, str]]]:
    """Write ``titok.onnx`` and ``encoder.onnx`` (fp32) for ``model`` into ``directory``.

    Returns the graphs' input/output descriptions (for config.json). The model is put in eval mode and traced on
    the CPU with example inputs of batch 2 (a batch of 1 would be specialised by ``torch.export``).
    """
    from torch.export import Dim

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = model.eval().to("cpu")
    cfg = model.config
    size = cfg.titok.image_size
    pixels = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    batch = Dim("batch", min=1, max=4096)
    _export(_CodesGraph(model), pixels, directory / TITOK_GRAPH, "pixels", "codes", {0: batch})
    ids = model.prepare_inputs(images=pixels, texts=["an example", "of joint ids"])
    length = Dim("length", min=2, max=cfg.context_length)
    _export(_EmbeddingGraph(model), ids, directory / ENCODER_GRAPH, "input_ids", "embeddings",
            {0: batch, 1: length})
    return graph_signatures(cfg)


def graph_signatures(cfg: FuseLIPConfig) -> dict[str, dict[str, Any]]:
    """The graphs' files and input/output descriptions for config.json."""
    size, n = cfg.titok.image_size, cfg.num_image_tokens
    return {
        "titok": {"file": TITOK_GRAPH, "inputs": {"pixels": f"[B, 3, {size}, {size}] float32 in [0, 1]"},
                  "outputs": {"codes": f"[B, {n}] int64 in [0, {cfg.codebook_size})"}},
        "encoder": {"file": ENCODER_GRAPH,
                    "inputs": {"input_ids": f"[B, L] int64 joint ids, L in [2, {cfg.context_length}], 0 = padding"},
                    "outputs": {"embeddings": f"[B, {cfg.width}] float32, L2-normalised"}},
    }


def write_export(model: FuseLIP, directory: str | os.PathLike, *, precision: Precision = "fp32",
                 int8: "Int8Settings | None" = None, calibration: "CalibrationInputs | None" = None,
                 source: dict[str, str] | None = None, traced: str | os.PathLike | None = None) -> dict[str, Any]:
    """Write a complete export (graphs, tokenizer files, config.json) of ``model`` into ``directory``.

    ``int8``: how to quantize when ``precision`` is int8 (default ``Int8Settings()``: dynamic, both graphs);
    ``calibration``: the feeds static quantization calibrates on. ``source``: what the export was made from
    (``{"name": ..., "fingerprint": ...}``), recorded in config.json. ``traced``: a folder holding this model's
    fp32 ``titok.onnx`` and ``encoder.onnx`` (an earlier fp32 export), copied instead of tracing again (the
    benchmark quantizes one trace several ways). Returns the config.json content.
    ``ValueError`` for an unknown precision, an int8 setting that does not fit, or static mode without calibration.
    """
    import onnxruntime

    from fuselip_med.export.quantize import Int8Settings, quantize_int8

    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if not isinstance(getattr(model, "config", None), FuseLIPConfig):
        raise ValueError(f"only FuseLIP (early fusion) models export to ONNX, not {type(model).__name__}")
    directory = Path(directory)
    if traced is None:
        graphs = export_graphs(model, directory)
    else:
        directory.mkdir(parents=True, exist_ok=True)
        for name in (TITOK_GRAPH, ENCODER_GRAPH):
            shutil.copyfile(Path(traced) / name, directory / name)
        graphs = graph_signatures(model.config)
    quantized = (quantize_int8(directory / TITOK_GRAPH, directory / ENCODER_GRAPH, int8 or Int8Settings(), calibration)
                 if precision == "int8" else None)
    shutil.copyfile(DEFAULT_BPE_PATH, directory / BPE_FILE)
    shutil.copyfile(Path(DEFAULT_BPE_PATH).with_name(BPE_LICENSE), directory / BPE_LICENSE)
    config = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "precision": precision, "int8": quantized,
        "graphs": graphs, "tokenizer": {"bpe": BPE_FILE, "context_length": model.config.context_length,
                                        "mask_token": True},
        "model": model.config.to_dict(), "source": source or {},
        "exporter": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "dynamo": True},
    }
    atomic_write_json(directory / EXPORT_CONFIG, config)
    return config
