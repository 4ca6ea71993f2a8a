"""``vg-crop``: VG-Crop (reference-facts section 6.4; FuseLIP ``fuse_eval/eval_vg_crop.py``).

Regions of the Visual Genome test split as the ``vg_crop`` adapter builds them for ``split="test"``: regions
with w, h > 32 px, greedy suppression of regions overlapping an earlier kept region by IoU > 0.3, grouped by
image; the first ``vg_images`` (default 100) images with at least two regions are used. Within an image,
query = region phrase + full image (fused), candidates = "" + the crop of every region of that image (fused);
a query is correct iff its own crop scores highest (the argmax of the similarity row equals the
diagonal; ties: the first region in the image's order). Accuracy = correct / queries.
"""
from __future__ import annotations

from collections import Counter

from ..embedding import EmbedItem, sample_image_key
from .context import EvalContext
from .pools import score_pools

__all__ = ["run"]


def run(ctx: EvalContext) -> dict:
    """Accuracy over all regions of the evaluated images."""
    source = ctx.source("vg_crop", group_size=1)
    images: list[list] = []
    current: list = []
    for i in range(len(source)):  # the adapter lists an image's regions together
        s = source[i]
        if current and s.meta["image_id"] != current[0].meta["image_id"]:
            if len(current) >= 2:
                images.append(current)
            current = []
            if len(images) == ctx.opts.vg_images:
                break
        current.append(s)
    if len(current) >= 2 and len(images) < ctx.opts.vg_images:
        images.append(current)
    if not images:
        raise ValueError(f"no Visual Genome test image under {ctx.path('vg_crop')} has two or more regions")
    pools, answers = [], []
    for regions in images:
        crops = [EmbedItem(image=s.target_image, text="") for s in regions]
        for k, s in enumerate(regions):
            query = EmbedItem(image=s.query_image, text=s.query_text, image_key=sample_image_key(s, s.query_image))
            pools.append((query, crops))
            answers.append(k)
    skipped: Counter = Counter()
    correct = score_pools(ctx, pools, "embedding VG-Crop", skipped, answers)
    if not len(correct):
        raise ValueError("no VG-Crop pool could be scored")
    return {"metrics": {"accuracy": float(correct.mean())}, "n": int(len(correct)), "n_images": len(images),
            "skipped": dict(skipped), "seed": None}
