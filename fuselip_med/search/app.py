"""The search page of ``fuselip-med serve`` (Gradio; imported only by that command, from the ``[app]`` extra).

A text box, an image upload (PNG/JPEG/DICOM) with an optional instruction (fused with the image into one
query), a grid of result thumbnails with rank, score, id and caption, and "more like this" on a selected
result. Thumbnails are rendered on the server from the paths recorded in the index (DICOM through its VOI LUT
or window, as ``data.images.load_image`` does) and handed to Gradio as images, so the page never serves a file
by path: nothing outside the index (not even the indexed files themselves) is reachable through it.
"""
from __future__ import annotations

import functools
import os
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a hospital network

import gradio as gr  # noqa: E402
from PIL import Image  # noqa: E402

from fuselip_med.search.index import SearchIndex  # noqa: E402
from fuselip_med.search.query import Hit, more_like_this, search  # noqa: E402

__all__ = ["build_app", "results_table", "serve", "thumbnail"]

THUMBNAIL_PX = 256
UPLOAD_TYPES = [".png", ".jpg", ".jpeg", ".dcm", ".dicom"]
CSS = "#status th:nth-child(-n+2), #status td:nth-child(-n+2) { white-space: nowrap; }"


def thumbnail(source: Any, size: int = THUMBNAIL_PX) -> Image.Image:
    """An 8-bit RGB thumbnail (longest side ``size`` px) of a PNG/JPEG/DICOM image; DICOM is windowed with its
    own VOI LUT / window center and width (``data.images.load_image``). Raises ``ImageDecodeError``."""
    from fuselip_med.data.images import load_image

    image = load_image(source).convert("RGB")
    image.thumbnail((size, size))
    return image


def _label(hit: Hit) -> str:
    caption = f" — {hit.caption}" if hit.caption else ""
    return f"{hit.rank} · {hit.score:.3f} · {hit.id}{caption}"


def results_table(hits: list[Hit], what: str, index_dir, viewer_url: str | None = None) -> str:
    """The markdown status table of ``hits``: rank, score, id, caption and, with ``viewer_url`` (a template with
    {study}, {series}, {instance}; ``search.pacs.viewer_link``), a link to each hit fetched from DICOMweb into the
    index ``index_dir``. Other hits get no link: the page never shows or links a file path."""
    from fuselip_med.search.pacs import viewer_link

    links = [viewer_link(viewer_url, h.path, index_dir) if viewer_url else None for h in hits]
    viewer = " viewer |" if viewer_url else ""
    rows = "\n".join(f"| {h.rank} | {h.score:.3f} | {h.id} | {h.caption or ''} |"
                     + (f" [open]({link}) |" if link else " |" if viewer_url else "")
                     for h, link in zip(hits, links))
    return (f"**{what}**: {len(hits)} results\n\n| rank | score | id | caption |{viewer}\n"
            f"|---|---|---|---|{'---|' if viewer_url else ''}\n{rows}")


def build_app(index: SearchIndex, model, k: int = 12, viewer_url: str | None = None) -> gr.Blocks:
    """The Gradio page over ``index``, querying with ``model`` (already checked against the index); with
    ``viewer_url``, DICOMweb hits link to the study in the PACS viewer (``results_table``)."""

    @functools.lru_cache(maxsize=1024)
    def row_thumbnail(row: int) -> Image.Image:
        path = index.meta.iloc[row]["path"]
        try:
            return thumbnail(path)
        except (ValueError, OSError):  # a file changed or removed since the build: a grey tile, not a crash
            return Image.new("RGB", (THUMBNAIL_PX, THUMBNAIL_PX), (64, 64, 64))

    def show(hits: list[Hit], what: str):
        grid = [(row_thumbnail(h.row), _label(h)) for h in hits]
        return grid, results_table(hits, what, index.directory, viewer_url), [h.to_dict() for h in hits], None

    def run_query(text: str, image_path: str | None, instruction: str):
        from fuselip_med.data.images import ImageDecodeError

        try:
            if image_path:
                what = "image + instruction" if instruction and instruction.strip() else "image"
                return show(search(index, model, image=image_path, text=instruction or None, k=k), what)
            if text and text.strip():
                return show(search(index, model, text=text, k=k), f"text “{text.strip()}”")
        except ImageDecodeError as error:
            return [], f"error: {error}", [], None
        return [], "Type a query, or upload an image (PNG, JPEG or DICOM).", [], None

    def preview(image_path: str | None):
        from fuselip_med.data.images import ImageDecodeError

        if not image_path:
            return None
        try:
            return thumbnail(image_path)
        except ImageDecodeError:
            return None

    def remember(event: gr.SelectData):
        return event.index

    def more(hits: list[dict], selected: int | None):
        if selected is None or not hits or selected >= len(hits):
            return gr.skip(), "Select a result first, then press “More like this”.", gr.skip(), None
        id = hits[selected]["id"]
        return show(more_like_this(index, id, k=k), f"more like {id}")

    title = f"FuseLIP-med search · {len(index)} images · model {index.model}"
    with gr.Blocks(title="FuseLIP-med search", analytics_enabled=False) as page:
        gr.Markdown(f"### {title}")
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                text = gr.Textbox(label="Search text", placeholder="CT with a left pleural effusion",
                                  elem_id="query-text")
                upload = gr.File(label="Query image (PNG, JPEG or DICOM)", file_types=UPLOAD_TYPES, type="filepath",
                                 elem_id="query-image")
                shown = gr.Image(label="Query image", interactive=False, height=180, elem_id="query-preview")
                instruction = gr.Textbox(label="Instruction (optional, fused with the image)",
                                         placeholder="the same study, lateral view", elem_id="instruction")
                go = gr.Button("Search", variant="primary", elem_id="search-button")
            with gr.Column(scale=3):
                gallery = gr.Gallery(label="Results", columns=4, allow_preview=False, object_fit="contain", buttons=[],
                                     elem_id="results", interactive=False)
                more_button = gr.Button("More like this (select a result first)", elem_id="more-like-this")
                status = gr.Markdown(elem_id="status")
        hits_state = gr.State([])
        selected = gr.State(None)
        outputs = [gallery, status, hits_state, selected]
        query = [text, upload, instruction]
        text.submit(run_query, query, outputs)
        instruction.submit(run_query, query, outputs)
        go.click(run_query, query, outputs)
        upload.upload(preview, upload, shown).then(run_query, query, outputs)
        upload.clear(lambda: None, None, shown)
        gallery.select(remember, None, selected)
        more_button.click(more, [hits_state, selected], outputs)
    return page


def serve(index: SearchIndex, model, *, host: str = "127.0.0.1", port: int = 7860, k: int = 12,
          viewer_url: str | None = None) -> None:
    """Serve the page until interrupted. Only Gradio's own cache (the rendered thumbnails and uploads) is served:
    no ``allowed_paths``, so no file is reachable by its path."""
    print(f"Serving {index.directory} ({len(index)} images) on http://{host}:{port}", flush=True)
    build_app(index, model, k=k, viewer_url=viewer_url).launch(server_name=host, server_port=port, show_error=False,
                                                               quiet=True, css=CSS)
