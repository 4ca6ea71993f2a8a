"""Dataset adapters: a registry of factories ``(path, split, limit=None, strict=False, **opts) -> SampleSource``
and the conventions they share (lazy Samples, no pixel decoding, bad rows skipped and named in the source's
``skipped`` report (a :class:`~fuselip_med.data.skips.SkipReport`) or strict errors).

One registry holds dataset adapters and tasks built on them (``tgit``, ``tgit_med``): each module of
``adapter_modules()`` registers its factories with ``@register_adapter(name)``, and ``get_adapter`` imports those
modules on first use, so a name resolves in a fresh interpreter without importing anything first. User code
registers its own adapters with the same decorator."""
from __future__ import annotations

import codecs
import collections
import csv
import errno
import importlib
import os
import pkgutil
import re
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Protocol, runtime_checkable

from ...errors import UnknownNameError, UserError
from ...option_names import advise_option
from ..schema import Sample, SampleSide
from ..skips import SkipReport

__all__ = [
    "BadRowError",
    "SkipReport",
    "DatasetEmptyError",
    "DatasetNotFoundError",
    "ListSource",
    "SampleSource",
    "available_adapters",
    "check_image_path",
    "check_parquet_files",
    "clean_caption",
    "csv_rows",
    "get_adapter",
    "load_hub_dataset",
    "parquet_image_cells",
    "register_adapter",
    "require_column_types",
]


class DatasetEmptyError(UserError, ValueError):
    """A dataset that has no usable sample (after filtering); the message names the path."""


class DatasetNotFoundError(DatasetEmptyError, FileNotFoundError):
    """The dataset's path does not exist or holds none of the expected files."""


class BadRowError(UserError, ValueError):
    """A bad row met with ``strict=True``; ``reason`` is the key it would have been counted under."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def require_column_types(schema, columns: dict[str, str], where: str) -> None:
    """Raise ``DatasetEmptyError`` naming every present column of ``columns`` (name -> ``"text"`` or
    ``"text list"``) whose Arrow type in ``schema`` (a ``pyarrow.Schema``) is not that: a parquet file whose
    ``caption`` holds numbers or whose ``cui`` is one string would otherwise crash mid-read or be misread
    (``";".join("C0040405")`` splits a string into letters). Null-typed (all-null) columns pass: their rows are
    skipped as empty. Absent columns are the caller's check."""
    import pyarrow as pa

    def is_text(kind) -> bool:
        return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)

    wrong = []
    for name, want in columns.items():
        if name not in schema.names:
            continue
        kind = schema.field(name).type
        ok = (is_text(kind) if want == "text" else
              pa.types.is_null(kind) or ((pa.types.is_list(kind) or pa.types.is_large_list(kind))
                                         and is_text(kind.value_type)))
        if not ok:
            wrong.append(f"{name} is {kind}, expected {'string' if want == 'text' else 'list<string>'}")
    if wrong:
        raise DatasetEmptyError(f"{where}: wrong column types: {'; '.join(wrong)}. Re-export the data with these "
                                "columns as text.")


