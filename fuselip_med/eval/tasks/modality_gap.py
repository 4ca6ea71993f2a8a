"""``modality-gap``: image-only vs caption embeddings of ``test`` (:mod:`fuselip_med.eval.modality_gap`)."""
from __future__ import annotations

from ..modality_gap import modality_gap
from .context import EvalContext

__all__ = ["run"]


def run(ctx: EvalContext) -> dict:
    """Centroid distance, cosine of means and mean paired cosine."""
    ic, keep, img, txt = ctx.embed_image_caption("test")
    return {"metrics": modality_gap(img, txt, paired=True), "n": len(keep), "kinds": ["image", "caption"],
            **ctx.rows(ic, keep)}
