"""Hub I/O shared by fuselip_med's model classes: one atomic save path, ``from_pretrained``, model cards, push.

``HubModelMixin`` is ``huggingface_hub.PyTorchModelHubMixin`` with the pieces every fuselip_med model needs:
``save_pretrained`` writes ``config.json`` + ``model.safetensors`` (+ a ``README.md`` model card) atomically
(temp directory, then rename); ``from_pretrained`` takes a hub id or a local folder/file and reads it with the
class's ``read_pretrained`` (our layout by default; ``FuseLIP`` adds the released and training formats);
``push_to_hub`` is the mixin's. A model class only needs a ``config`` dataclass with ``to_dict``/``from_dict``
and ``config_class`` naming it. Nothing here imports a model class, so ``core/`` stays free of cycles.

Only ``safetensors`` and ``torch.load(weights_only=True)`` read weights: nothing in a checkpoint is executed.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData, PyTorchModelHubMixin
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fuselip_med.errors import UserError
from fuselip_med.io import atomic_directory

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
CARD_NAME = "README.md"
LIBRARY_NAME = "fuselip_med"
CARD_TAGS = ("fuselip-med", "multimodal", "embeddings", "medical-imaging", "radiology")
MAX_LISTED_KEYS = 8


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read as a model: a damaged file, a bad config, keys/shapes that do not match."""


# --------------------------------------------------------------------------------------------------------
# atomic directories
def write_directory_atomically(target: str | os.PathLike, fill: Callable[[Path], Any]) -> Path:
    """Run ``fill(tmp)`` on a fresh temp sibling directory, then swap it in for ``target``
    (``fuselip_med.io.atomic_directory``); on any failure ``target`` keeps its previous content."""
    with atomic_directory(target) as tmp:
        fill(tmp)
    return Path(target)


