#!/usr/bin/env python
"""Download ROCOv2 from the Hugging Face mirror and write the official release layout.

    python data_tools/download_rocov2.py --out ROCOv2_data            # the whole mirror (about 18.6 GB)
    python data_tools/download_rocov2.py --out ROCOv2_data --limit 50 # 50 images per split, for a try
    python data_tools/download_rocov2.py --source DIR --out ROCOv2_data  # a local copy of the mirror's parquet files

What it writes under --out (the layout of the official Zenodo release, which the package's rocov2 adapter reads):

    {split}_images/{split}/<ID>.png    image bytes exactly as the mirror stores them (PNG), or <ID>.jpg
                                       with --image-format jpeg (re-encoded, quality --jpeg-quality)
    {split}_captions.csv               ID,Caption
    {split}_concepts_manual.csv        ID,CUIs  (';'-joined; the mirror's ["nan"] becomes an empty field)

for split in train, valid, test (the mirror's "validation" is written as "valid"). Rows whose image_id was
already written are dropped (the mirror's train split has 4 duplicated rows: 59,962 rows, 59,958 images).
The mirror holds neither the automatic concepts (`*_concepts.csv`), nor `cui_mapping.csv`, nor
`license_information.csv`: take those from the official release if you need them.

Interrupting is safe: every image is written to a temp file and renamed; every finished row goes to a
journal under `<out>/.rocov2_download/`, with the stream position saved every --checkpoint-every rows;
the CSVs are written (atomically) from the journal when a split is finished. Rerunning the same command
continues where the last run stopped and ends with the same files an uninterrupted run writes.
The tool runs without the fuselip_med package installed (the download image has only datasets & co).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

if not __package__:  # run as a script: make `data_tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_tools._common import (  # noqa: E402
    atomic_write_bytes,
    atomic_write_csv,
    atomic_write_text,
    print_table,
    progress_bar,
    remove_temp_files,
)

MIRROR_ID = "eltorio/ROCOv2-radiology"
SPLITS = {"train": "train", "valid": "validation", "test": "test"}  # official name -> mirror split name
EXPECTED_UNIQUE = {"train": 59_958, "valid": 9_904, "test": 9_927}  # images per split in MIRROR_ID
STATE_DIR = ".rocov2_download"
COLUMNS = ["image", "image_id", "caption", "cui"]
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_FORMAT_EXT = {"PNG": ".png", "JPEG": ".jpg"}
MOUNTINFO = Path("/proc/self/mountinfo")


class DownloadError(RuntimeError):
    """A problem the user can fix; main() prints it as one line and exits 1."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="download_rocov2",
        description=f"Download ROCOv2 from the Hugging Face mirror {MIRROR_ID} (or a local copy of its parquet "
        "files) into the official ROCOv2 layout. Rerun the same command to resume an interrupted download.",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(os.environ.get("FUSELIP_MED_DATA_DIR", "ROCOv2_data")),
        help="output folder (default: $FUSELIP_MED_DATA_DIR or ./ROCOv2_data)",
    )
    parser.add_argument(
        "--source",
        type=Path,
        help="a local folder with the mirror's parquet files (data/{split}-000NN-of-000MM.parquet) instead of the hub",
    )
    parser.add_argument("--hub-id", default=MIRROR_ID, help=f"dataset repository on the hub (default {MIRROR_ID})")
    parser.add_argument("--revision", help="a branch, tag or commit of --hub-id (default: the newest)")
    parser.add_argument(
        "--splits",
        default="train,valid,test",
        help="comma-separated splits among train,valid,test (default: all three)",
    )
    parser.add_argument("--limit", type=int, help="stop after this many images per split (a quick try)")
    parser.add_argument(
        "--image-format",
        choices=["keep", "jpeg"],
        default="keep",
        help="keep: write the mirror's bytes as they are (PNG, lossless, .png); "
        "jpeg: re-encode to .jpg at --jpeg-quality (smaller files, lossy once more). Default keep",
    )
    parser.add_argument(
        "--jpeg-quality", type=int, default=95, help="JPEG quality for --image-format jpeg (default 95)"
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=500,
        help="save the stream position every N rows; a resumed run re-reads at most N rows (default 500)",
    )
    parser.add_argument("--restart", action="store_true", help="forget the journal in --out and start from scratch")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
        parser.error(f"--splits: unknown split(s) {unknown}; choose among {', '.join(SPLITS)}")
    args.splits = splits
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    if not 1 <= args.jpeg_quality <= 100:
        parser.error("--jpeg-quality must be between 1 and 100")
    if args.checkpoint_every < 1:
        parser.error("--checkpoint-every must be at least 1")
    return args


