"""The search page of ``fuselip-med serve`` (Gradio; imported only by that command, from the ``[app]`` extra).

A text box, an image upload (PNG/JPEG/DICOM) with an optional instruction (fused with the image into one
query), a grid of result thumbnails with rank, score, id and caption, "more like this" on a selected
result, and "why did it match?": the occlusion map (``explain``) of the selected result against the query,
computed on demand with a progress bar. Thumbnails of DICOM rows and series slices are the index's own PNGs;
others are rendered on the server from the paths recorded in the index and handed to Gradio as images, so the
page never serves a file by path: nothing outside the index (not even the indexed files themselves) is
reachable through it.
"""
from __future__ import annotations

import functools
import io
import os
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a hospital network

import gradio as gr  # noqa: E402
from PIL import Image  # noqa: E402

from fuselip_med.data.phi import is_instance_key  # noqa: E402
from fuselip_med.explain.occlusion import OcclusionExplainer  # noqa: E402
from fuselip_med.explain.page import explain_hit  # noqa: E402
from fuselip_med.search.index import THUMBNAIL_PX, SearchIndex  # noqa: E402
from fuselip_med.search.query import Hit, more_like_this, search  # noqa: E402

__all__ = ["build_app", "public_record", "results_table", "serve", "thumbnail"]

CSS = "#status th:nth-child(-n+2), #status td:nth-child(-n+2) { white-space: nowrap; }"


def thumbnail(source: Any, size: int = THUMBNAIL_PX) -> Image.Image:
    """An 8-bit RGB thumbnail (longest side ``size`` px) of a PNG/JPEG/DICOM image; DICOM is windowed with its
    own VOI LUT / window center and width (``data.images.load_image``). Raises ``ImageDecodeError``."""
    from fuselip_med.data.images import load_image

    image = load_image(source).convert("RGB")
    image.thumbnail((size, size))
    return image


def _label(hit: Hit, show_paths: bool = False) -> str:
    if hit.unit != "image":
        path = f" — {hit.path}" if show_paths and hit.path else ""
        return (f"{hit.rank} · {hit.score:.3f} · study {hit.study} / series {hit.series} / slice {hit.best_slice}"
                f"{path}")
    caption = f" — {hit.caption}" if hit.caption else ""
    path = f" — {hit.path}" if show_paths and hit.path and is_instance_key(hit.id) else ""
    return f"{hit.rank} · {hit.score:.3f} · {hit.id}{caption}{path}"


def _blank(text_colour: tuple[int, int, int] = (64, 64, 64)) -> Image.Image:
    return Image.new("RGB", (THUMBNAIL_PX, THUMBNAIL_PX), text_colour)


def _may_show(path: str, allow_burned_in: bool) -> bool:
    """False for a DICOM whose pixels may carry burned-in text (``phi.burned_in_risk``) unless allowed."""
    if allow_burned_in:
        return True
    from fuselip_med.data.images import is_dicom

    if not is_dicom(path):
        return True
    import pydicom

    from fuselip_med.data.phi import burned_in_risk

    return not burned_in_risk(pydicom.dcmread(path, stop_before_pixels=True))


def _stored(path) -> Image.Image:
    """A thumbnail the index keeps (a grey tile when it is gone)."""
    if not path.is_file():
        return _blank()
    with Image.open(path) as image:
        return image.convert("RGB")


