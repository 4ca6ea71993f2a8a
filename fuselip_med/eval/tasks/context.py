"""What every task runner receives: the data by role, the shared embedder (each unique input embedded once
across all tasks) and the run's options.

Data entries (the ``data`` mapping of ``run_evaluation``, or ``--data KEY=VALUE`` on the command line):

- a role or one of its aliases (``test``, ``rocov2_test``, ``valid``, ``labelled``, ``mmeb``, ...) -> a
  SampleSource, TGIT pools, or a path. A path for ``test``/``valid`` is opened with the ``rocov2`` adapter;
  a path for a benchmark role (``mmeb``, ``imagenet``, ...) is read by that task in its publisher's format.
- an adapter name (``rocov2``, ``folder``, ``csv``, ``cc``, ...) -> a path opened with that adapter. It fills
  the roles that adapter provides (``rocov2``: ``test`` = split "test" and ``valid`` = split "valid"; any
  other adapter: ``test`` and ``labelled``), unless they are given explicitly.
- ``ROLE:ADAPTER`` (e.g. ``labelled:csv``) -> a path opened with ADAPTER for that one role.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fuselip_med.data.skips import SkipReport
from fuselip_med.errors import InputError, UsageError
from fuselip_med.inference.engine import Embedder
from fuselip_med.inference.items import EmbedItem, sample_image_key

from .. import classification as cls
from ..tgit import TgitRows
from . import ROLES, role_of_key

__all__ = ["DataEntry", "EvalOptions", "EvalContext", "ImageCaption", "resolve_data", "describe", "describe_data",
           "open_source",
           "check_coverage", "named_skips", "skip_fields"]

_SPLIT_OF_ROLE = {"test": "test", "valid": "valid", "labelled": "test", "train": "train"}
_ADAPTER_ROLES = {"rocov2": ("test", "valid")}
_DEFAULT_ADAPTER = {"test": "rocov2", "valid": "rocov2", "train": "rocov2", "tgit": "rocov2", "labelled": "folder",
                    "vg_crop": "vg_crop",
                    "vqa": "rocov2_vqa"}
_DEFAULT_ADAPTER_ROLES = ("test", "labelled")
_ROLE_ADAPTER_OPTIONS = {"labelled": {"folder": {"require_caption": False}, "csv": {"require_caption": False}}}


@dataclass(frozen=True)
class DataEntry:
    """One role's data: ``value`` (a source, TGIT pools or a path), the ``adapter`` that opens a path (None:
    the task reads it) and the ``split`` it is opened with; ``key`` is the data key it came from."""

    key: str
    value: Any
    adapter: str | None
    split: str


@dataclass
class EvalOptions:
    """Options shared by the task runners (validated once by ``run_evaluation``)."""

    seed: int = 0
    pool_size: int | None = 1000
    n_pools: int = 5
    chunk_size: int | None = None
    decode_options: Any = None
    concept_top_k: int = 50
    concept_field: str = "concepts"
    concept_templates: tuple[str, ...] = cls.CONCEPT_TEMPLATES
    modality_classes: tuple[str, ...] = cls.MODALITY_CLASSES
    modality_templates: tuple[str, ...] = cls.MODALITY_TEMPLATES
    tgit_images: int = 1000
    labels: tuple[str, ...] | None = None
    templates: tuple[str, ...] | None = None
    label_field: str = "label"
    mmeb_subsets: tuple[str, ...] | None = None
    vg_images: int = 100
    prompts: str | None = None          # findings/RSNA prompt YAML (None: the shipped sets)
    uncertain: str = "ignore"           # findings: what -1 means (findings.UNCERTAIN_POLICIES)
    threshold_rule: str = "youden"      # findings: how the validation role picks thresholds
    n_boot: int = 1000                  # bootstrap resamples of the AUROC intervals
    out_dir: str | None = None          # where tasks write their row lists (protocol IDs, leakage.csv)
    phash_distance: int = 8             # leakage: pHash Hamming distance counted as a near-duplicate
    leak_cosine: float = 0.95           # leakage: image-embedding cosine counted as a near-duplicate
    tgit_rows: TgitRows | None = None  # read once by run_evaluation


def _is_path(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike))


def resolve_data(data: Mapping[str, Any]) -> dict[str, DataEntry]:
    """Role -> DataEntry for the data keys described in the module docstring; ``ValueError`` naming an
    unknown key (with the roles and adapters to choose from)."""
    explicit: dict[str, DataEntry] = {}
    implied: dict[str, DataEntry] = {}
    for key, value in data.items():
        role_name, _, adapter = key.partition(":")
        role = role_of_key(role_name)
        if adapter:
            if role is None:
                raise UsageError(f"data key {key!r}: {role_name!r} is not a role (roles: {', '.join(ROLES)})")
            _check_adapter(adapter, key)
            explicit[role] = DataEntry(key, value, adapter, _SPLIT_OF_ROLE.get(role, "test"))
        elif role is not None:
            default = _DEFAULT_ADAPTER.get(role)
            explicit[role] = DataEntry(key, value, default if _is_path(value) else None,
                                       _SPLIT_OF_ROLE.get(role, "test"))
        else:
            _check_adapter(key, key)
            for implied_role in _ADAPTER_ROLES.get(key, _DEFAULT_ADAPTER_ROLES):
                implied.setdefault(implied_role, DataEntry(key, value, key, _SPLIT_OF_ROLE[implied_role]))
    return {**implied, **explicit}


def _check_adapter(name: str, key: str) -> None:
    from fuselip_med.data.adapters import available_adapters

    known = available_adapters()
    if name not in known:
        raise UsageError(f"data key {key!r} is neither a data role ({', '.join(ROLES)}) nor a dataset adapter "
                         f"({', '.join(known)}); write ROLE=PATH, ADAPTER=PATH or ROLE:ADAPTER=PATH")


#: Roles whose paths are not written into reports: PACS exports name folders after patients (data/phi.py).
UNWRITTEN_PATH_ROLES = ("volumes", "series_keys", "series_labels", "series_reports")


def describe_data(key: str, value: Any) -> str:
    """``describe(value)``, except for series inputs: their paths are not written (``UNWRITTEN_PATH_ROLES``)."""
    if role_of_key(key.partition(":")[0]) in UNWRITTEN_PATH_ROLES and _is_path(value):
        return "series input (path not written)"
    return describe(value)


def describe(value: Any) -> str:
    """A short description of a data value for the report."""
    if _is_path(value):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return f"{len(value)} TGIT kinds: {', '.join(map(str, value))}"
    name = getattr(value, "name", type(value).__name__)
    try:
        return f"{name} ({len(value)} samples)"
    except TypeError:
        return str(name)


@dataclass
class ImageCaption:
    """The image/caption samples of one source, with their embedding inputs and every row it could not use."""

    name: str
    images: list[EmbedItem] = field(default_factory=list)
    texts: list[EmbedItem] = field(default_factory=list)
    meta: list[dict] = field(default_factory=list)
    skipped: SkipReport = field(default_factory=SkipReport)
    cui_names: dict[str, str] = field(default_factory=dict)
    ids: list[str] = field(default_factory=list)

    @property
    def n_listed(self) -> int:
        """Rows the data listed: the usable ones plus every one skipped (by the adapter or here)."""
        return len(self.images) + self.skipped.total


def _image_caption(source) -> ImageCaption:
    out = ImageCaption(name=getattr(source, "name", type(source).__name__),
                       cui_names=dict(getattr(source, "cui_names", {}) or {}))
    out.skipped.extend(getattr(source, "skipped", None))  # rows the adapter could not use, named
    for i in range(len(source)):
        s = source[i]
        image = s.query.image if s.query.image is not None else s.target.image
        caption = s.target.text if s.target.text else s.query.text
        if image is None or not caption:
            out.skipped.add(s.id, out.name, "no image" if image is None else "no caption")
            continue
        out.images.append(EmbedItem(image=image, image_key=sample_image_key(s, image)))
        out.texts.append(EmbedItem(text=caption))
        out.meta.append(s.meta)
        out.ids.append(str(s.id))
        for cui, name in zip(s.meta.get("concepts", []) or [], s.meta.get("concept_names", []) or []):
            out.cui_names.setdefault(cui, name)
    if not out.images:
        raise InputError(f"{out.name} has no sample with both an image and a caption")
    return out


def check_coverage(ic: ImageCaption, n_evaluated: int, allow_partial: bool, failed: Mapping | None = None) -> None:
    """Refuse (ValueError naming the skipped IDs and reasons) to evaluate fewer than half of the listed rows,
    unless ``allow_partial``: e.g. caption IDs that do not match the image file names. ``failed``: embedding
    key -> reason of the images that did not decode."""
    from .files import check_half

    check_half(ic.name, n_evaluated, ic.n_listed, named_skips(ic, failed or {}), allow_partial)


def named_skips(ic: ImageCaption, failed: Mapping) -> SkipReport:
    """``ic``'s skipped rows plus those whose image failed to decode (``failed``: embedding key -> reason)."""
    report = SkipReport.merged([ic.skipped])
    for item, row_id in zip(ic.images, ic.ids):
        if item.key in failed:
            report.add(row_id, item.image_key, failed[item.key])
    return report