# ----------------------------------------------------------------------------------------------- sources
def source_files(source: Path, mirror_split: str) -> list[str]:
    """Parquet shards of one split in a local copy of the mirror (``data/`` sub-folder or the folder itself)."""
    for folder in (source / "data", source):
        files = sorted(folder.glob(f"{mirror_split}-*.parquet"))
        if files:
            return [str(f) for f in files]
    raise DownloadError(
        f"no parquet files for split {mirror_split!r} in {source} "
        f"(expected {source}/data/{mirror_split}-000NN-of-000MM.parquet)"
    )


def open_split(args: argparse.Namespace, mirror_split: str):
    """The split as a streaming ``datasets.IterableDataset`` whose ``image`` column holds raw bytes."""
    import datasets

    if args.source is not None:
        ds = datasets.load_dataset(
            "parquet", data_files=source_files(args.source, mirror_split), split="train", streaming=True
        )
    else:
        ds = datasets.load_dataset(args.hub_id, split=mirror_split, revision=args.revision, streaming=True)
    missing = [c for c in COLUMNS if c not in (ds.features or {})]
    if missing:
        raise DownloadError(f"{args.source or args.hub_id}: split {mirror_split!r} lacks the column(s) {missing}")
    return ds.select_columns(COLUMNS).cast_column("image", datasets.Image(decode=False))


def expected_count(args: argparse.Namespace, split: str) -> int | None:
    """Images a complete split must have: the published count for the mirror, the unique source IDs for --source."""
    if args.source is not None:
        import pyarrow.parquet as pq

        ids: set[str] = set()
        for file in source_files(args.source, SPLITS[split]):
            ids.update(clean_id(i) for i in pq.read_table(file, columns=["image_id"]).column(0).to_pylist())
        ids.discard(None)
        full = len(ids)
    elif args.hub_id == MIRROR_ID:
        full = EXPECTED_UNIQUE[split]
    else:
        return None
    return full if args.limit is None else min(full, args.limit)


# ----------------------------------------------------------------------------------------------- rows
def clean_id(raw) -> str | None:
    """``"ROCOv2_2023_train_000001"`` (an extension is dropped); None when unusable as a file name."""
    if not isinstance(raw, str):
        return None
    stem = raw.strip()
    for ext in (".jpg", ".jpeg", ".png"):
        if stem.lower().endswith(ext):
            stem = stem[: -len(ext)]
    return stem if _SAFE_ID.match(stem) and ".." not in stem else None


def clean_cuis(raw) -> str:
    """Mirror ``cui`` list -> official ``CUIs`` field: ';'-joined, "nan"/empty entries dropped."""
    if raw is None:
        return ""
    if isinstance(raw, str):
        raw = raw.split(";")
    return ";".join(c.strip() for c in raw if isinstance(c, str) and c.strip() and c.strip().lower() != "nan")


