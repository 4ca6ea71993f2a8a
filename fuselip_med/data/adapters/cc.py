"""CC3M / CC12M image-caption pairs from the reference CSV (``path,caption``) or from the published webdataset
tar shards (``<key>.jpg/.txt/.json``), which are indexed once by member offset and read lazily, never extracted.

The CC-TGIT mixture of the paper (``cc3m-aug``) is the ``tgit`` task on top of this source.
"""
from __future__ import annotations

import collections
import glob
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from ..images import ImageDecodeError
from ..schema import Sample
from ..skips import SkipReport
from . import (
    BadRowError,
    DatasetEmptyError,
    DatasetNotFoundError,
    check_index,
    check_pair_mode,
    clean_caption,
    has_undecodable,
    pair_sample,
    register_adapter,
    require_nonempty,
    singleton_groups,
    skip_or_raise,
)

__all__ = ["CCSource", "cc", "check_limit", "expand_braces", "read_csv_columns", "resolve_image_path"]

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # preference order when one key has several images
_SHARD_SPLITS = {"train": ("train",), "validation": ("validation", "valid", "val"),
                 "valid": ("validation", "valid", "val"), "val": ("validation", "valid", "val")}
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
HOW_TO_GET = ("give the reference CSV (path,caption; paths relative to its folder or absolute), the webdataset "
              "shards as a pattern such as 'cc3m/cc3m-train-{0000..0575}.tar', or the folder holding them")


