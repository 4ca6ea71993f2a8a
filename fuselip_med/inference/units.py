"""Series and study embeddings from the 2-D encoder: the model stays 2-D, a study is embedded through its slices.

* each series: ``slices`` slices sampled evenly along its axis (``data.volumes.sample_slices``), rendered
  (``data.volumes.Rendering``) and embedded by the encoder through the one embedding pass
  (``inference.engine.embed_items``);
* series vector = renormalised mean of its L2-normalised slice vectors (``pool``); study vector = the same over
  its series vectors; slice vectors are kept, so search can answer with the best-matching slice.

Series are embedded one at a time, so memory holds the sampled slices of one series, whatever its length.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from fuselip_med.data.skips import SkipReport
from fuselip_med.data.studies import Series, SliceRef
from fuselip_med.data.volumes import NO_FINITE_VOXELS, Rendering, render_slice, sample_slices

__all__ = ["SeriesEmbedding", "StudyEmbedding", "UnitOptions", "UnitRow", "embed_series", "pool",
           "pool_studies", "unit_rows"]

def pool(vectors: np.ndarray) -> np.ndarray:
    """The unit vector of a set: ``normalize(mean_i normalize(v_i))``; ``vectors`` [N, D] -> float32 [D]
    (the mean of cosine-space points, projected back to the sphere)."""
    vectors = np.asarray(vectors, dtype=np.float64)
    if vectors.ndim != 2 or not len(vectors):
        raise ValueError(f"pool needs [N, D] vectors with N >= 1, got shape {vectors.shape}")
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    mean = unit.mean(axis=0)
    return (mean / np.linalg.norm(mean)).astype(np.float32)


@dataclass(frozen=True)
class UnitOptions:
    """How series are embedded: ``slices`` sampled per series (>= 1), their ``rendering``."""

    slices: int = 16
    rendering: Rendering = field(default_factory=Rendering)

    def __post_init__(self) -> None:
        if self.slices < 1:
            raise ValueError(f"--slices {self.slices}: sample at least one slice per series")

    def describe(self) -> dict:
        return {"slices": self.slices, "rendering": self.rendering.describe()}


@dataclass
class SeriesEmbedding:
    """A series with its sampled slices: ``slice_keys`` [k], ``positions`` [k] (mm), ``slice_vectors``
    [k, D] float32 (L2-normalised), ``vector`` [D] float32 = ``pool(slice_vectors)``, ``images`` [k] the
    rendered uint8 slices (for thumbnails; None unless asked for)."""

    series: Series
    slice_keys: list[str]
    positions: list[float | None]
    slice_vectors: np.ndarray
    vector: np.ndarray
    images: list[np.ndarray] | None = None


@dataclass
class StudyEmbedding:
    """A study: its key, its series (in key order) and ``vector`` [D] float32 = ``pool`` of their vectors."""

    key: str
    series: list[SeriesEmbedding]
    vector: np.ndarray


def _render_sampled(series: Series, options: UnitOptions) -> tuple[list[SliceRef], list[np.ndarray]]:
    """The sampled slices of ``series`` and their renderings; slices without a finite voxel (NaN padding of a NIfTI
    volume) are left out. Raises ``ImageDecodeError``: the first unreadable slice, or ``NO_FINITE_VOXELS`` when
    no sampled slice is left."""
    from fuselip_med.data.images import ImageDecodeError

    refs, images = [], []
    for ref in sample_slices(series, options.slices):
        try:
            images.append(render_slice(ref, options.rendering))
        except ImageDecodeError as error:
            if error.reason != NO_FINITE_VOXELS:
                raise
            continue
        refs.append(ref)
    if not refs:
        raise ImageDecodeError(NO_FINITE_VOXELS, series.key, "no sampled slice holds a finite voxel")
    return refs, images


def embed_series(model, series: Sequence[Series], options: UnitOptions = UnitOptions(), *, batch_size: int = 16,
                 skips: SkipReport | None = None, keep_images: bool = False,
                 progress: bool = True) -> list[SeriesEmbedding]:
    """Embed each series through its sampled slices (``model``: FuseLIP's ``encode(images=...)`` surface).

    A series whose sampled slice cannot be read (truncated, corrupt, unsupported) is left out and named in
    ``skips`` by its series key with the decoder's reason; sampled slices without a finite voxel are left out
    of the pool, and a series with none other is named ``no finite voxels``. Returns the embedded series in input order.
    """
    from fuselip_med.data.images import ImageDecodeError
    from fuselip_med.inference.engine import embed_items
    from fuselip_med.inference.items import EmbedItem
    from fuselip_med.progress import progress_bar

    skips = skips if skips is not None else SkipReport()
    out = []
    with progress_bar(len(series), "embedding series", enabled=progress, transient=True) as bar:
        for done, item in enumerate(series, start=1):
            try:
                refs, images = _render_sampled(item, options)
            except ImageDecodeError as error:
                skips.add(item.key, f"study {item.study_key}", error.reason, error.detail or "a sampled slice "
                          "could not be read")
                bar.set(done)
                continue
            items = [EmbedItem.of_image(image, key=ref.key) for image, ref in zip(images, refs)]
            table = embed_items(model, items, batch_size=batch_size, on_error="raise", progress=False)
            vectors = table.lookup([it.key for it in items]).numpy().astype(np.float32)
            out.append(SeriesEmbedding(item, [r.key for r in refs], [r.position for r in refs], vectors,
                                       pool(vectors), images if keep_images else None))
            bar.set(done)
    return out


def pool_studies(series: Sequence[SeriesEmbedding]) -> list[StudyEmbedding]:
    """Studies from embedded series (grouped by study key, sorted by key; series in key order)."""
    groups: dict[str, list[SeriesEmbedding]] = {}
    for item in series:
        groups.setdefault(item.series.study_key, []).append(item)
    return [StudyEmbedding(key, sorted(members, key=lambda s: s.series.key),
                           pool(np.stack([s.vector for s in sorted(members, key=lambda s: s.series.key)])))
            for key, members in sorted(groups.items())]


@dataclass
class UnitRow:
    """One embedded unit (a series or a study) as outputs store it: ``id`` (series or study key), ``study``,
    ``vector`` [D] float32, the slices behind it (``slice_ids`` [k], ``slice_series`` [k] series keys,
    ``slice_vectors`` [k, D] float32, ``images`` [k] uint8 renderings or None) and ``burned_in``."""

    id: str
    study: str
    vector: np.ndarray
    slice_ids: list[str]
    slice_series: list[str]
    slice_vectors: np.ndarray
    images: list[np.ndarray] | None
    burned_in: bool


def unit_rows(embedded: Sequence[SeriesEmbedding], unit: str) -> list[UnitRow]:
    """Rows per series (``unit="series"``) or per study (``"study"``: the study vector, all its slices)."""
    if unit == "series":
        return [UnitRow(s.series.key, s.series.study_key, s.vector, list(s.slice_keys),
                        [s.series.key] * len(s.slice_keys), s.slice_vectors, s.images, s.series.burned_in)
                for s in embedded]
    if unit != "study":
        raise ValueError(f"unit {unit!r}: choose series or study")
    rows = []
    for study in pool_studies(embedded):
        members = study.series
        images = None if any(s.images is None for s in members) else [i for s in members for i in s.images]
        rows.append(UnitRow(study.key, study.key, study.vector, [k for s in members for k in s.slice_keys],
                            [s.series.key for s in members for _ in s.slice_keys],
                            np.concatenate([s.slice_vectors for s in members]), images,
                            any(s.series.burned_in for s in members)))
    return rows
