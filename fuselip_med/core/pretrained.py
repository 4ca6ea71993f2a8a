"""``HubModelMixin``: ``huggingface_hub.PyTorchModelHubMixin`` with what every fuselip_med model class needs.

``save_pretrained`` writes ``config.json`` + ``model.safetensors`` (+ a ``README.md`` model card) atomically (temp
directory, then rename); ``from_pretrained`` takes a hub id or a local folder/file in any layout
``core.checkpoints`` reads; ``push_to_hub`` is the mixin's. A model class only needs a ``config`` dataclass with
``to_dict``/``from_dict`` and ``config_class`` naming it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar

import torch
from huggingface_hub import ModelCard, PyTorchModelHubMixin
from safetensors.torch import save_file

from fuselip_med.core.checkpoints import MODEL_FILES, read_model_files
from fuselip_med.core.hub import (
    CARD_TAGS,
    CONFIG_NAME,
    LIBRARY_NAME,
    SAFETENSORS_NAME,
    CheckpointError,
    load_state_strict,
    model_card,
    resolve_pretrained,
    write_directory_atomically,
)

__all__ = ["HubModelMixin", "save_pretrained"]


class HubModelMixin(PyTorchModelHubMixin, library_name=LIBRARY_NAME, tags=list(CARD_TAGS)):
    """``PyTorchModelHubMixin`` for fuselip_med models: atomic ``save_pretrained``, any-layout ``from_pretrained``.

    Subclasses set ``config_class`` (a dataclass with ``to_dict``/``from_dict``), keep it as ``self.config`` and
    take it as the first ``__init__`` argument. They know no file format: ``from_pretrained`` reads every layout
    through ``core.checkpoints.read_model_files``.
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
            pretrained_model_name_or_path, allow_patterns=MODEL_FILES, revision=revision,
            cache_dir=cache_dir, token=token, force_download=force_download, local_files_only=local_files_only,
        )
        config, state_dict, _, source = read_model_files(path, config_class=cls.config_class)
        if not isinstance(config, cls.config_class):
            raise CheckpointError(f"{source} is a {getattr(config, 'arch', type(config).__name__)} checkpoint, not "
                                  f"{cls.__name__}; load it with fuselip_med.load_model or its own class.")
        try:
            model = cls(config)
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"The config of {source} does not describe a buildable model: {error}") from error
        load_state_strict(model, state_dict, source)
        return model.to(map_location).eval()


def save_pretrained(model: HubModelMixin, directory: str | os.PathLike) -> Path:
    """The function form of ``HubModelMixin.save_pretrained`` (config.json + model.safetensors + README.md,
    atomic) for any fuselip_med model class; returns the path. Called on the mixin itself, so a model class that
    overrides ``save_pretrained`` with a call to this function does not recurse."""
    HubModelMixin.save_pretrained(model, directory)
    return Path(directory)