def expand_braces(pattern: str) -> list[str]:
    """Shell-style shard lists: ``a-{0000..0002}.tar`` (zero padding kept) and ``{x,y}``; other braces stay."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[: match.start()], pattern[match.end():]
    numeric = _RANGE.match(body)
    if numeric:
        first, last = numeric.groups()
        digits = first.lstrip("-")
        width = len(first) if digits.startswith("0") and len(digits) > 1 else 0
        step = 1 if int(last) >= int(first) else -1
        options = [str(n).zfill(width) for n in range(int(first), int(last) + step, step)]
    elif "," in body:
        options = body.split(",")
    else:
        return [head + "{" + body + "}" + rest for rest in expand_braces(tail)]
    return [expanded for option in options for expanded in expand_braces(head + option + tail)]


def resolve_image_path(base: Path, written: str) -> str:
    """``written`` joined to ``base`` (the table's folder), as the reference loader does; an absolute path wins."""
    expanded = os.path.expanduser(written)
    return expanded if os.path.isabs(expanded) else str(base / written)


def read_csv_columns(file: Path, columns: tuple[str, ...], strict: bool,
                     skipped: collections.Counter) -> dict[str, list[str]]:
    """The named columns of a CSV read by pandas as strings with ``keep_default_na=False`` (so "NA", "None" and ""
    stay text); undecodable bytes stay as surrogates; malformed rows are counted as "bad csv row" (or raise)."""
    import pandas as pd

    options = {"dtype": str, "keep_default_na": False, "index_col": False, "encoding": "utf-8",
               "encoding_errors": "surrogateescape"}
    try:
        frame = pd.read_csv(file, **options)
    except pd.errors.ParserError as exc:
        if strict:
            raise BadRowError(f"{file}: bad csv row ({exc}); fix the row or run without strict.", "bad csv row")

        def count(_fields: list[str]) -> None:
            skipped["bad csv row"] += 1

        frame = pd.read_csv(file, engine="python", on_bad_lines=count, **options)
    except pd.errors.EmptyDataError:
        frame = pd.DataFrame()
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DatasetEmptyError(f"{file} lacks the column(s) {missing} (its columns: "
                                f"{', '.join(map(str, frame.columns)) or 'none'}); expected {','.join(columns)}.")
    return {c: frame[c].tolist() for c in columns}


def check_limit(limit: int | None) -> int | None:
    """``limit`` unchanged; a negative one is a user error."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    return limit


def _unique_id(candidate: str, seen: dict[str, int]) -> str:
    """``candidate``, or ``candidate#k`` for its k-th repeat."""
    count = seen.get(candidate, 0) + 1
    seen[candidate] = count
    return candidate if count == 1 else f"{candidate}#{count}"


@dataclass
class _Rows:
    """Per-sample columns, filtered. CSV: ``paths`` holds image files; tars: shard number, offset, size."""

    ids: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    row_numbers: list[int] = field(default_factory=list)
    shard: list[int] = field(default_factory=list)
    offset: list[int] = field(default_factory=list)
    size: list[int] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    skipped: SkipReport = field(default_factory=SkipReport)


class CCSource:
    """A lazy, indexable CC split: ``source[i]`` is an image -> caption ``Sample`` whose image is a path (CSV) or
    the member's encoded bytes, read by offset from its shard (tars).

    ``row_numbers`` (CSV only, else None): the 0-based data row of the CSV each sample came from, since rows
    without an image or caption are left out (the official TGIT evaluation selects CC3M validation rows by
    these numbers)."""

    def __init__(self, rows: _Rows, *, path: str, split: str, layout: str, pair_mode: str = "image_to_caption"):
        self.name = f"cc/{split}"
        self.path = path
        self.split = split
        self.layout = layout  # "csv" or "wds"
        self.pair_mode = check_pair_mode(pair_mode, "cc")
        self.skipped: collections.Counter[str] = rows.skipped
        self.ids: list[str] = rows.ids
        self.captions: list[str] = rows.captions
        self._paths = rows.paths
        self.row_numbers: list[int] | None = rows.row_numbers if layout == "csv" else None
        self._shards = rows.shards
        self._shard = np.asarray(rows.shard, dtype=np.int32)
        self._offset = np.asarray(rows.offset, dtype=np.int64)
        self._size = np.asarray(rows.size, dtype=np.int64)
        require_nonempty(len(self.ids), path, f"CC split {split!r}", self.skipped)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Sample:
        index = check_index(index, len(self))
        meta = {"split": self.split, "key": self.ids[index]}
        if self.layout == "csv":
            image: str | bytes = self._paths[index]
            meta["path"] = image
        else:
            shard = self._shards[int(self._shard[index])]
            image = self._read_member(shard, int(self._offset[index]), int(self._size[index]), self.ids[index])
            meta["shard"] = shard
        return pair_sample(self.pair_mode, id=self.ids[index], source="cc", image=image,
                           caption=self.captions[index], meta=meta)

    @staticmethod
    def _read_member(shard: str, offset: int, size: int, key: str) -> bytes:
        label = f"{shard}:{key}"
        try:
            with open(shard, "rb") as handle:
                handle.seek(offset)
                data = handle.read(size)
        except FileNotFoundError as exc:
            raise ImageDecodeError("missing file", label) from exc
        except OSError as exc:
            raise ImageDecodeError("unreadable file", label, str(exc)) from exc
        if len(data) != size:
            raise ImageDecodeError("truncated image", label, f"{len(data)} of {size} bytes")
        return data

    def groups(self) -> list[list[int]]:
        return singleton_groups(len(self))

    def __repr__(self) -> str:
        return f"CCSource(path={self.path!r}, split={self.split!r}, layout={self.layout!r}, n={len(self)})"


@register_adapter("cc")
def cc(path: str | os.PathLike, split: str = "train", limit: int | None = None, strict: bool = False, *,
       pair_mode: str = "image_to_caption", check_files: bool = True) -> CCSource:
    """CC3M/CC12M from a ``path,caption`` CSV, a shard pattern (``cc3m-train-{0000..0575}.tar``, globs too) or a
    folder of ``*-{split}-*.tar`` shards. ``check_files=False`` skips the per-row image check of a CSV."""
    check_limit(limit)
    text = os.fspath(path)
    local = Path(text).expanduser()
    if local.is_file() and local.suffix.lower() != ".tar":
        rows = _read_csv(local, strict, limit, check_files)
        layout = "csv"
    else:
        rows = _index_shards(_shard_files(text, split), strict, limit)
        layout = "wds"
    return CCSource(rows, path=text, split=split, layout=layout, pair_mode=pair_mode)


# ------------------------------------------------------------------------------------------------- CSV


def _read_csv(file: Path, strict: bool, limit: int | None, check_files: bool) -> _Rows:
    rows = _Rows()
    table = read_csv_columns(file, ("path", "caption"), strict, rows.skipped)
    seen: dict[str, int] = {}
    wanted = len(table["path"]) if limit is None else limit
    for row, (written, raw) in enumerate(zip(table["path"], table["caption"]), start=1):
        if len(rows.ids) >= wanted:
            break
        where = f"{file}, row {row}"
        written, caption = written.strip(), clean_caption(raw)
        if has_undecodable(written) or has_undecodable(caption):
            skip_or_raise(rows.skipped, strict, "non-utf8 text", where)
            continue
        if not caption:
            skip_or_raise(rows.skipped, strict, "empty caption", where, written, id=written)
            continue
        resolved = resolve_image_path(file.parent, written)
        if not written or (check_files and not os.path.isfile(resolved)):
            skip_or_raise(rows.skipped, strict, "missing image", where, resolved, id=written)
            continue
        rows.ids.append(_unique_id(PurePosixPath(written.replace("\\", "/")).stem, seen))
        rows.captions.append(caption)
        rows.paths.append(resolved)
        rows.row_numbers.append(row - 1)
    return rows


# --------------------------------------------------------------------------------------- webdataset tars


def _shard_files(text: str, split: str) -> list[str]:
    """The shards a path names: a folder's ``*-{split}-*.tar``, or a pattern's brace/glob expansion."""
    folder = Path(text).expanduser()
    if folder.is_dir():
        for name in _SHARD_SPLITS.get(split, (split,)):
            found = sorted(glob.glob(os.path.join(glob.escape(str(folder)), f"*-{name}-*.tar")))
            if found:
                return found
        raise DatasetNotFoundError(f"{folder} holds no '*-{split}-*.tar' webdataset shards: {HOW_TO_GET}.")
    shards: list[str] = []
    for name in expand_braces(os.path.expanduser(text)):
        shards.extend(sorted(glob.glob(name)) if glob.has_magic(name) else [name])
    if not any(os.path.isfile(s) for s in shards):
        raise DatasetNotFoundError(f"CC data path {text} does not exist: {HOW_TO_GET}.")
    return list(dict.fromkeys(shards))


def _split_key(name: str) -> tuple[str, str]:
    """webdataset convention: the key runs to the first dot of the file name, the rest is the extension."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _index_shards(shards: list[str], strict: bool, limit: int | None) -> _Rows:
    rows = _Rows()
    seen: set[str] = set()
    for shard in shards:
        if limit is not None and len(rows.ids) >= limit:
            break
        if not os.path.isfile(shard):
            skip_or_raise(rows.skipped, strict, "missing shard", shard)
            continue
        number = len(rows.shards)
        rows.shards.append(shard)
        try:
            for key, members, caption in _shard_samples(shard, strict, rows.skipped):
                if key in seen:
                    skip_or_raise(rows.skipped, strict, "duplicate id", f"{shard}: {key}", id=key)
                    continue
                seen.add(key)
                ext = next(e for e in IMAGE_EXTS if e in members)
                rows.ids.append(key)
                rows.captions.append(caption)
                rows.shard.append(number)
                rows.offset.append(members[ext][0])
                rows.size.append(members[ext][1])
        except OSError as exc:  # permissions, I/O errors: the samples read before stay
            skip_or_raise(rows.skipped, strict, "unreadable shard", shard, str(exc))
    if limit is not None:
        for column in (rows.ids, rows.captions, rows.shard, rows.offset, rows.size):
            del column[limit:]
    return rows


def _shard_samples(shard: str, strict: bool, skipped: collections.Counter):
    """(key, {ext: (offset, size)}, caption) of the usable samples of one shard, in member order. Reads the tar
    headers (data is skipped by seeking) and the small .txt members; bad members and damage are counted."""
    file_size = os.path.getsize(shard)
    with open(shard, "rb") as handle:
        for key, members in _members(handle, shard, file_size, strict, skipped).items():
            where = f"{shard}: {key}"
            ext = next((e for e in IMAGE_EXTS if e in members), None)
            if any(offset + size > file_size for offset, size in members.values()):
                skip_or_raise(skipped, strict, "truncated member", where)
            elif ext is None:
                skip_or_raise(skipped, strict, "missing image", where, f"no .{'/.'.join(IMAGE_EXTS)} member")
            elif members[ext][1] == 0:
                skip_or_raise(skipped, strict, "empty image", where)
            elif "txt" not in members:
                skip_or_raise(skipped, strict, "missing caption", where, "no .txt member")
            else:
                caption = _read_caption(handle, *members["txt"])
                if caption is None:
                    skip_or_raise(skipped, strict, "non-utf8 text", where)
                elif not caption:
                    skip_or_raise(skipped, strict, "empty caption", where)
                else:
                    yield key, members, caption


def _members(handle, shard: str, file_size: int, strict: bool,
             skipped: collections.Counter) -> dict[str, dict[str, tuple[int, int]]]:
    """key -> {ext: (data offset, size)} of the file members read before the end of the tar or its damage."""
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with tarfile.open(fileobj=handle, mode="r:") as tar:
            try:
                for member in tar:
                    if member.isfile():
                        key, ext = _split_key(member.name)
                        samples.setdefault(key, {})[ext] = (member.offset_data, member.size)
                if _stopped_early(handle, tar.offset, file_size):
                    skip_or_raise(skipped, strict, "corrupt shard", shard, f"bad tar header at byte {tar.offset}")
            except (tarfile.TarError, EOFError, OSError) as exc:  # the shard is cut short or damaged
                skip_or_raise(skipped, strict, "corrupt shard", shard, str(exc))
    except (tarfile.TarError, EOFError, OSError) as exc:
        skip_or_raise(skipped, strict, "corrupt shard", shard, f"not a readable tar file ({exc})")
    return samples


def _stopped_early(handle, offset: int, file_size: int) -> bool:
    """True when tarfile stopped at a block that is not the zero end-of-archive marker (a damaged header)."""
    if offset >= file_size:
        return False
    handle.seek(offset)
    block = handle.read(tarfile.BLOCKSIZE)
    return bool(block.strip(b"\0"))


def _read_caption(handle, offset: int, size: int) -> str | None:
    handle.seek(offset)
    try:
        return clean_caption(handle.read(size).decode("utf-8"))
    except UnicodeDecodeError:
        return None