# --------------------------------------------------------------------------------------------------------
# reading files, every failure a one-line CheckpointError naming the file
def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message (library errors can span a screen)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; a missing, unreadable or non-object file is a ``CheckpointError``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; a model folder needs its {path.name}.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        message = f"{path} is not valid JSON ({first_line(error)}); restore it from the model's source."
        raise CheckpointError(message) from error
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a JSON {type(data).__name__}, not an object of config values.")
    return data


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` file on CPU; a damaged header or truncated file is a ``CheckpointError``."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(
            f"{path} is damaged ({first_line(error)}); re-download or re-save the model."
        ) from error


def read_torch_weights(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU; truncated files and pickled code are a ``CheckpointError``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means an unsafe or broken file
        raise CheckpointError(
            f"Could not read {path} with torch.load(weights_only=True): {first_line(error)}. The file is damaged "
            "or holds more than tensors; only plain tensor checkpoints are accepted."
        ) from error


def resolve_pretrained(
    name_or_path: str | os.PathLike, *, allow_patterns: Sequence[str] | None = None, **hub_kwargs: Any
) -> Path:
    """A local file/folder, or a hub repo id downloaded with ``snapshot_download`` (``hub_kwargs``: revision,
    cache_dir, token, force_download, local_files_only; only those given are passed on).
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    name = str(name_or_path)
    if not is_hub_id(name):
        raise CheckpointError(
            f"No checkpoint at {name!r}: give a local directory/file or a hub id like chs20/FuseLIP-S-CC3M-MM."
        )
    from huggingface_hub import snapshot_download

    given = {key: value for key, value in hub_kwargs.items() if value not in (None, False)}
    try:
        return Path(snapshot_download(name, allow_patterns=list(allow_patterns) if allow_patterns else None, **given))
    except Exception as error:  # noqa: BLE001 - network/auth errors become one clear message
        raise CheckpointError(
            f"No local folder {name!r}, and it could not be downloaded from the Hugging Face Hub: {first_line(error)}"
        ) from error


def is_hub_id(reference: str | os.PathLike | None) -> bool:
    """Whether ``reference`` reads as a Hub repo id (``owner/name``) and is not a path on this machine."""
    name = str(reference or "")
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).exists()


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, names sorted: the same weights give the same hash
    whatever file format held them (released ``pytorch_model.bin`` or our ``model.safetensors``).
    """
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy
    return digest.hexdigest()


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED_KEYS])
    return shown + (f", ... and {len(names) - MAX_LISTED_KEYS} more" if len(names) > MAX_LISTED_KEYS else "")


def load_state_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load weights, failing with one line listing missing/unexpected/mis-shaped keys (first few of each).

    Raises ``CheckpointError`` naming ``source`` when the checkpoint does not match the model built from its config.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state_dict)
        if tuple(state_dict[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_listed(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_listed(unexpected)}")
        if wrong_shape:
            parts.append(f"wrong shapes ({len(wrong_shape)}): {'; '.join(wrong_shape[:MAX_LISTED_KEYS])}")
        raise CheckpointError(f"Checkpoint {source} does not match the model: " + " | ".join(parts))
    model.load_state_dict(state_dict, strict=True)


# --------------------------------------------------------------------------------------------------------
# model cards
def model_card(
    *,
    title: str,
    summary: str,
    sections: Sequence[str] = (),
    base_model: str | None = None,
    datasets: Sequence[str] = (),
    eval_results: Sequence[EvalResult] = (),
    tags: Sequence[str] = (),
    license: str | None = None,
) -> ModelCard:
    """A ``huggingface_hub.ModelCard`` with Hub metadata (library, license, base_model, datasets, tags,
    model-index from ``eval_results``) and a markdown body: ``# title``, ``summary``, then ``sections``.

    ``base_model`` and ``datasets`` must be Hub ids (the Hub validates them); give local paths in the body instead.
    """
    data = ModelCardData(
        library_name=LIBRARY_NAME,
        license=license,
        base_model=base_model,
        datasets=list(datasets) or None,
        tags=sorted(set(CARD_TAGS) | set(tags)),
        model_name=title,
        eval_results=list(eval_results) or None,
    )
    body = "\n\n".join([f"# {title}", summary.strip(), *[s.strip() for s in sections if s.strip()]])
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")


# --------------------------------------------------------------------------------------------------------
# the mixin
class HubModelMixin(PyTorchModelHubMixin, library_name=LIBRARY_NAME, tags=list(CARD_TAGS)):
    """``PyTorchModelHubMixin`` for fuselip_med models: atomic ``save_pretrained``, any-layout ``from_pretrained``.

    Subclasses set ``config_class`` (a dataclass with ``to_dict``/``from_dict``), keep it as ``self.config``,
    take it as the first ``__init__`` argument, and may override ``read_pretrained`` to read more layouts.
    """

    config_class: ClassVar[type]
    config: Any

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        model_card_kwargs: dict[str, Any] | None = None,
        push_to_hub: bool = False,
        repo_id: str | None = None,
        **push_to_hub_kwargs: Any,
    ) -> str | None:
        """Write ``config.json`` + ``model.safetensors`` + ``README.md`` into ``save_directory`` atomically (a temp
        sibling renamed over it; a failure leaves the previous content). With ``push_to_hub=True`` the model is
        then uploaded to ``repo_id`` (default: the folder name) with the mixin's ``push_to_hub``.
        """
        mixin_save = super().save_pretrained
        write_directory_atomically(save_directory, lambda tmp: mixin_save(tmp, model_card_kwargs=model_card_kwargs))
        if push_to_hub:
            return self.push_to_hub(repo_id or Path(save_directory).name, model_card_kwargs=model_card_kwargs,
                                    **push_to_hub_kwargs)
        return None

    def _save_pretrained(self, save_directory: Path) -> None:
        """The one weight writer: ``state_dict()`` as safetensors (FuseLIP's tied MMM decoder is no separate
        parameter, so every tensor is stored once), plus ``config.to_dict()`` as config.json."""
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(save_directory / SAFETENSORS_NAME), metadata={"format": "pt", "library": LIBRARY_NAME})
        (save_directory / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2))

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        """The card ``save_pretrained`` writes when the folder has none (training writes a richer one)."""
        name = type(self).__name__
        return model_card(
            title=kwargs.get("title", name),
            summary=kwargs.get("summary", f"A {name} model saved with fuselip_med. Load it with "
                                          f"`{name}.from_pretrained(path_or_repo_id)` or `fuselip_med.load_model`."),
            license=kwargs.get("license"),
            tags=self._hub_mixin_info.model_card_data.tags or (),
        )

    @classmethod
    def read_pretrained(cls, path: Path) -> tuple[Any, dict[str, torch.Tensor], str, str]:
        """(config, state dict, format name, source description) for our layout: config.json + model.safetensors."""
        folder = path if path.is_dir() else path.parent
        weights = path if path.is_file() else folder / SAFETENSORS_NAME
        if not weights.exists():
            raise CheckpointError(
                f"{folder} holds no {SAFETENSORS_NAME}; point at a folder written by save_pretrained."
            )
        config = config_from_file(cls.config_class, folder / CONFIG_NAME)
        return config, read_safetensors(weights), "safetensors", f"{weights} (architecture from {CONFIG_NAME})"

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        force_download: bool = False,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        revision: str | None = None,
        map_location: str | torch.device = "cpu",
    ):
        """Build the model from a hub id, a local folder or a single weights file, in eval mode on ``map_location``.

        Weights load strictly: a damaged file, an invalid config or keys/shapes that do not match the config raise
        ``CheckpointError`` with one line naming the file.
        """
        path = resolve_pretrained(
            pretrained_model_name_or_path, allow_patterns=cls.hub_allow_patterns(), revision=revision,
            cache_dir=cache_dir, token=token, force_download=force_download, local_files_only=local_files_only,
        )
        config, state_dict, _, source = cls.read_pretrained(path)
        try:
            model = cls(config)
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"The config of {source} does not describe a buildable model: {error}") from error
        load_state_strict(model, state_dict, source)
        return model.to(map_location).eval()

    @classmethod
    def hub_allow_patterns(cls) -> list[str]:
        """Files ``from_pretrained`` downloads from a hub repo."""
        return [CONFIG_NAME, SAFETENSORS_NAME]


def config_from_file(config_class: type, path: Path) -> Any:
    """``config_class.from_dict`` of a config.json; a missing/invalid file or value is a ``CheckpointError``."""
    data = read_json(path)
    try:
        return config_class.from_dict(data)
    except (TypeError, ValueError, KeyError, AttributeError) as error:
        raise CheckpointError(f"{path} is not a valid {config_class.__name__}: {first_line(error)}") from error
