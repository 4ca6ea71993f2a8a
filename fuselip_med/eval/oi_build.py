"""Build the OI-Crop and OI-Pos task files from Open Images V7 box annotations (used by
``data_tools/build_oi_tasks.py``; read by :mod:`fuselip_med.eval.tasks.open_images`).

Inputs: the boxes CSV of a split (``oidv7-test-annotations-bbox.csv`` / ``test-annotations-bbox.csv``:
``ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,IsGroupOf,IsDepiction,
IsInside``, coordinates normalised to [0, 1]), the class names (``oidv7-class-descriptions-boxable.csv``:
``LabelName,DisplayName``, with or without a header) and the split's images (``<ImageID>.jpg``; their sizes
turn the coordinates into pixels). Output: the released files' format (FuseLIP ``data/oi-crop.json`` and
``data/oi-crop-positional-v3.json``), boxes in pixels.

Rules. FuseLIP's appendix describes them in words (box size, aspect and overlap filters, label frequency caps,
4 same-image + 5 other-image candidates, "The {object} on the left/right" with two instances and two border
decoys); the constants below are read off the released task files (``iou_thresh`` 0.6 in their ``meta``, 10
candidates per OI-Crop sample, the decoy geometry of OI-Pos) and are parameters of :class:`OIRules`:

1. A box is kept iff it is not a group, depiction or inside-view box (``IsGroupOf``/``IsDepiction``/
   ``IsInside`` = 0), both sides are >= ``min_size`` px, its aspect ratio (long / short side) is <=
   ``max_aspect``, and its IoU with every other annotated box of the image is <= ``max_iou``.
2. OI-Crop: a kept box whose label occurs once among the image's kept boxes, whose image has >= 4 kept boxes of
   other labels and whose label has kept boxes in >= 5 other images gives a sample: query = (image, label
   name); candidates = the box, 4 same-image boxes of other labels, 5 boxes of the label from other images
   (chosen by a ``numpy.random.default_rng(seed)``). At most ``max_per_label`` samples per label.
3. OI-Pos: an image with exactly two kept boxes of a label, horizontally apart (one ends left of where the other
   starts), gives a sample "The {label} on the left" or "... on the right" (side drawn by the rng): candidates =
   the named instance, the other instance, then up to two border decoys. A decoy belongs to one instance: a
   square in the free space between it and the image border, ``margin`` px away from it, outward horizontally
   (left of the left instance, right of the right one) or else above, or else below; its side is that gap
   (at most the image's other side), centred on the instance along the other axis and shifted into the image;
   it must be >= ``min_decoy`` px and overlap neither instance. Samples need >= 1 decoy; at most
   ``max_per_label`` samples per label.
"""
from __future__ import annotations

import csv
import json
import os
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fuselip_med.io import atomic_write_text

__all__ = ["OIRules", "Box", "read_class_names", "read_boxes", "filter_boxes", "build_oi_crop", "build_oi_pos",
           "decoys_for", "build_oi_tasks"]


@dataclass(frozen=True)
class OIRules:
    """The builder's parameters (defaults: see the module docstring)."""

    min_size: float = 64.0
    max_aspect: float = 3.0
    max_iou: float = 0.6
    same_image: int = 4
    other_images: int = 5
    max_per_label: int = 10
    margin: float = 10.0
    min_decoy: float = 32.0
    seed: int = 0


@dataclass(frozen=True)
class Box:
    """One annotated box in pixels (x0, y0) - (x1, y1) of image ``image`` (W x H)."""

    image: str
    label: str
    x0: float
    y0: float
    x1: float
    y1: float
    group: bool = False
    depiction: bool = False
    inside: bool = False

    def entry(self, name: str) -> dict:
        return {"ImageID": self.image, "LabelName": name,
                "bbox": {"XMin": self.x0, "XMax": self.x1, "YMin": self.y0, "YMax": self.y1}}


def read_class_names(file: str | os.PathLike) -> dict[str, str]:
    """LabelName (``/m/...``) -> DisplayName."""
    with open(file, newline="", encoding="utf-8") as handle:
        return {row[0]: row[1] for row in csv.reader(handle) if len(row) >= 2 and row[0] != "LabelName"}