def check_parquet_files(files: Iterable[str | os.PathLike], what: str) -> None:
    """Raise ``DatasetEmptyError`` naming the first of ``files`` whose parquet footer cannot be read (a download
    cut short, an HTML error page saved as ``.parquet``): ``datasets``/pyarrow would otherwise end the run in an
    ``ArrowInvalid`` traceback. Reads only each footer (the last bytes), not the data; ``what`` names the dataset
    in the advice."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for file in files:
        try:
            pq.ParquetFile(file).metadata
        except (pa.ArrowException, OSError) as exc:
            raise DatasetEmptyError(f"{file} is not a readable parquet file ({exc}); download {what} again or "
                                    "remove the file.") from exc


def _inside(real: str, roots: list[str]) -> bool:
    return any(os.path.commonpath([real, root]) == root for root in roots)


def check_image_path(path: str, roots: list[str]) -> tuple[str, str] | None:
    """None when ``path`` is a readable regular file whose real location (symlinks and ``..`` resolved) lies in
    one of ``roots``; else ``(reason, detail)``: ``missing image``, ``symlink loop``, ``outside image root``,
    ``not a file`` or ``unreadable file``. Never blocks (no file is opened)."""
    try:
        real = os.path.realpath(path, strict=True)
    except FileNotFoundError:
        return "missing image", path
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symlink loop", path
        return "unreadable file", f"{path}: {exc.strerror or exc}"
    if not _inside(real, roots):
        where = " or ".join(roots)
        shown = path if real == os.path.abspath(path) else f"{path} resolves to {real},"
        return "outside image root", (f"{shown} outside {where}; pass "
                                      f"{advise_option('image_root', 'DIR')} naming the folder it may come from")
    try:
        mode = os.stat(real).st_mode
    except OSError as exc:
        return "unreadable file", f"{path}: {exc.strerror or exc}"
    if not stat.S_ISREG(mode):
        return "not a file", path
    if not os.access(real, os.R_OK):
        return "unreadable file", f"{path}: permission denied"
    return None


def parquet_image_cells(dataset, column: str, folder: str | None) -> list[bool | str | tuple[str, str]]:
    """Per row of ``dataset`` (a ``datasets.Dataset`` whose ``column`` is an HF ``Image`` struct read with
    ``decode=False``): True when the cell embeds bytes; the image's path when it holds only a path that resolves
    (``..`` and symlinks followed) to a readable file inside ``folder`` (the parquet files' folder; None for a hub
    dataset, where no path is allowed); else ``(reason, detail)``: ``null image`` or the image unit's reason
    (``check_image_path``: ``outside image root``, ``missing image``, ...). A path cell is joined to
    ``folder`` (an absolute one stays absolute and must still lie inside it), so a parquet file cannot make
    training read ``/etc/passwd``. Only the validity bitmaps and path strings are read, never the bytes."""
    arrow = dataset.select_columns([column]).with_format("arrow")[:].column(column)
    cells: list[bool | str | tuple[str, str]] = []
    for chunk in arrow.chunks:
        children = dict(zip((f.name for f in chunk.type), chunk.flatten()))  # parent nulls and offset applied
        for has_bytes, path in zip(children["bytes"].is_valid().to_pylist(), children["path"].to_pylist()):
            if has_bytes:
                cells.append(True)
            elif not path:
                cells.append(("null image", "the image cell holds neither bytes nor a path"))
            elif folder is None:
                cells.append(("outside image root", f"{path}: a hub dataset's image must be embedded bytes"))
            else:
                resolved = os.path.join(folder, os.path.expanduser(path))
                cells.append(check_image_path(resolved, [os.path.realpath(folder)]) or resolved)
    return cells


def load_hub_dataset(hub_id: str, split: str, name: str, how_to_get: str, **kwargs):
    """``datasets.load_dataset(hub_id, split=split, **kwargs)`` with the Hub timeout of ``core.network``.

    ``datasets`` downloads through huggingface_hub's client, whose default timeout is None: a silent endpoint hung
    the load for good. The dataset's Hub entry is asked for first through ``hub_call`` (timeout, bounded retry;
    the timed client stays installed for the download), so a silent endpoint ends after those tries instead of
    after ``datasets``' own backoff on each of its files (measured: 396 s at a 0.5 s timeout). Skipped offline
    (``HF_HUB_OFFLINE``), where a cached copy may still load. Raises ``NetworkError`` naming the endpoint when it
    does not answer, and ``DatasetNotFoundError`` (``name`` and ``how_to_get`` in its one sentence, the cause
    chained) when the id is unknown, offline or not accessible."""
    import datasets
    from huggingface_hub import HfApi

    from ...core.network import NetworkError, hub_call

    try:
        if not datasets.config.HF_HUB_OFFLINE:  # offline, a cached copy may still load
            hub_call(f"loading {name} {hub_id}", lambda: HfApi().dataset_info(hub_id, revision=kwargs.get("revision")))
        return datasets.load_dataset(hub_id, split=split, **kwargs)  # hub_call left the client's timeout in place
    except NetworkError:
        raise
    except Exception as exc:  # offline, unknown id, no access: one sentence for the user, the cause chained
        raise DatasetNotFoundError(f"could not load {name} from the Hugging Face hub id {hub_id!r} "
                                   f"({type(exc).__name__}: {exc}); {how_to_get}.") from exc


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
        self.skipped = SkipReport()

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
    """``pair_mode`` when it is one of ``PAIR_MODES``; raises ``ValueError`` naming ``adapter`` otherwise."""
    if pair_mode not in PAIR_MODES:
        raise ValueError(f"unknown pair_mode {pair_mode!r} for {adapter}: use one of {', '.join(PAIR_MODES)}")
    return pair_mode


def pair_sample(pair_mode: str, *, id: str, source: str, image, caption: str, meta: dict,
                group: str | None = None) -> Sample:
    """An image-caption ``Sample``: image -> caption (``image_to_caption``) or caption -> image."""
    if pair_mode == "image_to_caption":
        return Sample(id=id, source=source, query=SampleSide(image=image), target=SampleSide(text=caption),
                      group=group, meta=meta)
    return Sample(id=id, source=source, query=SampleSide(text=caption), target=SampleSide(image=image), group=group,
                  meta=meta)


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
    """True when ``text`` was read with ``errors="surrogateescape"`` and held bytes its encoding cannot decode."""
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def text_encoding(encoding: str | None) -> str:
    """The codec to read a table with: UTF-8 (a leading BOM dropped) by default; ``LookupError`` naming an
    unknown one."""
    if encoding is None:
        return "utf-8-sig"
    try:
        name = codecs.lookup(encoding).name
    except LookupError:
        raise UnknownNameError(f"unknown text encoding {encoding!r}: use e.g. utf-8, cp1252 or latin-1") from None
    return "utf-8-sig" if name in ("utf-8", "utf-8-sig") else name


def encoding_label(encoding: str) -> str:
    """``UTF-8`` for the default codec, else the codec's name (``cp1252``)."""
    return "UTF-8" if encoding.startswith("utf-8") else encoding