def skip_fields(ic: ImageCaption, n_evaluated: int, failed: Mapping) -> dict[str, Any]:
    """What a task's result says about its rows: ``n_listed``, ``n_evaluated``, ``skipped`` (reason -> count,
    decode failures included) and ``skip_examples`` (reason -> a few IDs)."""
    report = named_skips(ic, failed)
    return {"n_listed": ic.n_listed, "n_evaluated": n_evaluated, "skipped": report.by_reason(),
            "skip_examples": report.examples}


def open_source(path: str | os.PathLike, adapter: str, split: str, options: Mapping[str, Any],
                table_options: Mapping[str, Any]):
    """A data path as a SampleSource. ``adapter="rocov2"`` (also the default of the ``test``/``valid`` roles)
    checks the content: a folder with ``*_captions.csv`` or parquet shards (or a hub id) is ROCOv2, read as
    published; a user's CSV/TSV or image folder goes to the ``folder`` adapter. ``table_options`` (the CLI's
    ``--path-column``, ``--encoding``, ...) apply to the csv/folder adapters only; given for ROCOv2 data they are
    a ValueError (its layout is fixed)."""
    from fuselip_med.data.adapters import get_adapter
    from fuselip_med.option_names import advise_option

    text = os.fspath(path)
    if adapter == "rocov2":
        folder = Path(text)
        rocov2_files = ("*_captions.csv", "*.parquet", "data/*.parquet")  # where the rocov2 adapter looks
        own = folder.is_file() or (folder.is_dir() and not any(any(folder.glob(p)) for p in rocov2_files))
        if own:
            adapter = "folder"
        elif table_options:
            given = ", ".join(advise_option(name, "...") for name in table_options)
            raise InputError(f"{given} apply to your own tables and folders; {text} is ROCOv2 data, read as "
                             "published.")
    if adapter in ("folder", "csv"):
        options = {**options, **table_options}
    return get_adapter(adapter)(path=text, split=split, **options)