def read_boxes(file: str | os.PathLike, image_sizes: dict[str, tuple[int, int]]) -> tuple[list[Box], Counter]:
    """The boxes of images in ``image_sizes`` ({ImageID: (W, H)}), in pixels rounded to 1e-4; (boxes, skipped
    reasons)."""
    boxes, skipped = [], Counter()
    with open(file, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            size = image_sizes.get(row["ImageID"])
            if size is None:
                skipped["image not found"] += 1
                continue
            w, h = size
            x0, x1, y0, y1 = (round(float(row[k]) * s, 4) for k, s in (("XMin", w), ("XMax", w), ("YMin", h),
                                                                          ("YMax", h)))
            boxes.append(Box(row["ImageID"], row["LabelName"], x0, y0, x1, y1, row.get("IsGroupOf") == "1",
                             row.get("IsDepiction") == "1", row.get("IsInside") == "1"))
    return boxes, skipped


def _iou(a: Box, b: Box) -> float:
    iw = max(0.0, min(a.x1, b.x1) - max(a.x0, b.x0))
    ih = max(0.0, min(a.y1, b.y1) - max(a.y0, b.y0))
    inter = iw * ih
    union = (a.x1 - a.x0) * (a.y1 - a.y0) + (b.x1 - b.x0) * (b.y1 - b.y0) - inter
    return inter / union if union > 0 else 0.0


def filter_boxes(boxes: list[Box], rules: OIRules) -> tuple[list[Box], dict[Box, str]]:
    """Rule 1: (kept boxes in input order, {dropped box: reason})."""
    by_image: dict[str, list[Box]] = defaultdict(list)
    for b in boxes:
        by_image[b.image].append(b)
    kept, dropped = [], {}
    for b in boxes:
        w, h = b.x1 - b.x0, b.y1 - b.y0
        if b.group or b.depiction or b.inside:
            dropped[b] = "group/depiction/inside"
        elif min(w, h) < rules.min_size:
            dropped[b] = "small"
        elif max(w, h) / min(w, h) > rules.max_aspect:
            dropped[b] = "aspect"
        elif any(o is not b and _iou(b, o) > rules.max_iou for o in by_image[b.image]):
            dropped[b] = "overlap"
        else:
            kept.append(b)
    return kept, dropped


def build_oi_crop(kept: list[Box], names: dict[str, str], rules: OIRules) -> list[dict]:
    """Rule 2: OI-Crop samples in the released format."""
    rng = np.random.default_rng(rules.seed)
    by_image: dict[str, list[Box]] = defaultdict(list)
    by_label: dict[str, list[Box]] = defaultdict(list)
    for b in kept:
        by_image[b.image].append(b)
        by_label[b.label].append(b)
    per_label: Counter = Counter()
    samples = []
    for image in sorted(by_image):
        boxes = by_image[image]
        counts = Counter(b.label for b in boxes)
        for b in boxes:
            if counts[b.label] != 1 or per_label[b.label] >= rules.max_per_label:
                continue
            same = [o for o in boxes if o.label != b.label]
            other = [o for o in by_label[b.label] if o.image != image]
            if len(same) < rules.same_image or len(other) < rules.other_images:
                continue
            picks = [same[i] for i in sorted(rng.choice(len(same), rules.same_image, replace=False))]
            picks += [other[i] for i in sorted(rng.choice(len(other), rules.other_images, replace=False))]
            name = names.get(b.label, b.label)
            samples.append({"query_img": image, "query_target": name,
                            "retrieval_samples": [b.entry(name)] + [o.entry(names.get(o.label, o.label))
                                                                      for o in picks]})
            per_label[b.label] += 1
    return samples


def decoys_for(instance: Box, side: str, instances: list[Box], size: tuple[int, int], rules: OIRules
               ) -> Box | None:
    """Rule 3's border decoy for ``instance`` ("left" or "right" instance), or None."""
    width, height = size
    m = rules.margin
    cx, cy = (instance.x0 + instance.x1) / 2, (instance.y0 + instance.y1) / 2
    for direction in ("left" if side == "left" else "right", "up", "down"):
        gap = {"left": instance.x0 - m, "right": width - instance.x1 - m, "up": instance.y0 - m,
               "down": height - instance.y1 - m}[direction]
        horizontal = direction in ("left", "right")
        s = round(min(gap, height if horizontal else width))
        if s < rules.min_decoy:
            continue
        if horizontal:
            x0 = 0 if direction == "left" else width - s
            y0 = int(min(max(round(cy - s / 2), 0), height - s))
        else:
            y0 = 0 if direction == "up" else height - s
            x0 = int(min(max(round(cx - s / 2), 0), width - s))
        decoy = Box(instance.image, "neg", x0, y0, x0 + s, y0 + s)
        if all(min(decoy.x1, o.x1) <= max(decoy.x0, o.x0) or min(decoy.y1, o.y1) <= max(decoy.y0, o.y0)
               for o in instances):
            return decoy
    return None


def build_oi_pos(kept: list[Box], names: dict[str, str], sizes: dict[str, tuple[int, int]], rules: OIRules
                 ) -> dict[str, list[dict]]:
    """Rule 3: OI-Pos samples {label name: [sample, ...]} in the released format."""
    rng = np.random.default_rng(rules.seed)
    groups: dict[tuple[str, str], list[Box]] = defaultdict(list)
    for b in kept:
        groups[(b.image, b.label)].append(b)
    out: dict[str, list[dict]] = defaultdict(list)
    for (image, label), boxes in sorted(groups.items()):
        name = names.get(label, label)
        if len(boxes) != 2 or len(out[name]) >= rules.max_per_label:
            continue
        left, right = sorted(boxes, key=lambda b: b.x0)
        if left.x1 > right.x0:
            continue
        side = "left" if rng.random() < 0.5 else "right"
        target, other = (left, right) if side == "left" else (right, left)
        decoys = [d for d in (decoys_for(left, "left", boxes, sizes[image], rules),
                              decoys_for(right, "right", boxes, sizes[image], rules)) if d is not None]
        if not decoys:
            continue
        out[name].append({"query_img": image, "query_target": f"The {name.lower()} on the {side}", "label": name,
                          "bbox": target.entry(name)["bbox"],
                          "retrieval_samples": [target.entry(name), other.entry(name)]
                          + [d.entry("neg") for d in decoys]})
    return dict(out)


def build_oi_tasks(boxes_csv: str | os.PathLike, classes_csv: str | os.PathLike, images: str | os.PathLike,
                   out_dir: str | os.PathLike, *, subset: str = "test", rules: OIRules = OIRules()) -> dict:
    """Read the annotations, apply the rules and write ``oi-crop.json`` and ``oi-pos.json`` (atomically) into
    ``out_dir``; returns the counts (boxes read/kept/dropped by reason, samples per task)."""
    from PIL import Image

    folder = Path(images).expanduser()
    files, sizes = {}, {}
    for file in sorted(folder.iterdir()):
        if file.suffix.lower() in (".jpg", ".jpeg", ".png"):
            with Image.open(file) as im:  # reads the header only
                files[file.stem], sizes[file.name] = file.name, im.size
    raw, skipped = read_boxes(boxes_csv, {stem: sizes[name] for stem, name in files.items()})
    boxes = [Box(files[b.image], b.label, b.x0, b.y0, b.x1, b.y1, b.group, b.depiction, b.inside) for b in raw]
    names = read_class_names(classes_csv)
    kept, dropped = filter_boxes(boxes, rules)
    crop = build_oi_crop(kept, names, rules)
    pos = build_oi_pos(kept, names, sizes, rules)
    counts = {"boxes": len(boxes), "kept": len(kept), "dropped": dict(Counter(dropped.values())),
              "skipped": dict(skipped), "oi_crop_samples": len(crop),
              "oi_pos_samples": int(sum(len(v) for v in pos.values()))}
    out = Path(out_dir)
    meta = {"subset": subset, "iou_thresh": rules.max_iou, "rules": asdict(rules), "counts": counts}
    atomic_write_text(out / "oi-crop.json", json.dumps({"meta": {**meta, "length": len(crop)}, "data": crop},
                                                      indent=1))
    atomic_write_text(out / "oi-pos.json", json.dumps({"meta": {**meta, "length": counts["oi_pos_samples"]},
                                                       "data": pos}, indent=1))
    return counts
