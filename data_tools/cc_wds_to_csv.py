#!/usr/bin/env python
"""CC3M / CC12M webdataset shards -> extracted image files + a ``path,caption`` CSV (what the csv adapter reads).

    python data_tools/cc_wds_to_csv.py 'cc3m/cc3m-train-{0000..0575}.tar' \\
        --images-dir cc3m_images --csv cc3m_train.csv --workers 4

Each shard holds ``<key>.jpg`` (or .jpeg/.png/.webp), ``<key>.txt`` (the caption) and ``<key>.json``.
Images go to ``<images-dir>/<shard name>/<key>.<ext>``; the CSV has a header, absolute paths and the raw
content of the .txt file as caption (pandas quoting). Samples are skipped, and counted by reason, when
the image is empty or fails PIL ``verify()``/``load()``, or the caption is missing, empty or not UTF-8.
A truncated shard keeps the samples read before the damage and is counted.

Resumable: a finished shard leaves a small record under ``<images-dir>/.parts/``; a rerun skips finished
shards and re-uses image files already extracted (images are written atomically, after they verified).
Shard patterns take brace ranges and lists (``{0000..0575}``, ``{a,b}``) and globs (``*``).
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import io
import json
import re
import sys
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path, PurePosixPath

if not __package__:  # run as a script: make `data_tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_tools._common import (  # noqa: E402
    atomic_write_bytes,
    atomic_write_csv,
    atomic_write_text,
    format_counter,
    print_table,
    progress_bar,
    remove_temp_files,
)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
PARTS_DIR = ".parts"
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def expand_braces(pattern: str) -> list[str]:
    """``a-{00..02}.tar`` -> ``a-00.tar a-01.tar a-02.tar``; ``{x,y}`` lists; innermost groups first, in order."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numeric = _RANGE.match(body)
    if numeric:
        first, last = numeric.groups()
        width = len(first) if first.lstrip("-").startswith("0") and len(first.lstrip("-")) > 1 else 0
        step = 1 if int(last) >= int(first) else -1
        options = [str(n).zfill(width) for n in range(int(first), int(last) + step, step)]
    elif "," in body:
        options = body.split(",")
    else:  # a literal brace pair
        options = ["\0" + body + "\1"]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [p.replace("\0", "{").replace("\1", "}") for o in options for p in expand_braces(head + o + tail)]


def resolve_shards(patterns: Sequence[str]) -> list[Path]:
    """Expanded, globbed, de-duplicated shard paths in the order given; raises FileNotFoundError naming a gap."""
    shards: list[Path] = []
    missing: list[str] = []
    for pattern in patterns:
        for name in expand_braces(pattern):
            found = sorted(glob.glob(name)) if glob.has_magic(name) else ([name] if Path(name).is_file() else [])
            if not found:
                missing.append(name)
            shards.extend(Path(f) for f in found)
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) not found, e.g. {missing[0]}")
    unique = list(dict.fromkeys(p.resolve() for p in shards))
    stems = Counter(_shard_name(p) for p in unique)
    clashes = [s for s, n in stems.items() if n > 1]
    if clashes:
        raise ValueError(f"two shards share the name {clashes[0]!r}: convert them in separate runs")
    return unique


def _shard_name(shard: Path) -> str:
    return shard.name.split(".")[0]


def _split_key(name: str) -> tuple[str, str]:
    """webdataset convention: the key runs to the first dot of the file name, the rest is the extension."""
    path = PurePosixPath(name)
    stem, _, ext = path.name.partition(".")
    return str(path.parent / stem) if str(path.parent) != "." else stem, ext.lower()


