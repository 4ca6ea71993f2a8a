"""An ONNX export run with ONNX Runtime behind FuseLIP's ``encode(images=, texts=)`` surface, and the choice of
runtime (``pytorch`` or ``onnx``) for the commands that embed (``embed``, ``index build``, ``search``, ``serve``).

Sequences are built by the same code as in PyTorch (``core.fuselip.JointInputs``): texts are tokenized with the
export's own CLIP BPE file, images go through ``titok.onnx`` (pixels -> codes), the joint ids through
``encoder.onnx`` (ids -> unit embeddings). Runs on the CPU (``CPUExecutionProvider``).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from fuselip_med.core.configs import FuseLIPConfig
from fuselip_med.core.fuselip import JointInputs
from fuselip_med.core.text_tokenizer import TextTokenizer
from fuselip_med.core.titok import check_pixels
from fuselip_med.errors import UserError
from fuselip_med.export.onnx import ENCODER_GRAPH, EXPORT_CONFIG, FORMAT, TITOK_GRAPH

__all__ = ["RUNTIMES", "ExportNotFoundError", "OnnxFuseLIP", "RuntimeChoiceError", "export_fingerprint",
           "is_export_dir", "load_for_runtime", "require_onnxruntime"]

RUNTIMES = ("pytorch", "onnx")


class ExportNotFoundError(UserError, ValueError):
    """``--runtime onnx`` was given a path that is not an export written by ``fuselip-med export``."""


class RuntimeChoiceError(UserError, ValueError):
    """An unknown ``--runtime``, or an option the runtime cannot take."""


def require_onnxruntime():
    """The ``onnxruntime`` module, or a ``UserError`` saying how to install it (the ``export`` extra)."""
    try:
        import onnxruntime
    except ImportError as error:
        raise UserError(f"ONNX export and --runtime onnx need ONNX Runtime ({error}); install it with: "
                        "pip install 'fuselip_med[export]'.") from None
    return onnxruntime


def is_export_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a config.json of format ``fuselip_med-onnx``."""
    config = Path(path) / EXPORT_CONFIG
    try:
        return config.is_file() and json.loads(config.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def export_fingerprint(directory: str | os.PathLike) -> str:
    """sha256 hex digest of an export's graphs (both ``.onnx`` files, in a fixed order): two exports with the same
    bytes get the same fingerprint, a changed weight gives another."""
    digest = hashlib.sha256()
    for name in (TITOK_GRAPH, ENCODER_GRAPH):
        digest.update(name.encode())
        with open(Path(directory) / name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _session(path: Path, threads: int | None):
    ort = require_onnxruntime()

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only: no notes about unused initializers
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxFuseLIP(JointInputs):
    """A FuseLIP export (``fuselip-med export``) run with ONNX Runtime; ``encode`` as ``FuseLIP.encode``.

    ``threads``: ONNX Runtime intra-op threads (default: its own choice, one per physical core).
    Raises ``ExportNotFoundError`` when ``directory`` is not an export.
    """

    def __init__(self, directory: str | os.PathLike, threads: int | None = None):
        self.directory = Path(directory)
        if not is_export_dir(self.directory):
            raise ExportNotFoundError(f"{self.directory} is not an ONNX export (no config.json of format {FORMAT}); "
                                      "write one with `fuselip-med export -m MODEL --out DIR`.")
        self.export_config: dict[str, Any] = json.loads((self.directory / EXPORT_CONFIG).read_text())
        self.config = FuseLIPConfig.from_dict(self.export_config["model"])
        tokenizer = self.export_config["tokenizer"]
        self.tokenizer = TextTokenizer(context_length=tokenizer["context_length"],
                                       add_mask_token=tokenizer["mask_token"],
                                       bpe_path=self.directory / tokenizer["bpe"])
        self.device = torch.device("cpu")
        self._titok = _session(self.directory / TITOK_GRAPH, threads)
        self._encoder = _session(self.directory / ENCODER_GRAPH, threads)

    @property
    def precision(self) -> str:
        return str(self.export_config["precision"])

    @property
    def embed_dim(self) -> int:
        return self.config.width

    def image_codes(self, pixels: torch.Tensor) -> torch.Tensor:
        """TiTok code ids [B, 128] int64 for pixels [B, 3, 256, 256] float32 in [0, 1] (``ValueError`` otherwise)."""
        check_pixels(pixels, self.config.titok.image_size)
        array = np.ascontiguousarray(pixels.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self._titok.run(None, {"pixels": array})[0])

    def encode_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Unit embeddings [B, D] float32 for joint ids [B, L] int64 (0 = padding)."""
        array = np.ascontiguousarray(input_ids.cpu().numpy(), dtype=np.int64)
        return torch.from_numpy(self._encoder.run(None, {"input_ids": array})[0])

    def encode(
        self,
        images: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
        texts: Sequence[str | None] | torch.Tensor | None = None,
        *,
        image_mask: torch.Tensor | None = None,
        image_ids: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
        normalize: bool = True,
    ) -> torch.Tensor:
        """Embed a batch [B, D] float32 like ``FuseLIP.encode`` (same arguments). The exported graph ends with
        the L2 normalisation, so ``normalize=False`` is a ``ValueError``."""
        if not normalize:
            raise ValueError("an ONNX export gives L2-normalised embeddings only (normalize=False is not exported)")
        return self.encode_ids(self.prepare_inputs(images, texts, image_mask=image_mask, image_ids=image_ids))

    def eval(self) -> "OnnxFuseLIP":
        return self

    def train(self, mode: bool = True) -> "OnnxFuseLIP":
        if mode:
            raise ValueError("an ONNX export is for inference only")
        return self


def load_for_runtime(name: str | os.PathLike, runtime: str = "pytorch", device: str | torch.device | None = None,
                     base: str | os.PathLike | None = None):
    """(model, ``search.index.ModelId``) for ``runtime``: ``pytorch`` loads a checkpoint or LoRA adapter
    (``fuselip_med.load_model`` on ``device``, default cuda when available; fingerprint = weights sha256),
    ``onnx`` an export directory (fingerprint = ``export_fingerprint``; CPU only, ``base`` not allowed). Raises
    ``RuntimeChoiceError`` for an unknown runtime, ``ExportNotFoundError`` / ``CheckpointError`` when the model
    cannot be read."""
    from fuselip_med.search.index import ModelId, model_fingerprint

    if runtime not in RUNTIMES:
        raise RuntimeChoiceError(f"--runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}.")
    if runtime == "onnx":
        if base is not None:
            raise RuntimeChoiceError("--base applies to LoRA adapters; an ONNX export already holds the merged "
                                     "weights.")
        model = OnnxFuseLIP(name)
        return model, ModelId(str(name), export_fingerprint(name), "onnx")
    from fuselip_med.core.loading import load_model

    model, _, _ = load_model(name, device or ("cuda" if torch.cuda.is_available() else "cpu"), base=base)
    return model, ModelId(str(name), model_fingerprint(model))
