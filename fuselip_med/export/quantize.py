"""int8 quantization of an export's graphs with ONNX Runtime's quantization tools, dynamic or static.

- ``dynamic`` (``onnxruntime.quantization.quantize_dynamic``): int8 weights (``QInt8``) for ``MatMul`` and
  ``Gather`` (the token embedding); activations are quantized per batch at run time.
- ``static`` (``quantize_static``, QDQ format): int8 weights per output channel and uint8 activations (ONNX
  Runtime's recommended U8S8 pairing on x86) whose ranges are calibrated once on a calibration set
  (``CalibrationInputs``: the reference images, their captions and the joint ids they make) with MinMax, Entropy
  or Percentile (ONNX Runtime's ``CalibrationMethod``). Only ``MatMul`` with a constant weight is quantized
  (``MatMulConstBOnly``): the attention products of two activations stay fp32.

Convolutions (TiTok's patch embedding and ``conv_out``) and the VQ distance (an ``Einsum``) stay fp32 in both
modes: the code ids depend on them most directly. ``titok_fp32_blocks`` keeps the last N transformer blocks of the
TiTok encoder fp32 too (their MatMuls are excluded by node name, ``nodes_to_exclude``): the blocks nearest to the
latent projection before the VQ argmin. Measured on FuseLIP-S with random weights (README, Export for CPU
servers), int8 weights in any one of TiTok's 8 blocks flip about 1% of the codes, so the sensitivity is spread
over the blocks rather than held in the last ones.

The gate (``export.gate``) judges the result; nothing here guarantees that a setting keeps the codes.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from fuselip_med.errors import UserError
from fuselip_med.vocab import PAD_TOKEN_ID

__all__ = ["CALIBRATION_METHODS", "DYNAMIC_OPS", "INT8_MODES", "INT8_SCOPES", "STATIC_OPS", "CalibrationInputs",
           "Int8Settings", "calibration_inputs", "quantize_int8", "titok_block_matmuls"]

INT8_MODES = ("dynamic", "static")
INT8_SCOPES = ("all", "encoder")
"""``all``: both graphs int8; ``encoder``: the FuseLIP encoder int8, the TiTok graph fp32 (its codes exact)."""
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
DYNAMIC_OPS = ("MatMul", "Gather")
STATIC_OPS = ("MatMul",)
TITOK_MATMULS_PER_BLOCK = 6
"""MatMuls per TiTok transformer block in the exported graph, in graph order: q/k/v projection, q @ k^T,
attention @ v, output projection, MLP in, MLP out (``core.titok._Block``)."""


class Int8SettingsError(UserError, ValueError):
    """An int8 setting that does not exist or does not fit the model (message names it)."""


@dataclass(frozen=True)
class Int8Settings:
    """How to quantize: ``mode`` (``INT8_MODES``), ``scope`` (``INT8_SCOPES``), the static calibration method
    (``CALIBRATION_METHODS``), and how many of TiTok's last transformer blocks stay fp32 (0 = none).
    ``Int8SettingsError`` for a value outside these."""

    mode: str = "dynamic"
    scope: str = "all"
    calibration_method: str = "minmax"
    titok_fp32_blocks: int = 0

    def __post_init__(self) -> None:
        for name, option, allowed in (("mode", "--int8-mode", INT8_MODES), ("scope", "--int8-scope", INT8_SCOPES),
                                      ("calibration_method", "--calibration-method", CALIBRATION_METHODS)):
            if getattr(self, name) not in allowed:
                raise Int8SettingsError(f"{option} {getattr(self, name)!r}: choose one of {', '.join(allowed)}")
        if self.titok_fp32_blocks < 0:
            raise Int8SettingsError(f"--titok-fp32-blocks {self.titok_fp32_blocks}: give 0 or more")


@dataclass
class CalibrationInputs:
    """What static quantization calibrates on: feeds of ``titok.onnx`` (``pixels`` [b, 3, S, S] float32 in
    [0, 1]) and of ``encoder.onnx`` (``input_ids`` [b, L] int64 joint ids: image, text and image+text rows)."""

    titok: list[dict[str, np.ndarray]]
    encoder: list[dict[str, np.ndarray]]
    n_images: int


def calibration_inputs(model, pixels: torch.Tensor, texts: Sequence[str]) -> CalibrationInputs:
    """Calibration feeds from captioned images: pixels [N, 3, S, S] float32 in [0, 1] and N captions, with the
    joint ids that PyTorch ``model`` (FuseLIP) makes of them (its fp32 codes). One row per feed and the ids
    padded (id 0, masked in the graph) to one length: the histogram calibrators (Entropy, Percentile) stack the
    feeds' activations, so every feed has the same shape. ``ValueError`` without images or with a caption count
    that differs from the image count."""
    if len(pixels) == 0 or len(pixels) != len(texts):
        raise ValueError(f"calibration needs one caption per image, got {len(pixels)} images and {len(texts)} "
                         "captions")
    pixels = pixels.float()
    with torch.no_grad():
        codes = model.image_codes(pixels)
        rows = [model.prepare_inputs(**inputs).cpu() for inputs in
                ({"image_ids": codes}, {"texts": list(texts)}, {"image_ids": codes, "texts": list(texts)})]
    length = max(ids.shape[1] for ids in rows)
    padded = [torch.nn.functional.pad(r, (0, length - r.shape[1]), value=PAD_TOKEN_ID) for r in rows]
    ids = torch.cat(padded).numpy().astype(np.int64)
    return CalibrationInputs([{"pixels": np.ascontiguousarray(pixels[i:i + 1].numpy())} for i in range(len(pixels))],
                             [{"input_ids": ids[i:i + 1]} for i in range(len(ids))], len(pixels))


def titok_block_matmuls(graph_path: str | os.PathLike, last_blocks: int) -> list[str]:
    """Names of the MatMul nodes of TiTok's last ``last_blocks`` transformer blocks in ``titok.onnx`` (graph
    order; ``TITOK_MATMULS_PER_BLOCK`` per block). ``Int8SettingsError`` when the graph has fewer blocks."""
    import onnx

    matmuls = [node.name for node in onnx.load(str(graph_path), load_external_data=False).graph.node
               if node.op_type == "MatMul"]
    blocks = len(matmuls) // TITOK_MATMULS_PER_BLOCK
    if len(matmuls) % TITOK_MATMULS_PER_BLOCK or last_blocks > blocks:
        raise Int8SettingsError(f"--titok-fp32-blocks {last_blocks}: the TiTok graph has {blocks} blocks "
                                f"({len(matmuls)} MatMuls)")
    return matmuls[len(matmuls) - last_blocks * TITOK_MATMULS_PER_BLOCK:] if last_blocks else []


def _feed_reader(feeds: Iterable[dict[str, np.ndarray]]):
    from onnxruntime.quantization import CalibrationDataReader

    class FeedReader(CalibrationDataReader):
        """Hands ``quantize_static`` one feed at a time."""

        def __init__(self) -> None:
            self._feeds = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._feeds, None)

    return FeedReader()


def _no_preprocessing_advice(record: logging.LogRecord) -> bool:
    """Drop the quantizers' root-logger advice to run ``quant_pre_process`` first: its symbolic shape inference
    fails on the graphs of the dynamo exporter (onnxruntime 1.32, ``TypeError`` in a MatMul shape), so it is not
    run."""
    return not record.getMessage().startswith(("Please consider to run pre-processing",
                                               "Please consider pre-processing"))


def quantize_int8(titok_graph: str | os.PathLike, encoder_graph: str | os.PathLike,
                  settings: Int8Settings = Int8Settings(), calibration: CalibrationInputs | None = None
                  ) -> dict[str, Any]:
    """Quantize an export's graphs (the TiTok graph only with scope ``all``) to int8 in place; returns the
    settings for config.json. ``Int8SettingsError`` for static mode without ``calibration`` or too many fp32
    blocks."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    if settings.mode == "static" and calibration is None:
        raise Int8SettingsError("static int8 quantization needs a calibration set")
    titok_graph, encoder_graph = Path(titok_graph), Path(encoder_graph)
    graphs = [encoder_graph] if settings.scope == "encoder" else [titok_graph, encoder_graph]
    excluded = titok_block_matmuls(titok_graph, settings.titok_fp32_blocks)
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[settings.calibration_method]
    root = logging.getLogger()
    root.addFilter(_no_preprocessing_advice)
    try:
        for source in graphs:
            target = source.with_name(f".{source.name}.int8")
            exclude = excluded if source == titok_graph else []
            if settings.mode == "dynamic":
                quantize_dynamic(source, target, weight_type=QuantType.QInt8, op_types_to_quantize=list(DYNAMIC_OPS),
                                 nodes_to_exclude=exclude)
            else:
                feeds = calibration.titok if source == titok_graph else calibration.encoder
                with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print their progress
                        quantize_static(source, target, _feed_reader(feeds), quant_format=QuantFormat.QDQ,
                                    op_types_to_quantize=list(STATIC_OPS), per_channel=True,
                                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                    calibrate_method=method, nodes_to_exclude=exclude,
                                    extra_options={"MatMulConstBOnly": True})
            os.replace(target, source)
    finally:
        root.removeFilter(_no_preprocessing_advice)
    recorded = {"method": f"onnxruntime.quantization.quantize_{settings.mode}", **asdict(settings),
                "op_types": list(DYNAMIC_OPS if settings.mode == "dynamic" else STATIC_OPS),
                "weight_type": "QInt8", "quantized_graphs": [graph.name for graph in graphs],
                "titok_fp32_matmuls": excluded}
    if settings.mode == "static":
        recorded.update(format="QDQ", per_channel=True, activation_type="QUInt8", matmul_const_b_only=True,
                        calibration_images=calibration.n_images)
    return recorded
