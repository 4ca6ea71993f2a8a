"""The search page's "why did it match?": the occlusion map of one result against the query that found it."""
from __future__ import annotations

from typing import Any

from fuselip_med.explain.occlusion import ExplainError, OcclusionExplainer, ProgressFn, load_explain_image
from fuselip_med.explain.overlay import overlay_png

__all__ = ["explain_hit"]


def explain_hit(model, explainer: OcclusionExplainer, hit: dict[str, Any], query: dict[str, Any] | None,
                on_progress: ProgressFn | None = None) -> tuple[bytes | None, str]:
    """(overlay PNG or None, a sentence for the page) for ``hit`` (``search.query.Hit.to_dict()``) and ``query``
    (``{"text", "image", "instruction"}`` as typed): a text query explains the result image vs the text, an image +
    instruction query the fused query vs the result image; other queries ("more like this", an image alone) and
    unreadable images get a sentence saying why there is no map."""
    from fuselip_med.data.images import ImageDecodeError

    query = query or {}
    instruction = (query.get("instruction") or "").strip()
    text = (query.get("text") or "").strip()
    if query.get("image") and not instruction:
        return None, "“Why” explains a text query or an image + instruction query; add an instruction and search."
    if not query.get("image") and not text:
        return None, "“Why” explains a text query or an image + instruction query; run one, then select a result."
    try:
        display, pixels = load_explain_image(hit["path"], explainer.grid)
        query_pixels = load_explain_image(query["image"], 1)[1] if query.get("image") else None
        words = instruction if query_pixels is not None else text
        result = explainer(model, pixels, words, query_image=query_pixels, on_progress=on_progress)
    except (ImageDecodeError, ExplainError) as error:
        return None, f"No map: {error}"
    asked = f"the query image + “{words}”" if query_pixels is not None else f"“{words}”"
    title = f"why {hit['id']} matched {asked}"
    row, col = result.max_cell
    note = (f"**{hit['id']}** vs {asked}: similarity {result.similarity_before:.3f}; hiding the cell at row {row + 1}, "
            f"column {col + 1} lowers it most (by {result.drops[row, col]:.3f}). Red: the match needs the region; "
            "the map shows where the model looks, not a diagnosis.")
    return overlay_png(display, result, title=title), note
