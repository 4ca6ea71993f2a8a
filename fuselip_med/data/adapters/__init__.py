"""Dataset adapters: a registry of factories ``(path, split, limit=None, strict=False, **opts) -> SampleSource``
and the conventions they share (lazy Samples, no pixel decoding, bad rows skipped and counted or strict errors).

One registry holds dataset adapters and tasks built on them (``tgit``, ``tgit_med``): each module of
``adapter_modules()`` registers its factories with ``@register_adapter(name)``, and ``get_adapter`` imports those
modules on first use, so a name resolves in a fresh interpreter without importing anything first. User code
registers its own adapters with the same decorator."""
from __future__ import annotations

import collections
import csv
import importlib
import os
import pkgutil
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Protocol, runtime_checkable

from ..schema import Sample

__all__ = [
    "BadRowError",
    "DatasetEmptyError",
    "DatasetNotFoundError",
    "ListSource",
    "SampleSource",
    "available_adapters",
    "clean_caption",
    "csv_rows",
    "get_adapter",
    "register_adapter",
]


class DatasetEmptyError(ValueError):
    """A dataset that has no usable sample (after filtering); the message names the path."""


class DatasetNotFoundError(DatasetEmptyError, FileNotFoundError):
    """The dataset's path does not exist or holds none of the expected files."""


class BadRowError(ValueError):
    """A bad row met with ``strict=True``; ``reason`` is the key it would have been counted under."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


@runtime_checkable
class SampleSource(Protocol):
    """What every adapter returns: a lazy, indexable sequence of Samples (no pixel decoding)."""

    name: str

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Sample: ...

    def groups(self) -> list[list[int]]: ...


class ListSource:
    """A ``SampleSource`` over an in-memory list of Samples; groups come from ``Sample.group_key``."""

    def __init__(self, samples: Iterable[Sample], name: str = "list"):
        self.name = name
        self.samples = list(samples)
        self.skipped: collections.Counter[str] = collections.Counter()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]

    def groups(self) -> list[list[int]]:
        """Indices grouped by ``Sample.group_key``, in order of first appearance."""
        by_key: dict[str, list[int]] = {}
        for i, sample in enumerate(self.samples):
            by_key.setdefault(sample.group_key, []).append(i)
        return list(by_key.values())

    def __repr__(self) -> str:
        return f"ListSource(name={self.name!r}, n={len(self)})"


PAIR_MODES = ("image_to_caption", "caption_to_image")


def check_pair_mode(pair_mode: str, adapter: str) -> str:
    if pair_mode not in PAIR_MODES:
        raise ValueError(f"unknown pair_mode {pair_mode!r} for {adapter}: use one of {', '.join(PAIR_MODES)}")
    return pair_mode


def pair_sample(pair_mode: str, *, id: str, source: str, image, caption: str, meta: dict,
                group: str | None = None) -> Sample:
    """An image-caption ``Sample``: image -> caption (``image_to_caption``) or caption -> image."""
    if pair_mode == "image_to_caption":
        return Sample(id=id, source=source, query_image=image, target_text=caption, group=group, meta=meta)
    return Sample(id=id, source=source, query_text=caption, target_image=image, group=group, meta=meta)


def check_index(index: int, n: int) -> int:
    """``index`` made non-negative; ``IndexError`` when out of range (so iteration over a source stops)."""
    if index < 0:
        index += n
    if not 0 <= index < n:
        raise IndexError(f"sample index {index} out of range for {n} samples")
    return index


def singleton_groups(n: int) -> list[list[int]]:
    """The default grouping: every sample is its own hard-negative group."""
    return [[i] for i in range(n)]


_NEWLINES = re.compile(r"\r\n|\r|\n")


def clean_caption(text: str | None) -> str:
    """A caption as adapters hand it on: newlines turned into spaces, surrounding whitespace stripped."""
    if text is None:
        return ""
    return _NEWLINES.sub(" ", text).strip()


def has_undecodable(text: str) -> bool:
    """True when ``text`` was read with ``errors="surrogateescape"`` and held bytes that are not UTF-8."""
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def csv_rows(file: str | os.PathLike, strict: bool, skipped: collections.Counter, *, delimiter: str = ",",
             reason: str = "bad csv row") -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of every non-blank row, header included; undecodable bytes stay as surrogates and
    rows the csv module rejects are counted under ``reason`` (or raise when strict)."""
    with open(file, newline="", encoding="utf-8-sig", errors="surrogateescape") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                skip_or_raise(skipped, strict, reason, f"{file}, line {reader.line_num}", str(exc))
                continue
            if fields and fields != [""]:
                yield reader.line_num, fields


