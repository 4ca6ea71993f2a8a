"""The relevance map drawn over the image as the user sees it (DICOM through its window), with a colour bar in
cosine-similarity units, as PNG bytes (matplotlib, Agg backend; imported only when a map is drawn)."""
from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence

import numpy as np
from PIL import Image

from fuselip_med.explain.occlusion import UNITS, OcclusionMap

__all__ = ["overlay_png"]

ALPHA = 0.5  # map opacity over the image
MAX_SIDE_IN = 6.0  # figure size (inches) of the image's longer side


def overlay_png(display: Image.Image, result: OcclusionMap, *, title: str,
                failed: Sequence[str] = (), dpi: int = 110) -> bytes:
    """PNG bytes: ``display`` (8-bit "L" or "RGB" at native size, as ``data.images.load_image`` gives it) with the
    ``result.drops`` grid stretched over it cell by cell (the model input is the image squashed to S x S, so
    a cell covers width/grid x height/grid native pixels), a diverging colour map centred on 0 (red: hiding the
    cell lowers the similarity), a colour bar labelled in cosine similarity, ``title`` and, when ``failed`` names
    sanity checks, a red line saying the map failed them."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    width, height = display.size
    scale = MAX_SIDE_IN / max(width, height)
    figure = Figure(figsize=(width * scale + 1.8, height * scale + 0.9), dpi=dpi, layout="constrained")
    axes = figure.add_subplot()
    pixels = np.asarray(display)
    axes.imshow(pixels, cmap="gray" if pixels.ndim == 2 else None, vmin=0, vmax=255, interpolation="lanczos")
    limit = float(np.abs(result.drops).max()) or 1e-6
    heat = axes.imshow(result.drops, cmap="RdBu_r", vmin=-limit, vmax=limit, alpha=ALPHA, interpolation="nearest",
                       extent=(0, width, height, 0))
    axes.set_axis_off()
    bar = figure.colorbar(heat, ax=axes, fraction=0.05, pad=0.02)
    bar.set_label(f"drop in {UNITS} when the cell is hidden\n(similarity before: {result.similarity_before:.3f})",
                  fontsize=8)
    bar.ax.tick_params(labelsize=7)
    axes.set_title("\n".join(textwrap.wrap(title, 70)[:2]), fontsize=9)
    if failed:
        figure.suptitle("SANITY CHECK FAILED: " + ", ".join(failed) + " (do not trust this map)", color="#c00000",
                        fontsize=8, weight="bold")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()
