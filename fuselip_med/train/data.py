"""Recipe -> training data: adapters and tasks, a weighted mixture, global hard-negative batches per rank.

Every process draws the same *global* batch sequence (same seed) and takes a contiguous share of each
global batch, cut at group boundaries, so one process and P processes see the same global batches.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import DataLoader

from fuselip_med.data.adapters import DatasetEmptyError, SampleSource, check_adapter_options, get_adapter
from fuselip_med.data.collate import Collator
from fuselip_med.data.dataset import MixtureDataset, SampleDataset
from fuselip_med.data.images import DecodeOptions
from fuselip_med.data.sampling import GroupedBatchSampler, RankShard, mixture_group_weights
from fuselip_med.data.workers import usable_workers
from fuselip_med.errors import UserError
from fuselip_med.recipes import DatasetSpec, Recipe


def _demo_path() -> str:
    from fuselip_med.data.demo import demo_dataset_path

    return str(demo_dataset_path())


def _volume_demo_path() -> str:
    from fuselip_med.data.adapters.volumes import volume_demo_path

    return str(volume_demo_path())


# dataset paths that name data the package generates itself
BUILTIN_DATA = {"builtin:demo": _demo_path, "builtin:ct_rate_demo": _volume_demo_path}


class DataSetupError(UserError, ValueError):
    """Training data that cannot be built (missing path, unknown adapter, empty dataset): one clear line."""


@dataclass
class NamedSource:
    """A built SampleSource with its recipe label and mixture weight."""

    label: str
    source: SampleSource
    weight: float
    task: bool = False  # built by a task (TGIT) on a base dataset


def build_source(recipe: Recipe, spec: DatasetSpec, split: str | None = None) -> SampleSource:
    """One adapter from a recipe entry; a missing path says how to get the data or point the recipe at it."""
    try:
        factory = get_adapter(spec.name)
    except KeyError as error:
        raise DataSetupError(f"data: {error.args[0]}") from None
    check_adapter_options(spec.name, list(spec.options), f"data {spec.id or spec.name} options")
    path = BUILTIN_DATA[spec.path]() if spec.path in BUILTIN_DATA else recipe.resolve_path(spec.path)
    try:
        return factory(path, split=split or spec.split, limit=spec.limit, strict=recipe.data.strict, **spec.options)
    except (DatasetEmptyError, FileNotFoundError) as error:
        how_to_get = (
            "Download ROCOv2 with `python data_tools/download_rocov2.py --out ROCOv2_data` (or the "
            "bacor_fuselip_download image), or point" if spec.name == "rocov2" else "Point"
        )
        raise DataSetupError(
            f"data '{spec.id or spec.name}' ({path}): {error} {how_to_get} the recipe at local data with "
            "--set data.root=DIR or --set data.train.0.path=PATH."
        ) from None


def build_sources(recipe: Recipe) -> list[NamedSource]:
    """Direct datasets and the tasks built on them, in recipe order, with their weights."""
    bases = [(spec, build_source(recipe, spec)) for spec in recipe.data.train]
    if not bases:
        raise DataSetupError("The recipe has no training data: add entries under data.train.")
    named = [NamedSource(spec.id or spec.name, source, spec.weight) for spec, source in bases if spec.direct]
    for task in recipe.data.tasks:
        factory = get_adapter(task.name)
        check_adapter_options(task.name, list(task.options), f"data.tasks {task.name} options")
        for spec, source in bases:
            label = spec.id or spec.name
            if task.bases is None or label in task.bases:
                built = factory(source, split="train", strict=recipe.data.strict, seed=recipe.train.seed,
                                **task.options)
                named.append(NamedSource(f"{task.name}:{label}", built, task.weight, task=True))
    if not named:
        raise DataSetupError("No dataset feeds the mixture: every data.train entry has direct: false and no task "
                             "uses it.")
    return named


@dataclass
class TrainData:
    """What the trainer iterates: the loader, its global sampler (position lives here) and load-time skips."""

    loader: DataLoader
    sampler: GroupedBatchSampler
    mixture: MixtureDataset
    sources: list[NamedSource]
    load_skips: collections.Counter

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self.mixture.set_epoch(epoch)

    def describe(self) -> list[tuple[str, int, float]]:
        return [(s.label, len(s.source), s.weight) for s in self.sources]


def decode_options(recipe: Recipe) -> DecodeOptions:
    """How training decodes images: the recipe's ``data.image_size`` (px) and DICOM ``data.window``."""
    return DecodeOptions(image_size=recipe.data.image_size, window=recipe.data.window)


def build_eval_sources(recipe: Recipe) -> dict[str, SampleSource]:
    """{name: source} of the recipe's ``data.eval`` entries (name: the entry's ``id``, else ``<name>_<split>``).
    Raises what ``build_source`` raises for missing data."""
    return {spec.id or f"{spec.name}_{spec.split}": build_source(recipe, spec) for spec in recipe.data.eval}


def build_train_data(recipe: Recipe, tokenizer: Any, rank: int = 0, world: int = 1,
                     pin_memory: bool = False) -> TrainData:
    """Sources -> SampleDatasets (random resized crop) -> mixture -> grouped global batches -> this rank's loader."""
    sources = build_sources(recipe)
    options = decode_options(recipe)
    datasets = [SampleDataset(s.source, options, train=True, strict=recipe.data.strict, seed=recipe.train.seed)
                for s in sources]
    mixture = MixtureDataset(datasets, [s.weight for s in sources])
    groups = mixture.groups()
    weights = mixture_group_weights(mixture) if len(sources) > 1 else None
    try:
        sampler = GroupedBatchSampler(groups, recipe.train.batch_size, seed=recipe.train.seed, group_weights=weights,
                                      drop_last=True)
    except ValueError as error:
        raise DataSetupError(f"train.batch_size={recipe.train.batch_size}: {error}") from None
    if sampler.batches_per_epoch() == 0:
        raise DataSetupError(
            f"The training data ({len(mixture)} samples) is smaller than one batch of {recipe.train.batch_size}; "
            "lower train.batch_size."
        )
    group_of = np.empty(len(mixture), dtype=np.int64)
    for number, group in enumerate(groups):
        group_of[group] = number
    workers = usable_workers(recipe.data.num_workers, "data.num_workers")
    loader = DataLoader(
        mixture,
        batch_sampler=RankShard(sampler, group_of, rank, world),
        collate_fn=Collator(tokenizer),
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,  # the epoch reaches them through shared memory (MixtureDataset)
    )
    load_skips: collections.Counter = collections.Counter()
    for named in sources:
        load_skips.update(getattr(named.source, "skipped", {}) or {})
    return TrainData(loader, sampler, mixture, sources, load_skips)
