"""Recipe-level image codes for training (``train.image_codes``): find, build and attach the code cache.

``pixels`` (default): every draw decodes the image and takes a fresh random resized crop (the reference).
``pixel_views``: crops are restricted to the K seeded views a cache would hold, decoded on the fly (the
check that ``cache`` changes nothing but speed). ``cache``: the K views' codes are read from the code cache
(``data/token_cache.py``), built on first use; images the cache lacks are decoded as in ``pixel_views``.

Only direct datasets are cached. Task rows (TGIT) render a freshly transformed image per draw, so their
codes would have to be cached per (image, transform, parameters) instance: the instances are drawn per
epoch from continuous ranges and pools, so caching them would need K views of every possible instance;
they are tokenized on the fly instead (their share of a step's TiTok work is the task's mixture weight).

Under ``accelerate launch`` every process tokenizes its share of the missing images into its own part
cache and the main process merges the parts; a killed build resumes from its committed chunks.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

from fuselip_med.data.dataset import ImageViews, SampleDataset
from fuselip_med.data.hashing import content_hash
from fuselip_med.data.schema import SIDES
from fuselip_med.data.token_cache import (
    PARTS_DIR,
    CodeCache,
    SampleImage,
    ViewSpec,
    load_file_memo,
    merge_parts,
    row_key,
    save_file_memo,
    titok_fingerprint,
    tokenize_views,
)
from fuselip_med.progress import new_progress
from fuselip_med.recipes import Recipe

DEFAULT_CACHE_DIR = "~/.cache/fuselip-med/image-codes"


def cache_directory(recipe: Recipe) -> Path:
    """``train.code_cache``, else ``$FUSELIP_MED_CODE_CACHE``, else ``~/.cache/fuselip-med/image-codes``."""
    configured = recipe.train.code_cache or os.environ.get("FUSELIP_MED_CODE_CACHE") or DEFAULT_CACHE_DIR
    return Path(configured).expanduser()


def view_spec(recipe: Recipe, coder: Any | None) -> ViewSpec:
    """The recipe's views (decode options, K = ``train.code_views``) for the objective's image coder, the FuseLIP
    whose frozen TiTok makes the codes (None, a late-fusion baseline, draws the same views as pixels: ``"pixels"``
    stands for the tokenizer)."""
    from fuselip_med.train.data import decode_options

    tokenizer_id = "pixels" if coder is None else titok_fingerprint(coder.config.image_tokenizer,
                                                                     coder.image_tokenizer)
    return ViewSpec(decode_options(recipe), recipe.train.code_views, tokenizer_id)


def view_entries(dataset: SampleDataset, spec: ViewSpec, memo: dict[str, list],
                 images: dict[str, tuple[str, SampleImage]]) -> list:
    """Per index and side, (content hash, row key) of a dataset's images; fills ``images`` with one
    reference per new key. Unreadable files get None (decoded as usual, then skipped with their reason)."""
    entries = []
    for index in range(len(dataset)):
        sample = dataset.source[index]
        row = []
        for side in SIDES:
            image = sample.side(side).image
            entry = None
            if image is not None and not sample.meta.get("preprocessed", False):
                try:
                    content = content_hash(image, memo)
                except OSError:
                    content = None
                if content is not None:
                    entry = (content, row_key(content, spec))
                    images.setdefault(entry[1], (content, SampleImage(dataset.source, index, side)))
            row.append(entry)
        entries.append(tuple(row))
    return entries


def ensure_code_cache(directory: Path, spec: ViewSpec, images: dict[str, tuple[str, Any]],
                      tokenize: Callable, *, tokens: int = 128, rank: int = 0, world: int = 1,
                      barrier: Callable[[], None] = lambda: None, say: Callable[[str], None] = print,
                      num_workers: int = 0, images_per_batch: int = 16, progress: bool = False) -> CodeCache:
    """The cache under ``directory/views<K>`` holding every image of ``images`` ({key: (content, image)})
    that decodes; missing rows are tokenized (this process's share, ``images_per_batch`` images of K + 1 views
    per committed chunk) and merged by rank 0. ``tokenize``: pixels ``[n, 3, S, S]`` -> ids ``[n, 128]``.

    Rank 0 holds the cache's writer lock (``locks.writer_lock``) throughout: another training sharing the cache
    waits for it (saying whose lock it waits on) and then tokenizes only what the first one did not add."""
    from contextlib import nullcontext

    from fuselip_med.locks import writer_lock

    root = directory / f"views{spec.views}"
    with writer_lock(root, "code cache build", wait=True, say=say) if rank == 0 else nullcontext():
        return _ensure_code_cache(root, spec, images, tokenize, tokens, rank, world, barrier, say, num_workers,
                                  images_per_batch, progress)


def _ensure_code_cache(root: Path, spec: ViewSpec, images: dict[str, tuple[str, Any]], tokenize: Callable,
                       tokens: int, rank: int, world: int, barrier: Callable[[], None], say: Callable[[str], None],
                       num_workers: int, images_per_batch: int, progress: bool) -> CodeCache:
    """``ensure_code_cache``'s work, under the lock."""
    if rank == 0:
        merge_parts(CodeCache(root, spec.views, tokens, say=say), say)  # leftovers of a killed build
    barrier()
    present = CodeCache(root, spec.views, tokens, writable=False, say=lambda message: None)
    missing = [(key, content, image) for key, (content, image) in images.items() if key not in present]
    mine = missing[rank::world]
    if rank == 0 and missing:
        say(f"Caching image codes: {len(missing):,} of {len(images):,} images ({spec.views} views + plain) "
            f"into {root}.")
    part = CodeCache(root / PARTS_DIR / f"rank{rank}", spec.views, tokens, say=say)
    columns = (TextColumn("[bold]codes"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with new_progress(*columns, enabled=bool(progress and rank == 0 and mine)) as bar:
        task = bar.add_task("codes", total=len(mine))
        failed = tokenize_views(part, mine, spec, tokenize, num_workers=num_workers,
                                images_per_batch=images_per_batch, on_batch=lambda n: bar.advance(task, n))
    for key, reason in failed[:3]:
        say(f"code cache: image {key.split('|')[0][:12]}... not cached ({reason}); it is decoded when drawn.")
    barrier()
    if rank == 0:
        merge_parts(CodeCache(root, spec.views, tokens, say=say), say)
    barrier()
    return CodeCache(root, spec.views, tokens, writable=False, say=say)


def attach_image_codes(data: Any, recipe: Recipe, coder: Any | None, *, rank: int = 0, world: int = 1,
                       barrier: Callable[[], None] = lambda: None,
                       say: Callable[[str], None] = print) -> CodeCache | None:
    """Give the direct datasets of ``data`` (a ``TrainData``) their ``ImageViews`` per ``train.image_codes``;
    in ``cache`` mode build what the cache lacks first with ``coder`` (the objective's ``image_coder``: a FuseLIP;
    None for a late-fusion baseline, which gets the same views as pixels). Returns the cache (None without one)."""
    mode = recipe.train.image_codes
    if mode == "pixels":
        return None
    if mode == "cache" and coder is None:  # a late-fusion baseline: no TiTok, reads pixels
        say(f"train.image_codes: cache needs FuseLIP's TiTok codes; the {recipe.model.arch} baseline decodes the "
            "same seeded views from pixels instead (pixel_views).")
        mode = "pixel_views"
    spec = view_spec(recipe, coder)
    directory = cache_directory(recipe)
    memo = load_file_memo(directory)
    images: dict[str, tuple[str, Any]] = {}
    direct = [(named, dataset) for named, dataset in zip(data.sources, data.mixture.datasets) if not named.task]
    entries = [view_entries(dataset, spec, memo, images) for _, dataset in direct]
    cache = None
    if mode == "cache":
        cache = ensure_code_cache(directory, spec, images, coder.image_codes,
                                  tokens=coder.config.num_image_tokens, rank=rank, world=world, barrier=barrier,
                                  say=say, num_workers=recipe.data.num_workers, progress=recipe.logging.progress)
        if rank == 0:
            save_file_memo(directory, memo)
    for (_, dataset), dataset_entries in zip(direct, entries):
        dataset.views = ImageViews(spec, dataset_entries, cache)
    return cache


def cache_codes_for_recipe(recipe: Recipe, say: Callable[[str], None] = print) -> CodeCache:
    """``fuselip-med data cache-codes``: build the code cache of a recipe's training images without training
    (every process of ``accelerate launch`` tokenizes a share). Raises ``DataSetupError`` for missing data."""
    import torch
    from accelerate import Accelerator

    from fuselip_med.core.loading import build_model
    from fuselip_med.core.text_tokenizer import TextTokenizer
    from fuselip_med.train.data import DataSetupError, build_train_data

    if recipe.model.arch != "fuselip":
        raise DataSetupError(f"data cache-codes stores FuseLIP's TiTok codes; model.arch {recipe.model.arch} reads "
                             "pixels and needs no code cache.")
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    cached = recipe.model_copy(update={"train": recipe.train.model_copy(update={"image_codes": "cache"})})
    data = build_train_data(cached, TextTokenizer(), accelerator.process_index, accelerator.num_processes)
    fuselip = build_model(recipe.model.size, init=recipe.model.init).to(accelerator.device).eval()
    cache = attach_image_codes(data, cached, fuselip, rank=accelerator.process_index,
                               world=accelerator.num_processes, barrier=accelerator.wait_for_everyone,
                               say=say if accelerator.is_main_process else lambda message: None)
    if accelerator.is_main_process:
        say(f"Code cache {cache.directory}: {len(cache):,} images, {cache.row_bytes * cache.count / 2**20:.1f} MiB.")
    return cache
