"""The inference engine's result: unit-length vectors of unique inputs, looked up by ``EmbedItem.key``."""
from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

import torch

from fuselip_med.data.skips import SkipReport

__all__ = ["EmbeddingTable"]


@dataclass
class EmbeddingTable:
    """Embeddings of unique inputs: row i of ``embeddings`` (``[N, D]`` float32, L2-normalised) belongs to
    ``keys[i]``.

    ``failed`` maps the keys of inputs that could not be embedded (an image the data layer's ``SampleDataset``
    skipped) to the skip's reason (``data.images.ImageDecodeError.reason``: the reason training and every skip
    report use); they have no row. ``name_skip`` writes one into a caller's ``SkipReport`` under its row id.
    Raises ``ValueError`` when keys and rows disagree or keys repeat.
    """

    keys: list[Hashable]
    embeddings: torch.Tensor
    failed: dict[Hashable, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.embeddings.ndim != 2 or self.embeddings.shape[0] != len(self.keys):
            raise ValueError(f"{len(self.keys)} keys but embeddings of shape {tuple(self.embeddings.shape)}")
        self._index = {k: i for i, k in enumerate(self.keys)}
        if len(self._index) != len(self.keys):
            raise ValueError("EmbeddingTable keys must be unique")

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key) -> bool:
        return key in self._index

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def index_of(self, keys: Iterable[Hashable]) -> torch.Tensor:
        """Row numbers ``[K]`` int64 of ``keys`` (KeyError naming the first missing key)."""
        try:
            return torch.tensor([self._index[k] for k in keys], dtype=torch.int64)
        except KeyError as e:
            raise KeyError(f"no embedding for {e.args[0]!r}") from None

    def lookup(self, keys: Iterable[Hashable]) -> torch.Tensor:
        """``[K, D]`` float32 embeddings in the order of ``keys``; repeated keys give repeated rows."""
        return self.embeddings[self.index_of(keys)]

    def __getitem__(self, key: Hashable) -> torch.Tensor:
        return self.embeddings[self._index[key]]

    def name_skip(self, report: SkipReport, key: Hashable, row_id: object, source: object,
                  missing: str = "not embedded") -> bool:
        """When input ``key`` has no row, name it in ``report`` as row ``row_id`` from ``source`` with its skip
        reason (``missing`` when it was never embedded); returns whether it was named. ``embed``, ``index
        build`` and ``eval`` name their undecodable rows this way, so each gets the same reason."""
        if key in self._index:
            return False
        report.add(row_id, source, self.failed.get(key, missing))
        return True

    def extended(self, other: EmbeddingTable) -> EmbeddingTable:
        """A table with this table's rows followed by ``other``'s rows for keys not already here."""
        new = [i for i, k in enumerate(other.keys) if k not in self._index]
        if not new:
            failed = {**self.failed, **{k: v for k, v in other.failed.items() if k not in self._index}}
            return EmbeddingTable(list(self.keys), self.embeddings, failed)
        if len(self) and self.dim != other.dim:
            raise ValueError(f"cannot merge embeddings of dimension {self.dim} and {other.dim}")
        emb = other.embeddings[new] if not len(self) else torch.cat([self.embeddings, other.embeddings[new]])
        keys = list(self.keys) + [other.keys[i] for i in new]
        have = set(keys)
        failed = {k: v for k, v in {**self.failed, **other.failed}.items() if k not in have}
        return EmbeddingTable(keys, emb, failed)

    @classmethod
    def empty(cls, dim: int = 0) -> EmbeddingTable:
        return cls([], torch.empty((0, dim), dtype=torch.float32))
