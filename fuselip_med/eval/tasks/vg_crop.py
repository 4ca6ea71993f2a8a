"""``vg-crop`` and ``vg-crop-multi``: VG-Crop (reference-facts section 6.4; FuseLIP ``fuse_eval/eval_vg_crop.py``).

Regions of the Visual Genome test split as the ``vg_crop`` adapter builds them for ``split="test"``: regions
with w, h > 32 px, greedy suppression of regions overlapping an earlier kept region by IoU > 0.3, grouped by
image (consecutive regions of one ``image_id``). Within an image, query = region phrase + full image (fused),
candidates = "" + the crop of every region of that image (fused); a query is correct iff its own crop scores
highest (the argmax of the similarity row equals the diagonal; ties: the first region in the image's order).
Accuracy = correct / queries.

Image selection:

- ``vg-crop`` (the paper's protocol, official selection): every image that keeps at least one region, in file
  order, the first ``vg_images`` (default 100) of them. An image with a single kept region is a query with one
  candidate, always correct, and it counts, as in the official loop. The official loop closes an image's group
  only when the next image starts, so the *last* image of the file is never scored; this is reproduced (it only
  matters when the file holds no more than ``vg_images`` images).
- ``vg-crop-multi`` (a stricter variant, not the paper's): only images with at least two kept regions, the last
  image of the file included; every query then has a real choice.
"""
from __future__ import annotations

from collections import Counter

from fuselip_med.errors import InputError
from fuselip_med.inference.items import EmbedItem, sample_image_key

from .context import EvalContext
from .pools import score_pools

__all__ = ["run", "run_multi", "image_groups"]

PROTOCOL_OFFICIAL = "official: first images with >= 1 kept region, file order, last image of the file unscored"
PROTOCOL_MULTI = "variant: first images with >= 2 kept regions (not the paper's selection)"


def image_groups(source, *, min_regions: int, n_images: int, close_last: bool) -> list[list]:
    """Consecutive runs of ``source``'s samples with one ``meta["image_id"]``: the first ``n_images`` runs of at
    least ``min_regions`` samples. ``close_last=False`` leaves the trailing run out, as the official loop does."""
    images: list[list] = []
    current: list = []

    def close(run: list) -> None:
        if len(run) >= min_regions and len(images) < n_images:
            images.append(run)

    for i in range(len(source)):
        sample = source[i]
        if current and sample.meta["image_id"] != current[0].meta["image_id"]:
            close(current)
            current = []
            if len(images) == n_images:
                return images
        current.append(sample)
    if close_last and current:
        close(current)
    return images


def _score(ctx: EvalContext, images: list[list], protocol: str) -> dict:
    pools, answers = [], []
    for regions in images:
        crops = [EmbedItem(image=s.target.image, text="") for s in regions]
        for k, s in enumerate(regions):
            query = EmbedItem(image=s.query.image, text=s.query.text, image_key=sample_image_key(s, s.query.image))
            pools.append((query, crops))
            answers.append(k)
    skipped: Counter = Counter()
    correct = score_pools(ctx, pools, "embedding VG-Crop", skipped, answers)
    if not len(correct):
        raise InputError("no VG-Crop pool could be scored")
    single = sum(1 for regions in images if len(regions) == 1)
    return {"metrics": {"accuracy": float(correct.mean())}, "n": int(len(correct)), "n_images": len(images),
            "n_single_region_images": single, "n_correct": int(correct.sum()), "protocol": protocol,
            "skipped": dict(skipped), "seed": None}


def run(ctx: EvalContext) -> dict:
    """VG-Crop with the official image selection (module docstring); accuracy over all regions scored."""
    source = ctx.source("vg_crop", group_size=1)
    images = image_groups(source, min_regions=1, n_images=ctx.opts.vg_images, close_last=False)
    if not images:
        raise InputError(f"no Visual Genome test image under {ctx.path('vg_crop')} keeps a region after the "
                         "filters (the official loop never scores the file's last image)")
    return _score(ctx, images, PROTOCOL_OFFICIAL)


def run_multi(ctx: EvalContext) -> dict:
    """VG-Crop over images with two or more kept regions only (the stricter variant)."""
    source = ctx.source("vg_crop", group_size=1)
    images = image_groups(source, min_regions=2, n_images=ctx.opts.vg_images, close_last=True)
    if not images:
        raise InputError(f"no Visual Genome test image under {ctx.path('vg_crop')} has two or more regions")
    return _score(ctx, images, PROTOCOL_MULTI)