def encode_image(data: bytes, image_format: str, quality: int) -> tuple[bytes, str]:
    """Check the bytes decode and return (bytes to write, extension). Raises ValueError for a bad image."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            if image_format == "keep" and image.format in _FORMAT_EXT:
                image.verify()
                return data, _FORMAT_EXT[image.format]
            image.load()
            image = image if image.mode in ("L", "RGB") else image.convert("RGB")
            out = io.BytesIO()
            if image_format == "jpeg":
                image.save(out, format="JPEG", quality=quality)
                return out.getvalue(), ".jpg"
            image.save(out, format="PNG")  # "keep" of a format other than PNG/JPEG: store it as PNG
            return out.getvalue(), ".png"
    except Exception as error:  # PIL raises many types for bad data
        raise ValueError(f"undecodable image ({error})") from error


def _write_image(path: Path, data: bytes) -> None:
    """One image, atomically (a module-level function so tests can interrupt a run here)."""
    atomic_write_bytes(path, data)


# ----------------------------------------------------------------------------------------------- journal
@dataclass
class Journal:
    """Rows finished so far in one split, persisted as JSON lines, plus the saved stream position."""

    folder: Path
    split: str
    entries: dict[int, dict] = field(default_factory=dict)  # stream position -> entry
    ids: set[str] = field(default_factory=set)  # IDs with an image written
    state: dict = field(default_factory=dict)  # {"rows": int, "stream": dict, "complete": bool, "limit": int|None}
    _handle: object = field(default=None, repr=False)

    @property
    def lines_path(self) -> Path:
        return self.folder / f"{self.split}.jsonl"

    @property
    def state_path(self) -> Path:
        return self.folder / f"{self.split}.state.json"

    def load(self) -> Journal:
        if self.state_path.exists():
            self.state = json.loads(self.state_path.read_text())
        if self.lines_path.exists():
            good = 0
            with open(self.lines_path, "rb") as handle:
                for line in handle:
                    try:
                        entry = json.loads(line)
                    except ValueError:
                        break  # the last line of an interrupted run may be cut short
                    if not line.endswith(b"\n"):
                        break
                    self._add(entry)
                    good += len(line)
            if good != self.lines_path.stat().st_size:
                os.truncate(self.lines_path, good)  # appends continue on a clean line boundary
        self._handle = open(self.lines_path, "a", encoding="utf-8")
        return self

    def _add(self, entry: dict) -> None:
        self.entries[entry["pos"]] = entry
        if "file" in entry:
            self.ids.add(entry["id"])

    def append(self, entry: dict) -> None:
        self._handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._handle.flush()
        self._add(entry)

    def checkpoint(self, rows: int, stream: dict | None, complete: bool = False, limit: int | None = None) -> None:
        """Make the journal durable, then record the stream position (rows read, datasets state) after it."""
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self.state = {"rows": rows, "stream": stream, "complete": complete, "limit": limit}
        atomic_write_text(self.state_path, json.dumps(self.state))

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()

    def images(self, limit: int | None) -> list[dict]:
        """Entries with an image, in stream order, at most ``limit``."""
        rows = [self.entries[pos] for pos in sorted(self.entries) if "file" in self.entries[pos]]
        return rows if limit is None else rows[:limit]

    def is_done(self, limit: int | None) -> bool:
        if not self.state.get("complete"):
            return False
        done_limit = self.state.get("limit")
        return done_limit is None or (limit is not None and limit <= len(self.images(None)))


def settle_options(state_dir: Path, args: argparse.Namespace) -> None:
    """A folder is continued only with the options it was started with (else the files would mix).

    A hub download is pinned to the commit it started from, so that a resumed run reads the same rows.
    """
    path = state_dir / "options.json"
    started = json.loads(path.read_text()) if path.exists() else None
    if args.source is None and args.revision is None:
        args.revision = started.get("revision") if started else _newest_commit(args.hub_id)
    wanted = {
        "source": str(args.source.resolve()) if args.source is not None else args.hub_id,
        "revision": args.revision if args.source is None else None,
        "image_format": args.image_format,
        "jpeg_quality": args.jpeg_quality if args.image_format == "jpeg" else None,
    }
    if started is None:
        atomic_write_text(path, json.dumps(wanted))
        return
    changed = {k: (started.get(k), v) for k, v in wanted.items() if started.get(k) != v}
    if changed:
        detail = "; ".join(f"{k} was {old!r}, now {new!r}" for k, (old, new) in changed.items())
        raise DownloadError(
            f"{args.out} was started with other options ({detail}): rerun with the same options, "
            "use another --out, or add --restart"
        )


def _newest_commit(hub_id: str) -> str:
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(hub_id).sha
    except Exception as error:  # offline, unknown repository, rate limit, ...
        raise DownloadError(
            f"cannot reach the dataset {hub_id} on the Hugging Face Hub ({type(error).__name__}: {error}); "
            "check the network and rerun, or use --source with a local copy of its parquet files"
        ) from error


# ----------------------------------------------------------------------------------------------- one split
@dataclass
class SplitResult:
    split: str
    rows: int = 0
    duplicates: int = 0
    bad: int = 0
    images: int = 0
    new: int = 0
    expected: int | None = None
    problems: list[str] = field(default_factory=list)


def process_split(args: argparse.Namespace, split: str, state_dir: Path) -> SplitResult:
    images_rel = Path(f"{split}_images") / split
    images_dir = args.out / images_rel
    images_dir.mkdir(parents=True, exist_ok=True)
    remove_temp_files(images_dir)
    result = SplitResult(split, expected=expected_count(args, split))
    journal = Journal(state_dir, split).load()
    try:
        if not journal.is_done(args.limit):
            result.new = _stream_rows(args, split, journal, images_dir, images_rel, result.expected)
        kept = journal.images(args.limit)
        _write_csvs(args.out, split, kept)
    finally:
        journal.close()
    result.rows = len(journal.entries)
    result.duplicates = sum(1 for e in journal.entries.values() if e.get("skip") == "duplicate image_id")
    result.bad = sum(1 for e in journal.entries.values() if "skip" in e) - result.duplicates
    result.images = len(kept)
    result.problems = verify_split(args.out, split, kept, result.expected)
    return result


def row_id(example: dict) -> str:
    image_id = clean_id(example["image_id"])
    return image_id if image_id is not None else str(example["image_id"])


def make_entry(example: dict, position: int, args, seen: set[str], images_dir: Path, images_rel: Path):
    """The journal entry of one mirror row, its image written; returns (entry, whether a file was written)."""
    image_id = clean_id(example["image_id"])
    entry = {"pos": position, "id": row_id(example)}
    image = example["image"] or {}
    if image_id is None:
        return {**entry, "skip": "unusable image_id"}, False
    if image_id in seen:
        return {**entry, "skip": "duplicate image_id"}, False
    if not image.get("bytes"):
        return {**entry, "skip": "no image bytes"}, False
    try:
        data, ext = encode_image(image["bytes"], args.image_format, args.jpeg_quality)
    except ValueError:
        return {**entry, "skip": "undecodable image"}, False
    path = images_dir / f"{image_id}{ext}"
    written = not (path.is_file() and path.stat().st_size == len(data))
    if written:
        _write_image(path, data)
    caption = example["caption"] if isinstance(example["caption"], str) else ""
    entry.update(caption=caption, cuis=clean_cuis(example["cui"]), file=str(images_rel / path.name), size=len(data))
    return entry, written


def _stream_rows(args, split, journal: Journal, images_dir: Path, images_rel: Path, expected: int | None) -> int:
    """Read the split from the saved position on, journaling every row; returns the number of files written."""

    def limit_reached() -> bool:
        return args.limit is not None and len(journal.ids) >= args.limit

    if limit_reached():  # an earlier run got this far but stopped before marking the split complete
        journal.checkpoint(journal.state.get("rows", 0), journal.state.get("stream"), True, args.limit)
        return 0
    dataset = open_split(args, SPLITS[split])
    if journal.state.get("stream"):
        dataset.load_state_dict(journal.state["stream"])
    position = journal.state.get("rows", 0)
    new = 0
    with progress_bar(expected, split, unit="image", completed=len(journal.ids), enabled=not args.no_progress) as bar:
        for example in dataset:
            if position in journal.entries:  # rows after the last checkpoint come again after a resume
                if journal.entries[position]["id"] != row_id(example):
                    raise DownloadError(
                        f"{split} row {position} is {row_id(example)!r} now but was "
                        f"{journal.entries[position]['id']!r}: the source changed since the last run; add --restart"
                    )
            else:
                entry, written = make_entry(example, position, args, journal.ids, images_dir, images_rel)
                journal.append(entry)
                new += written
                bar.advance("file" in entry)
            position += 1
            if limit_reached():
                break
            if position % args.checkpoint_every == 0:
                journal.checkpoint(position, dataset.state_dict())
    journal.checkpoint(position, dataset.state_dict(), True, args.limit)
    return new


def _write_csvs(out: Path, split: str, rows: list[dict]) -> None:
    import pandas as pd

    ids = [r["id"] for r in rows]
    atomic_write_csv(out / f"{split}_captions.csv", pd.DataFrame({"ID": ids, "Caption": [r["caption"] for r in rows]}))
    atomic_write_csv(
        out / f"{split}_concepts_manual.csv", pd.DataFrame({"ID": ids, "CUIs": [r["cuis"] for r in rows]})
    )


def verify_split(out: Path, split: str, rows: list[dict], expected: int | None) -> list[str]:
    """Counts, CSV contents and files on disk agree; returns the problems found (empty when all is well)."""
    import pandas as pd

    problems = []
    if expected is not None and len(rows) != expected:
        problems.append(f"{len(rows)} images, expected {expected}")
    for name in (f"{split}_captions.csv", f"{split}_concepts_manual.csv"):
        frame = pd.read_csv(out / name, dtype=str, keep_default_na=False)
        if len(frame) != len(rows) or frame["ID"].tolist() != [r["id"] for r in rows]:
            problems.append(f"{name} does not list the {len(rows)} images")
        if frame["ID"].duplicated().any():
            problems.append(f"{name} has duplicate IDs")
    damaged = [r["id"] for r in rows if not _file_ok(out / r["file"], r["size"])]
    if damaged:
        problems.append(
            f"{len(damaged)} image files missing or of the wrong size (e.g. {damaged[0]}): rerun with --restart"
        )
    return problems


def _file_ok(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:
        return False


def mount_point_of(path: Path) -> str | None:
    """The mount point holding ``path`` (from /proc/self/mountinfo), or None where that cannot be read."""
    try:
        lines = MOUNTINFO.read_text().splitlines()
    except OSError:
        return None
    target = str(path.resolve())
    best = None
    for line in lines:
        fields = line.split()
        if len(fields) < 5:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) > len(best)):
            best = point
    return best


def check_mounted(out: Path) -> None:
    """In the download image, refuse to write into the container's own file system (lost with the container)."""
    if os.environ.get("FUSELIP_MED_REQUIRE_MOUNT") == "1" and mount_point_of(out) == "/":
        raise DownloadError(
            f"{out} is not a mounted host folder, so the download would vanish with the container. Run\n"
            f'  docker run --rm -u $(id -u):$(id -g) -v "$PWD/ROCOv2_data:{out}" bacor_fuselip_download\n'
            "(or set -e FUSELIP_MED_REQUIRE_MOUNT=0 to write inside the container anyway)"
        )