def _samples(shard: Path, damage: Counter) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) for consecutive members sharing a key; a damaged tar ends the shard, counted."""
    key, members = None, {}
    try:
        with tarfile.open(shard, "r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                member_key, ext = _split_key(member.name)
                if member_key != key and members:
                    yield key, members
                    members = {}
                key = member_key
                handle = tar.extractfile(member)
                members[ext] = handle.read() if handle is not None else b""
    except (tarfile.TarError, EOFError, OSError, zlib.error):
        damage["truncated or unreadable shard"] += 1
        members = {}  # the sample being read when the damage showed is incomplete
    if members:
        yield key, members


def check_image(data: bytes) -> str | None:
    """None when the bytes are a readable image, else the reason to skip."""
    from PIL import Image

    if not data:
        return "empty image"
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Exception:  # PIL raises many types for bad data
        return "corrupt image"
    return None


def _safe_relative(key: str) -> PurePosixPath | None:
    parts = [p for p in PurePosixPath(key).parts if p not in ("", ".")]
    if not parts or any(p == ".." or p.startswith("/") for p in parts):
        return None
    return PurePosixPath(*parts)


def convert_shard(shard: Path, images_dir: Path) -> dict:
    """Extract one shard; returns its record ``{"shard", "rows": [[path, caption]], "skipped": {reason: n}}``."""
    out_dir = images_dir / _shard_name(shard)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_temp_files(out_dir)
    rows: list[list[str]] = []
    skipped: Counter = Counter()
    for key, members in _samples(shard, skipped):
        ext = next((e for e in IMAGE_EXTS if e in members), None)
        relative = _safe_relative(key)
        if relative is None:
            skipped["unusable key"] += 1
            continue
        if ext is None:
            skipped["missing image"] += 1
            continue
        if "txt" not in members:
            skipped["missing caption"] += 1
            continue
        try:
            caption = members["txt"].decode("utf-8")
        except UnicodeDecodeError:
            skipped["caption not UTF-8"] += 1
            continue
        if not caption.strip():
            skipped["empty caption"] += 1
            continue
        data = members[ext]
        target = out_dir / f"{relative}.{ext}"
        if not (target.is_file() and target.stat().st_size == len(data) > 0):
            reason = check_image(data)
            if reason is not None:
                skipped[reason] += 1
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(target, data)
        rows.append([str(target), caption])
    return {"shard": str(shard), "rows": rows, "skipped": dict(skipped)}


def _convert_and_record(shard: Path, images_dir: Path) -> dict:
    record = convert_shard(shard, images_dir)
    atomic_write_text(images_dir / PARTS_DIR / f"{_shard_name(shard)}.json", json.dumps(record, ensure_ascii=False))
    return record


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="cc_wds_to_csv",
        description="Extract CC3M/CC12M webdataset shards to image files and write a path,caption CSV. "
        "Rerun the same command to resume.",
    )
    parser.add_argument("shards", nargs="+", help="shard files or patterns, e.g. 'cc3m-train-{0000..0575}.tar'")
    parser.add_argument("--images-dir", type=Path, required=True, help="where the images are extracted")
    parser.add_argument("--csv", type=Path, required=True, help="the CSV to write (path,caption)")
    parser.add_argument("--workers", type=int, default=1, help="shards converted in parallel (default 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    import pandas as pd

    args = parse_args(argv)
    try:
        shards = resolve_shards(args.shards)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    images_dir = args.images_dir.resolve()
    (images_dir / PARTS_DIR).mkdir(parents=True, exist_ok=True)
    records: dict[Path, dict] = {}
    for shard in shards:
        part = images_dir / PARTS_DIR / f"{_shard_name(shard)}.json"
        if part.is_file():
            records[shard] = json.loads(part.read_text())
    done_before = len(records)
    pending = [s for s in shards if s not in records]
    samples = sum(len(r["rows"]) for r in records.values())
    parallel = args.workers > 1 and len(pending) > 1
    bar_options = {"unit": "shard", "completed": done_before, "enabled": not args.no_progress}
    with ProcessPoolExecutor(args.workers) if parallel else contextlib.nullcontext() as pool, \
            progress_bar(len(shards), "shards", **bar_options) as bar:
        results = (pool.map if pool else map)(_convert_and_record, pending, [images_dir] * len(pending))
        for shard, record in zip(pending, results):
            records[shard] = record
            samples += len(record["rows"])
            bar.note(f"{samples} images")
            bar.advance(1)

    rows = [row for shard in shards for row in records[shard]["rows"]]
    skipped = sum((Counter(records[s]["skipped"]) for s in shards), Counter())
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_csv(args.csv, pd.DataFrame(rows, columns=["path", "caption"]))
    print_table(
        f"{args.csv} written",
        ["shards", "converted now", "done before", "rows written", "skipped"],
        [[len(shards), len(pending), done_before, len(rows), format_counter(skipped)]],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