def public_record(hit: Hit, show_paths: bool) -> dict:
    """What the page's state holds of a hit: no stored DICOM path (series/study rows, keyed DICOM image rows)
    unless the index was built with --show-paths."""
    record = hit.to_dict()
    if not show_paths and (hit.unit != "image" or is_instance_key(hit.id)):
        record["path"] = None
    return record


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

    allow_burned_in, show_paths = index.privacy.allow_burned_in, index.privacy.show_paths

    @functools.lru_cache(maxsize=1024)
    def row_thumbnail(row: int) -> Image.Image:
        stored = index.row_thumbnail_path(row)  # a DICOM row's own PNG in the index
        if stored is not None:
            return _stored(stored)
        path = index.meta.iloc[row]["path"]
        if is_instance_key(str(index.meta.iloc[row]["id"])):  # a DICOM row without thumbnail: burned-in risk
            return _blank()
        try:
            return thumbnail(path) if path and _may_show(path, allow_burned_in) else _blank()
        except (ValueError, OSError):  # a file changed or removed since the build: a grey tile, not a crash
            return _blank()

    @functools.lru_cache(maxsize=1024)
    def slice_thumbnail(slice_row: int) -> Image.Image:
        stored = index.thumbnail_path(slice_row)  # the index's own PNG; None: burned-in risk, not shown
        return _blank() if stored is None else _stored(stored)

    def show(hits: list[Hit], what: str):
        grid = [(slice_thumbnail(h.slice_row) if h.slice_row is not None else row_thumbnail(h.row),
                 _label(h, show_paths)) for h in hits]
        if index.unit != "image":
            rows = "\n".join(f"| {h.rank} | {h.score:.3f} | {h.study} | {h.series} | {h.best_slice} |" for h in hits)
            table = (f"**{what}**: {len(hits)} results\n\n| rank | score | study | series | best slice |\n"
                     f"|---|---|---|---|---|\n{rows}")
            return grid, table, [public_record(h, show_paths) for h in hits], None
        return (grid, results_table(hits, what, index.directory, viewer_url),
                [public_record(h, show_paths) for h in hits], None)

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

    def asked(text: str, image_path: str | None, instruction: str):
        return {"text": text, "image": image_path, "instruction": instruction}

    explainer = OcclusionExplainer()

    def why(hits: list[dict], selected: int | None, query: dict | None, progress=gr.Progress()):
        if selected is None or not hits or selected >= len(hits):
            return None, "Select a result first, then press “Why did it match?”."
        hit = hits[selected]
        if not hit.get("path"):  # a DICOM row or a series keeps no path: explain the index's own thumbnail
            stored = (index.thumbnail_path(hit["slice_row"]) if hit.get("slice_row") is not None
                      else index.row_thumbnail_path(hit["row"]))
            if stored is None or not stored.is_file():
                return None, "No map: the index keeps no image of this result (burned-in text risk)."
            hit = {**hit, "path": str(stored)}
        png, note = explain_hit(model, explainer, hit, query,
                                lambda done, total: progress((done, total), desc="hiding cells"))
        return (Image.open(io.BytesIO(png)) if png else None), note

    def more(hits: list[dict], selected: int | None):
        if selected is None or not hits or selected >= len(hits):
            return gr.skip(), "Select a result first, then press “More like this”.", gr.skip(), None
        id = hits[selected]["id"]
        return show(more_like_this(index, id, k=k), f"more like {id}")

    noun = {"image": "images", "series": "series", "study": "studies"}[index.unit]
    title = f"FuseLIP-med search · {len(index)} {noun} · model {index.model}"
    with gr.Blocks(title="FuseLIP-med search", analytics_enabled=False) as page:
        gr.Markdown(f"### {title}")
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                text = gr.Textbox(label="Search text", placeholder="CT with a left pleural effusion",
                                  elem_id="query-text")
                upload = gr.File(label="Query image (PNG, JPEG or DICOM)", type="filepath",
                                 elem_id="query-image")
                shown = gr.Image(label="Query image", interactive=False, height=180, elem_id="query-preview")
                instruction = gr.Textbox(label="Instruction (optional, fused with the image)",
                                         placeholder="the same study, lateral view", elem_id="instruction")
                go = gr.Button("Search", variant="primary", elem_id="search-button")
            with gr.Column(scale=3):
                gallery = gr.Gallery(label="Results", columns=4, allow_preview=False, object_fit="contain", buttons=[],
                                     elem_id="results", interactive=False)
                with gr.Row():
                    more_button = gr.Button("More like this (select a result first)", elem_id="more-like-this")
                    why_button = gr.Button("Why did it match? (select a result first)", elem_id="why")
                status = gr.Markdown(elem_id="status")
                why_note = gr.Markdown(elem_id="why-note")
                why_map = gr.Image(label="Why did it match?", interactive=False, elem_id="why-map")
        hits_state = gr.State([])
        selected = gr.State(None)
        query_state = gr.State(None)  # the query behind the results shown ("why" explains against it)
        outputs = [gallery, status, hits_state, selected]
        query = [text, upload, instruction]
        text.submit(run_query, query, outputs).then(asked, query, query_state)
        instruction.submit(run_query, query, outputs).then(asked, query, query_state)
        go.click(run_query, query, outputs).then(asked, query, query_state)
        upload.upload(preview, upload, shown).then(run_query, query, outputs).then(asked, query, query_state)
        upload.clear(lambda: None, None, shown)
        gallery.select(remember, None, selected)
        more_button.click(more, [hits_state, selected], outputs).then(lambda: None, None, query_state)
        why_button.click(why, [hits_state, selected, query_state], [why_map, why_note], concurrency_limit=1)
    return page


def serve(index: SearchIndex, model, *, host: str = "127.0.0.1", port: int = 7860, k: int = 12,
          viewer_url: str | None = None) -> None:
    """Serve the page until interrupted. Only Gradio's own cache (the rendered thumbnails and uploads) is served:
    no ``allowed_paths``, so no file is reachable by its path."""
    print(f"Serving {index.directory} ({len(index)} {index.unit} rows) on http://{host}:{port}", flush=True)
    build_app(index, model, k=k, viewer_url=viewer_url).launch(server_name=host, server_port=port, show_error=False,
                                                               quiet=True, css=CSS)