# ----------------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    state_dir = args.out / STATE_DIR
    try:
        check_mounted(args.out)
        if args.restart and state_dir.exists():
            for file in state_dir.iterdir():
                file.unlink()
        state_dir.mkdir(parents=True, exist_ok=True)
        settle_options(state_dir, args)
        results = [process_split(args, split, state_dir) for split in args.splits]
    except DownloadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to continue where it stopped", file=sys.stderr)
        return 130
    except PermissionError as error:
        print(
            f"error: cannot write there ({error}); make {args.out} writable for uid {os.getuid()}, "
            "or in Docker run the image with -u $(id -u):$(id -g)",
            file=sys.stderr,
        )
        return 1
    except OSError as error:  # network and disk trouble: the journal keeps what was done
        print(f"error: {error}\nrerun the same command to continue where it stopped", file=sys.stderr)
        return 1
    print_table(
        f"ROCOv2 written to {args.out.resolve()}",
        ["split", "rows", "dup", "bad", "images", "new", "expected", "check"],
        [
            [r.split, r.rows, r.duplicates, r.bad, r.images, r.new, "-" if r.expected is None else r.expected,
             "; ".join(r.problems) or "ok"]
            for r in results
        ],
    )
    failed = [r.split for r in results if r.problems]
    if failed:
        print(f"error: verification failed for {', '.join(failed)} (see the table above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