def undecodable_reason(encoding: str) -> str:
    """The skip reason of a row its table's encoding cannot decode (``non-utf8 text`` for the default)."""
    return "non-utf8 text" if encoding.startswith("utf-8") else f"non-{encoding} text"


_CANDIDATE_ENCODINGS = ("utf-8", "cp1252", "latin-1")


def guess_encoding(samples: Iterable[str], read_as: str) -> str | None:
    """The first of utf-8, cp1252, latin-1 (other than ``read_as``) that decodes every sample's original bytes
    (``samples`` were read as ``read_as`` with ``errors="surrogateescape"``); None when none does."""
    raw = [text.encode(read_as, "surrogateescape") for text in samples]
    own = codecs.lookup(read_as.removesuffix("-sig")).name
    for candidate in _CANDIDATE_ENCODINGS:
        if codecs.lookup(candidate).name == own:
            continue
        try:
            for data in raw:
                data.decode(candidate)
        except UnicodeDecodeError:
            continue
        return candidate
    return None


def encoding_hint(file: object, failed: Sequence[str], read_as: str) -> str:
    """A sentence for a table whose rows ``failed`` to decode: how many, and the encoding they look like."""
    likely = guess_encoding(failed, read_as) if failed else None
    text = f"{len(failed)} row(s) of {file} are not valid {encoding_label(read_as)}"
    if likely is not None:
        return f"{text}; they look like {likely}: try {advise_option('encoding', likely)}"
    return f"{text}; pass the file's encoding with {advise_option('encoding', 'NAME')}"


def csv_rows(file: str | os.PathLike, strict: bool, skipped: collections.Counter, *, delimiter: str = ",",
             reason: str = "bad csv row", encoding: str = "utf-8-sig") -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of every non-blank row, header included; undecodable bytes stay as surrogates and
    rows the csv module rejects are skipped under ``reason`` (or raise when strict)."""
    with open(file, newline="", encoding=encoding, errors="surrogateescape") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                skip_or_raise(skipped, strict, reason, f"{file}, line {reader.line_num}", str(exc),
                              id=f"line {reader.line_num}")
                continue
            if fields and fields != [""]:
                yield reader.line_num, fields


def skip_or_raise(skipped: collections.Counter, strict: bool, reason: str, where: str, detail: str = "", *,
                  id: object = None) -> None:
    """Name a bad row in ``skipped`` (id: the row's ID, else ``where``; source: ``where``, the file and row), or
    raise ``BadRowError`` naming ``where`` when strict. A plain ``Counter`` only counts it."""
    if strict:
        message = f"{where}: {reason}" + (f" ({detail})" if detail else "")
        raise BadRowError(message + "; fix or remove the row, or run without strict to skip such rows.", reason)
    if isinstance(skipped, SkipReport):
        skipped.add(where if id is None or id == "" else id, where, reason, detail)
    else:
        skipped[reason] += 1


def require_nonempty(n: int, path: object, what: str, skipped: collections.Counter) -> None:
    """Raise ``DatasetEmptyError`` naming ``path`` (and the skips, with example IDs) when an adapter ended up
    with no sample."""
    if n == 0:
        if isinstance(skipped, SkipReport) and skipped.total:
            detail = skipped.summary()
        else:
            detail = "skipped: " + (", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())) or "no rows")
        raise DatasetEmptyError(f"{what} at {path} has no usable sample ({detail}).")


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
            raise UnknownNameError(f"unknown dataset adapter {name!r} (known: {known}){hint}")
    return _REGISTRY[name]


def check_adapter_options(name: str, options: Sequence[str], where: str) -> None:
    """Raise ``UnknownNameError`` (one line: ``where``, the adapter, the unknown keys and the keys it takes) when
    the adapter registered as ``name`` takes no keyword for some of ``options`` (a recipe's ``options:`` keys)."""
    import inspect

    parameters = list(inspect.signature(get_adapter(name)).parameters.values())
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return
    accepted = [p.name for p in parameters[1:] if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise UnknownNameError(f"{where}: adapter {name!r} has no option {', '.join(map(repr, unknown))}; its "
                               f"options are {', '.join(accepted)}")


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