def skip_or_raise(skipped: collections.Counter, strict: bool, reason: str, where: str, detail: str = "") -> None:
    """Count a bad row under ``reason``, or raise ``BadRowError`` naming ``where`` (file and row) when strict."""
    if strict:
        message = f"{where}: {reason}" + (f" ({detail})" if detail else "")
        raise BadRowError(message + "; fix or remove the row, or run without strict to skip such rows.", reason)
    skipped[reason] += 1


def require_nonempty(n: int, path: object, what: str, skipped: collections.Counter) -> None:
    """Raise ``DatasetEmptyError`` naming ``path`` when an adapter ended up with no sample."""
    if n == 0:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())) or "no rows"
        raise DatasetEmptyError(f"{what} at {path} has no usable sample (skipped: {detail}).")


# ---------------------------------------------------------------------------------------------- registry

AdapterFactory = Callable[..., SampleSource]
_REGISTRY: dict[str, AdapterFactory] = {}
_discovered = False


def register_adapter(name: str) -> Callable[[AdapterFactory], AdapterFactory]:
    """Decorator registering ``factory(path, split, limit=None, strict=False, **opts)`` under ``name``."""

    def decorator(factory: AdapterFactory) -> AdapterFactory:
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not factory and _qualname(existing) != _qualname(factory):
            raise ValueError(f"adapter name {name!r} is already registered by {_qualname(existing)}")
        _REGISTRY[name] = factory
        return factory

    return decorator


def _qualname(factory: AdapterFactory) -> str:
    return f"{getattr(factory, '__module__', '?')}.{getattr(factory, '__qualname__', repr(factory))}"


# Modules outside this package whose factories are adapters too: tasks built on base datasets (TGIT).
TASK_MODULES = ("fuselip_med.data.transforms.tasks",)


def adapter_modules() -> list[str]:
    """Every module that defines built-in adapters: the modules of this package, then ``TASK_MODULES``."""
    own = [f"{__name__}.{m.name}" for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]
    return own + list(TASK_MODULES)


def _discover() -> dict[str, Exception]:
    """Import every module of ``adapter_modules()`` once, so that their ``register_adapter`` decorators run.

    ``get_adapter`` and ``available_adapters`` call this themselves: a name is found in any interpreter,
    whatever the caller happened to import before.
    """
    global _discovered
    failures: dict[str, Exception] = {}
    if _discovered:
        return failures
    for module in adapter_modules():
        try:
            importlib.import_module(module)
        except ImportError as exc:  # an adapter with a missing optional dependency must not hide the others
            failures[module.rsplit(".", 1)[-1]] = exc
    _discovered = not failures
    return failures


def get_adapter(name: str) -> AdapterFactory:
    """The factory registered under ``name``; raises ``KeyError`` listing the known names."""
    if name not in _REGISTRY:
        failures = _discover()
        if name not in _REGISTRY:
            known = ", ".join(available_adapters()) or "none"
            hint = "".join(f"; module {m} failed to import: {e}" for m, e in failures.items())
            raise KeyError(f"unknown dataset adapter {name!r} (known: {known}){hint}")
    return _REGISTRY[name]


def available_adapters() -> list[str]:
    """Sorted names of every registered adapter (imports the adapter modules first)."""
    _discover()
    return sorted(_REGISTRY)


def image_files(folders: Iterable[os.PathLike], suffixes: Sequence[str]) -> list[tuple[str, str, str]] | None:
    """(stem, lower-case suffix, path) of the files with one of ``suffixes`` in the existing ``folders`` (one
    listing each, not recursive), or None when none of the folders exists."""
    found: list[tuple[str, str, str]] | None = None
    for folder in folders:
        if not os.path.isdir(folder):
            continue
        found = found if found is not None else []
        with os.scandir(folder) as entries:
            for entry in entries:
                stem, suffix = os.path.splitext(entry.name)
                if suffix.lower() in suffixes and entry.is_file():
                    found.append((stem, suffix.lower(), entry.path))
    return found


def take(items: Sequence, limit: int | None) -> Sequence:
    """The first ``limit`` items (all when ``limit`` is None); a negative limit is a user error."""
    if limit is None:
        return items
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    return items[:limit]
