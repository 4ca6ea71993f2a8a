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
from fuselip_med.export.onnx import ENCODER_GRAPH, EXPORT_CONFIG, FORMAT, REPORT_NAME, TITOK_GRAPH

__all__ = ["RUNTIMES", "ExportDamagedError", "ExportNotFoundError", "OnnxFuseLIP", "RuntimeChoiceError",
           "export_fingerprint", "graph_digests", "is_export_dir", "load_for_runtime", "require_onnxruntime"]

RUNTIMES = ("pytorch", "onnx")


class ExportNotFoundError(UserError, ValueError):
    """``--runtime onnx`` was given a path that is not an export written by ``fuselip-med export``."""


class ExportDamagedError(UserError, ValueError):
    """An export folder whose config.json, tokenizer file or graph is missing, unreadable, or changed since the
    quality gate recorded it (the message names the file)."""


class ExportRejectedError(UserError, ValueError):
    """An export whose quality gate failed (``--keep-rejected`` keeps it for inspection, not for use)."""


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


def graph_digests(directory: str | os.PathLike) -> tuple[str, dict[str, str]]:
    """(the export fingerprint, {graph file: sha256 hex of its bytes}) of an export's two graphs, read once.

    The fingerprint is sha256 over each graph's name and bytes in a fixed order (titok, encoder): two exports with
    the same bytes get the same fingerprint, a changed weight gives another. Raises ``OSError`` for a missing or
    unreadable graph."""
    combined, each = hashlib.sha256(), {}
    for name in (TITOK_GRAPH, ENCODER_GRAPH):
        combined.update(name.encode())
        own = hashlib.sha256()
        with open(Path(directory) / name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                combined.update(block)
                own.update(block)
        each[name] = own.hexdigest()
    return combined.hexdigest(), each


def export_fingerprint(directory: str | os.PathLike) -> str:
    """sha256 hex digest of an export's graphs (``graph_digests``' fingerprint)."""
    return graph_digests(directory)[0]


def _onnxruntime_errors() -> tuple[type[BaseException], ...]:
    """The exceptions ONNX Runtime raises for a graph it cannot load (its C++ status codes as Python classes)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return tuple(getattr(state, name) for name in ("Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf",
                                                   "NoModel", "NoSuchFile", "NotImplemented", "RuntimeException")
                 if hasattr(state, name))


def _session(path: Path, threads: int | None, input_name: str):
    """An ONNX Runtime CPU session of the graph at ``path``, whose one input must be ``input_name``; raises
    ``ExportDamagedError`` naming the file when it does not load or takes another input."""
    ort = require_onnxruntime()

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only: no notes about unused initializers
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except _onnxruntime_errors() as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise ExportDamagedError(f"{path} is not a readable ONNX graph ({reason}); write the export again with "
                                 "`fuselip-med export`.") from None
    inputs = [node.name for node in session.get_inputs()]
    if inputs != [input_name]:
        raise ExportDamagedError(f"{path} takes {', '.join(inputs) or 'no input'}, not {input_name}: it is not the "
                                 f"{path.name} of an export; write the export again with `fuselip-med export`.")
    return session


def _export_config(directory: Path) -> tuple[dict[str, Any], FuseLIPConfig]:
    """(config.json of an export, its FuseLIP config) with the fields the runtime reads checked;
    ``ExportDamagedError`` naming the file."""
    path = directory / EXPORT_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        model = FuseLIPConfig.from_dict(config["model"])
        tokenizer = config["tokenizer"]
        missing = [f"tokenizer.{key}" for key in ("bpe", "context_length", "mask_token") if key not in tokenizer]
        missing += [key for key in ("precision",) if key not in config]
    except (OSError, ValueError, KeyError, TypeError) as error:
        missing = [f"{type(error).__name__}: {error}"]
    if missing:
        raise ExportDamagedError(f"{path} is damaged ({', '.join(missing)} missing or unreadable); write the export "
                                 "again with `fuselip-med export`.")
    return config, model


def _check_report(directory: Path, digests: dict[str, str]) -> None:
    """Hold the export to what its quality gate recorded in ``export_report.json`` (an export without a report is
    not checked): ``ExportRejectedError`` when the gate failed (a ``--keep-rejected`` export is for inspection, not
    for embedding), ``ExportDamagedError`` naming each graph whose sha256 differs from the recorded ``graphs``."""
    try:
        report = json.loads((directory / REPORT_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(report, dict):
        return
    if report.get("passed") is False:
        failures = "; ".join(map(str, report.get("failures", []))) or "see its report"
        raise ExportRejectedError(f"{directory} missed its quality gate ({failures}); it was kept for inspection "
                                  "only: write an export that passes (e.g. another --int8-mode/--int8-scope).")
    recorded = report.get("graphs")
    if not isinstance(recorded, dict):
        return
    changed = [name for name, digest in digests.items() if recorded.get(name) not in (None, digest)]
    if changed:
        raise ExportDamagedError(f"{', '.join(str(directory / name) for name in changed)} changed since the export "
                                 f"passed its quality gate (sha256 differs from {REPORT_NAME}); write the export "
                                 "again with `fuselip-med export`.")


class OnnxFuseLIP(JointInputs):
    """A FuseLIP export (``fuselip-med export``) run with ONNX Runtime; ``encode`` as ``FuseLIP.encode``.

    ``threads``: ONNX Runtime intra-op threads (default: its own choice, one per physical core).
    ``fingerprint``: ``export_fingerprint`` of the graphs and ``graph_digests`` {graph file: sha256}, read once at
    load. Raises ``ExportNotFoundError`` when
    ``directory`` is not an export, ``ExportDamagedError`` naming the file when its config.json, BPE file or a
    graph is missing or unreadable, a graph is not the one its name says, or a graph's sha256 differs from the one
    the quality gate recorded (export_report.json); ``ExportRejectedError`` for an export that missed its gate.
    """

    def __init__(self, directory: str | os.PathLike, threads: int | None = None):
        self.directory = Path(directory)
        if not is_export_dir(self.directory):
            raise ExportNotFoundError(f"{self.directory} is not an ONNX export (no config.json of format {FORMAT}); "
                                      "write one with `fuselip-med export -m MODEL --out DIR`.")
        self.export_config, self.config = _export_config(self.directory)
        tokenizer = self.export_config["tokenizer"]
        needed = [self.directory / name for name in (tokenizer["bpe"], TITOK_GRAPH, ENCODER_GRAPH)]
        for path in needed:
            if not path.is_file():
                raise ExportDamagedError(f"{path} is missing from the export; write the export again with "
                                         "`fuselip-med export`.")
        self.fingerprint, self.graph_digests = graph_digests(self.directory)
        _check_report(self.directory, self.graph_digests)
        self.tokenizer = TextTokenizer(context_length=tokenizer["context_length"],
                                       add_mask_token=tokenizer["mask_token"], bpe_path=needed[0])
        self.device = torch.device("cpu")
        self._titok = _session(self.directory / TITOK_GRAPH, threads, "pixels")
        self._encoder = _session(self.directory / ENCODER_GRAPH, threads, "input_ids")

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
        return model, ModelId(str(name), model.fingerprint, "onnx")
    from fuselip_med.core.loading import load_model

    model, _, _ = load_model(name, device or ("cuda" if torch.cuda.is_available() else "cpu"), base=base)
    return model, ModelId(str(name), model_fingerprint(model))