class EvalContext:
    """Data by role, opened lazily and once; the shared :class:`Embedder`; the run's :class:`EvalOptions`."""

    def __init__(self, data: Mapping[str, Any], embedder: Embedder, opts: EvalOptions, *, allow_partial: bool = False,
                 table_options: Mapping[str, Any] | None = None):
        self.data = dict(data)
        self.entries = resolve_data(data)
        self.embedder = embedder
        self.opts = opts
        self.allow_partial = allow_partial
        self.table_options = dict(table_options or {})
        self._sources: dict[str, Any] = {}
        self._ic: dict[str, ImageCaption] = {}
        self._skips: list[SkipReport] = []

    def has(self, role: str) -> bool:
        return role in self.entries

    def first(self, roles: str) -> str:
        """The first present role of an ``"a|b"`` entry."""
        for role in roles.split("|"):
            if self.has(role):
                return role
        raise InputError(f"no data for role {roles!r}")

    def value(self, role: str) -> Any:
        """The raw value given for ``role`` (a source, pools or a path)."""
        if role not in self.entries:
            raise InputError(f"no data for role {role!r}: pass --data {role}=PATH")
        return self.entries[role].value

    def path(self, role: str) -> str:
        """The folder/file given for a benchmark role; ``ValueError`` when it is not a path."""
        value = self.value(role)
        if not _is_path(value):
            raise InputError(f"data for role {role!r} must be a path, got {describe(value)}")
        return os.fspath(value)

    def source(self, role: str, **adapter_options):
        """The SampleSource for ``role``, opening a path with its adapter (once)."""
        if role not in self._sources:
            entry = self.entries.get(role)
            if entry is None:
                raise InputError(f"no data for role {role!r}: pass --data {role}=PATH")
            value = entry.value
            if _is_path(value):
                adapter = entry.adapter or "rocov2"
                options = {**_ROLE_ADAPTER_OPTIONS.get(role, {}).get(adapter, {}), **adapter_options}
                value = open_source(value, adapter, entry.split, options, self.table_options)
            self._sources[role] = value
        return self._sources[role]

    def image_caption(self, role: str) -> ImageCaption:
        if role not in self._ic:
            ic = _image_caption(self.source(role))
            check_coverage(ic, len(ic.images), self.allow_partial)  # before any embedding
            self._ic[role] = ic
        return self._ic[role]

    def embed_image_caption(self, role: str) -> tuple[ImageCaption, list[int], torch.Tensor, torch.Tensor]:
        """(data, kept sample positions, [N, D] image embeddings, [N, D] caption embeddings), float32, without
        the images that failed to decode."""
        ic = self.image_caption(role)
        table = self.embedder.embed(ic.images + ic.texts, desc=f"embedding {ic.name}")
        keep = [i for i, it in enumerate(ic.images) if it.key in table]
        check_coverage(ic, len(keep), self.allow_partial, table.failed)
        if not keep:
            raise InputError(f"no image of {ic.name} could be decoded (e.g. {next(iter(table.failed.values()), '?')})")
        return (ic, keep, table.lookup(ic.images[i].key for i in keep),
                table.lookup(ic.texts[i].key for i in keep))

    def failed_reasons(self, ic: ImageCaption) -> dict[str, int]:
        """Reason -> count of ``ic``'s rows that were skipped or whose image did not decode."""
        return skip_fields(ic, 0, self.embedder.table.failed)["skipped"]

    def rows(self, ic: ImageCaption, keep: Sequence[int]) -> dict[str, Any]:
        """``n_listed``, ``n_evaluated``, ``skipped`` and ``skip_examples`` of a task over ``ic``'s ``keep`` rows."""
        return skip_fields(ic, len(keep), self.embedder.table.failed)

    def skip_report(self) -> SkipReport:
        """Every row skipped in the image-caption data of this run, each named once."""
        return SkipReport.merged([*(named_skips(ic, self.embedder.table.failed) for ic in self._ic.values()),
                                  *self._skips])

    def add_skips(self, report: SkipReport) -> None:
        """Name a task's own skipped rows (benchmark readers) in the run's ``skipped.csv``."""
        self._skips.append(report)

    def class_weights(self, names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """[C, D] float32 zero-shot class weights (reference section 6.3: per-template text embeddings averaged
        and re-normalised)."""
        prompts = cls.class_prompts(names, templates)
        table = self.embedder.embed([EmbedItem(text=p) for ps in prompts for p in ps], desc="embedding prompts")
        return cls.class_weights([table.lookup(("text", p) for p in ps) for ps in prompts])
