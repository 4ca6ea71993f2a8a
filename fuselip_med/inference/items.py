"""What the inference engine embeds: an :class:`EmbedItem` is an image only, a text only, or an (image, text)
pair embedded as one fused sequence; its ``key`` names it, and two items with the same key are one input.

Image keys come from the path (``str``/``PathLike``: ``path:<path>``, the file is not read) or from the content
(bytes, PIL images, arrays, tensors: ``data.hashing.content_hash``, the SHA-256 the search index stores in its
``content_hash`` column); ``image_key=`` names an image yourself (e.g. the dataset's image id).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from fuselip_med.data.hashing import content_hash

__all__ = ["EmbedItem", "image_key", "sample_image_key"]


def image_key(source: Any) -> str:
    """A stable identity for an image input: ``path:<path>`` for a path, else its content hash (64 hex digits,
    ``data.hashing.content_hash``: equal to the search index's hash of the same encoded bytes). Raises
    ``TypeError`` for anything that is not a path, encoded bytes, a PIL image, an array or a tensor."""
    if isinstance(source, (str, os.PathLike)):
        return "path:" + os.fspath(source)
    image_like = (isinstance(source, (bytes, bytearray, memoryview))
                  or (hasattr(source, "detach") and hasattr(source, "cpu"))  # torch tensor
                  or (hasattr(source, "__array_interface__") or hasattr(source, "__array__")))  # array, PIL image
    if not image_like:
        raise TypeError(f"cannot use a {type(source).__name__} as an image input; "
                        "give a path, encoded bytes, a PIL image, an array or a tensor")
    return content_hash(source)


def sample_image_key(sample, image) -> str:
    """The embedding key of one of a ``Sample``'s images: its path's key, else ``source:image_id`` (bytes,
    arrays and decoded images are keyed by the dataset's id)."""
    if isinstance(image, (str, os.PathLike)):
        return image_key(image)
    return f"{sample.source}:{sample.meta.get('image_id', sample.id)}"


@dataclass(frozen=True, eq=False)
class EmbedItem:
    """One model input: image only, text only, or an (image, text) pair (fused).

    ``image``: any input ``data.images.decode_image`` reads (path, encoded bytes, PIL image, array) or, with a
    custom decoder, what that decoder takes; ``text``: a str (``""`` with an image is still a fused pair, the
    reference's ``force_fused``); ``image_key``: computed from ``image`` when not given. Raises ``ValueError``
    with neither, ``TypeError`` for a text that is not a str.
    """

    image: Any = None
    text: str | None = None
    image_key: str | None = None

    def __post_init__(self):
        if self.image is None and self.text is None:
            raise ValueError("an EmbedItem needs an image, a text or both")
        if self.text is not None and not isinstance(self.text, str):
            raise TypeError(f"text must be a str, got {type(self.text).__name__}")
        if self.image is not None and self.image_key is None:
            object.__setattr__(self, "image_key", image_key(self.image))

    @property
    def kind(self) -> str:
        """``text``, ``image`` or ``pair``."""
        if self.image is None:
            return "text"
        return "image" if self.text is None else "pair"

    @property
    def key(self) -> tuple:
        """``("text", text)``, ``("image", image_key)`` or ``("pair", image_key, text)``."""
        kind = self.kind
        if kind == "text":
            return ("text", self.text)
        if kind == "image":
            return ("image", self.image_key)
        return ("pair", self.image_key, self.text)

    @classmethod
    def of_image(cls, image, key: str | None = None) -> EmbedItem:
        return cls(image=image, image_key=key)

    @classmethod
    def of_text(cls, text: str) -> EmbedItem:
        return cls(text=text)

    @classmethod
    def of_pair(cls, image, text: str, key: str | None = None) -> EmbedItem:
        return cls(image=image, text=text, image_key=key)
