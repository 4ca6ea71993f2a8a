"""TGIT as a task on a base dataset: ``TGITTask(base, "tgit" | "tgit_med")`` is a ``SampleSource`` of pairs.

Each base image is one block: in "train" an identity pair (("", image) -> (caption, None)) with the family's
identity probability, else all training pairs of one type drawn with P proportional to weight / pairs; in
"eval" every type's whole pool (first pair = query). A block of one type is a hard-negative group,
"{base source}/{base id}/{family}/{kind}". Images are split train/eval by a hash of the base id. Pixels
are rendered in ``__getitem__`` from an rng seeded by (seed, base index, kind), after the reference base
preprocessing; rendered images are final (``meta["preprocessed"]``). The adapter registry finds this module
(``fuselip_med.data.adapters.TASK_MODULES``): ``get_adapter("tgit" | "tgit_med")`` gives
``factory(base, split="train", limit=None, strict=False, **options)``.
"""
from __future__ import annotations

import collections
import hashlib
import itertools
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from fuselip_med.core.image_preprocess import ImagePreprocess
from fuselip_med.data.adapters import (
    DatasetEmptyError,
    SampleSource,
    check_index,
    register_adapter,
    skip_or_raise,
    take,
)
from fuselip_med.data.images import DecodeOptions, load_image
from fuselip_med.data.schema import Sample, SampleSide
from fuselip_med.data.transforms.tgit import TGITFamily, TGITPair, paper_transforms

SPLITS = ("train", "eval")
IDENTITY = "identity"
_LAYOUT_STREAM = 0x7467_6974  # a fixed entropy word that separates the layout draws from the pixel draws
_CACHE_SIZE = 8
DEFAULT_DECODE = DecodeOptions()


def _medical_family() -> TGITFamily:
    from fuselip_med.data.transforms.tgit_med import (
        MEDICAL,  # albumentations is imported only when needed
    )

    return MEDICAL


def get_family(kinds: str | Iterable[str] = "tgit", *, flip_eval: str = "unique") -> TGITFamily:
    """"tgit" (paper set), "tgit_med" (radiology set), or a list of kinds from one of them."""
    paper = TGITFamily("tgit", paper_transforms(flip_eval))
    if kinds == "tgit":
        return paper
    if kinds == "tgit_med":
        return _medical_family()
    wanted = [kinds] if isinstance(kinds, str) else list(kinds)
    for family in (paper, _medical_family()):
        if wanted and all(kind in family.kinds for kind in wanted):
            return family.subset(wanted)
    raise ValueError(f"unknown TGIT kinds {wanted}: use 'tgit', 'tgit_med', or kinds of one family "
                     f"(tgit: {', '.join(paper.kinds)}; tgit_med: {', '.join(_medical_family().kinds)})")


def split_of(sample_id: str, eval_fraction: float) -> str:
    """"eval" for a fraction ``eval_fraction`` of ids (a fixed hash of the id), else "train"."""
    digest = hashlib.blake2b(str(sample_id).encode("utf-8"), digest_size=8).digest()
    return "eval" if int.from_bytes(digest, "big") < eval_fraction * 2.0**64 else "train"


def image_and_caption(sample: Sample) -> tuple[Any, str | None]:
    """The base sample's image (query side first) and its caption (the text of the other side)."""
    if sample.query.image is not None:
        return sample.query.image, sample.target.text if sample.target.text else sample.query.text
    return sample.target.image, sample.query.text if sample.query.text else sample.target.text


def _squash(image: Image.Image, size: int) -> Image.Image:
    return ImagePreprocess(image_size=size).resize(image)


def prepare_source(raw: Any, family: TGITFamily, *, size: int = 256, random_resized_crop: bool = False,
                   rng: np.random.Generator | None = None, decode: DecodeOptions = DEFAULT_DECODE) -> Any:
    """Base preprocessing: a squash to ``size`` (paper: RGB; radiology: "L", or HU values kept), or for the
    paper's non-crop training pairs the reference random resized crop (scale 0.9-1.0) drawn from ``rng``."""
    if family.name == "tgit_med":
        from fuselip_med.data.transforms.tgit_med import is_hu_array

        if is_hu_array(raw):
            values = Image.fromarray(np.asarray(raw, dtype=np.float32), "F")
            return np.asarray(_squash(values, size), dtype=np.float32)
        image = _squash(load_image(raw, decode), size)
        return image if image.mode == "L" else image.convert("L")
    image = load_image(raw, decode)
    if random_resized_crop:
        generator = None if rng is None else torch.Generator().manual_seed(int(rng.integers(2**63)))
        image = ImagePreprocess(image_size=size, train=True).resize(image, generator)
    else:
        image = _squash(image, size)
    return image if image.mode == "RGB" else image.convert("RGB")


def eval_pools(image: Any, kinds: str | Iterable[str], rng: np.random.Generator, *, size: int = 256,
               flip_eval: str = "unique") -> dict[str, list[TGITPair]]:
    """kind -> evaluation pool of ``image`` (any image input; an HU array for "tgit_med"), first pair = the query;
    ``kinds``: "tgit", "tgit_med" or kinds of one family. Deterministic for a generator state."""
    family = get_family(kinds, flip_eval=flip_eval)
    source = prepare_source(image, family, size=size)
    return {kind: family[kind].eval_pool(source, rng) for kind in family.kinds}


class TGITTask:
    """A ``SampleSource`` of TGIT pairs over the images of ``base`` (module docstring); base samples without an
    image are counted in ``skipped`` (``strict=True`` raises)."""

    def __init__(
        self,
        base: SampleSource,
        kinds: str | Sequence[str] = "tgit",  # a family, or kinds of one family (e.g. ["rotate"])
        *,
        split: str = "train",  # "train" | "eval"
        seed: int = 0,
        identity_fraction: float = 0.9,  # u: share of training *pairs* that are identity (CC3M 0.9, CC12M 0.971)
        eval_fraction: float = 0.1,  # share of base images (by id hash) held out for "eval"
        decode: DecodeOptions = DEFAULT_DECODE,  # for load_image and the output size; sources are always squashed
        flip_eval: str = "unique",  # paper flip pool: "unique" (answerable) or "reference" (the paper's)
        limit: int | None = None,  # at most this many base images of the split
        strict: bool = False,
    ):
        if split not in SPLITS:
            raise ValueError(f"TGIT split must be 'train' or 'eval', got {split!r}")
        if not 0.0 <= identity_fraction < 1.0:
            raise ValueError(f"identity_fraction must be in [0, 1), got {identity_fraction}")
        if not 0.0 <= eval_fraction <= 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction}")
        self.base = base
        self.family = get_family(kinds, flip_eval=flip_eval)
        self.split = split
        self.seed = int(seed)
        self.decode = decode
        base_name = getattr(base, "name", type(base).__name__)
        self.name = f"{base_name}+{self.family.name}"
        self.identity_probability = self.family.identity_probability(identity_fraction) if split == "train" else 0.0
        self.skipped: collections.Counter[str] = collections.Counter()

        members = []
        for index in range(len(base)):
            sample = base[index]
            if image_and_caption(sample)[0] is None:
                skip_or_raise(self.skipped, strict, "no image", f"{base_name} sample {sample.id!r}")
            elif split_of(sample.id, eval_fraction) == split:
                members.append(index)
        members = np.asarray(take(members, limit), dtype=np.int64)
        if members.size == 0:
            raise DatasetEmptyError(f"TGIT {split} split of {base_name} has no image (eval_fraction="
                                    f"{eval_fraction}, {len(base)} base samples, skipped: {dict(self.skipped)}).")

        n_kinds = len(self.family.kinds)
        if split == "train":
            rng = np.random.default_rng([self.seed, _LAYOUT_STREAM])
            kind = rng.choice(n_kinds, size=members.size, p=self.family.probabilities())
            kind[rng.random(members.size) < self.identity_probability] = -1
            pairs = np.array([t.n_pairs(eval=False) for t in self.family.transforms] + [1], dtype=np.int64)
            self._block_base, self._block_kind = members, kind
        else:
            pairs = np.array([t.n_pairs(eval=True) for t in self.family.transforms], dtype=np.int64)
            self._block_base = np.repeat(members, n_kinds)
            self._block_kind = np.tile(np.arange(n_kinds), members.size)
        counts = pairs[self._block_kind]  # index -1 (identity) takes the trailing 1
        self._block_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._item_block = np.repeat(np.arange(counts.size, dtype=np.int64), counts)
        self._cache: collections.OrderedDict[int, tuple[Any, list[dict[str, Any]], Sample]] = collections.OrderedDict()

    def __len__(self) -> int:
        return int(self._item_block.size)

    def groups(self) -> list[list[int]]:
        """One group per block: the pairs of one type from one image (identity pairs alone)."""
        starts = self._block_start
        return [list(range(int(a), int(b))) for a, b in itertools.pairwise(starts)]

    def item_kind(self, index: int) -> str:
        """The transformation kind of item ``index`` ("identity" for identity pairs); no decoding."""
        kind = int(self._block_kind[self._item_block[check_index(index, len(self))]])
        return IDENTITY if kind < 0 else self.family.kinds[kind]

    def __getitem__(self, index: int) -> Sample:
        index = check_index(index, len(self))
        block = int(self._item_block[index])
        slot = index - int(self._block_start[block])
        kind_index = int(self._block_kind[block])
        if kind_index < 0:
            return self._identity(int(self._block_base[block]))
        prepared, params, base_sample = self._render(block)
        transform = self.family.transforms[kind_index]
        pair = transform.apply(prepared, params[slot])
        meta = {"task": self.family.name, "kind": pair.kind, "slot": slot, "pool_size": len(params),
                "params": dict(pair.params), "base_id": base_sample.id, "split": self.split,
                "preprocessed": True}
        return Sample(
            id=f"{base_sample.id}/{self.family.name}/{pair.kind}/{slot}",
            source=self.name,
            query=SampleSide(image=pair.source_image, text=pair.prompt),
            target=SampleSide(image=pair.target_image),
            group=f"{base_sample.source}/{base_sample.id}/{self.family.name}/{pair.kind}",
            meta=meta,
        )

    def _identity(self, base_index: int) -> Sample:
        base_sample = self.base[base_index]
        image, caption = image_and_caption(base_sample)
        return Sample(
            id=f"{base_sample.id}/{self.family.name}/{IDENTITY}",
            source=self.name,
            query=SampleSide(image=image),
            target=SampleSide(text=caption),
            meta={**base_sample.meta, "task": self.family.name, "kind": IDENTITY, "base_id": base_sample.id,
                  "split": self.split},
        )

    def _render(self, block: int) -> tuple[Any, list[dict[str, Any]], Sample]:
        """(prepared source, parameters of every pair, base sample) of a block; the siblings of a group are
        fetched one after another, so the last few blocks are kept."""
        if block in self._cache:
            self._cache.move_to_end(block)
            return self._cache[block]
        base_index, kind_index = int(self._block_base[block]), int(self._block_kind[block])
        base_sample = self.base[base_index]
        transform = self.family.transforms[kind_index]
        rng = np.random.default_rng([self.seed, base_index, kind_index])
        raw = image_and_caption(base_sample)[0]
        random_crop = self.split == "train" and self.family.name == "tgit" and transform.kind != "randomcrop"
        source = prepare_source(raw, self.family, size=self.decode.image_size, random_resized_crop=random_crop,
                                rng=rng, decode=self.decode)
        prepared = transform.prepare(source, rng)
        params = transform.sample_params(rng, prepared, eval=self.split == "eval")
        self._cache[block] = (prepared, params, base_sample)
        while len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return self._cache[block]

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers start with an empty cache
        state = dict(self.__dict__)
        state["_cache"] = collections.OrderedDict()
        return state

    def __repr__(self) -> str:
        return f"TGITTask(name={self.name!r}, split={self.split!r}, kinds={self.family.kinds}, n={len(self)})"


def _factory(family: str):
    def factory(base: SampleSource, split: str = "train", limit: int | None = None, strict: bool = False,
                **options: Any) -> TGITTask:
        kinds = options.pop("kinds", family)
        if get_family(kinds).name != family:
            raise ValueError(f"TGIT task {family!r} got kinds {kinds!r} of another family")
        return TGITTask(base, kinds, split=split, limit=limit, strict=strict, **options)

    factory.__name__ = factory.__qualname__ = f"{family}_task"
    factory.__doc__ = f"TGITTask over ``base`` with the {family!r} family (or ``kinds=`` a subset of it)."
    return factory


tgit_task = register_adapter("tgit")(_factory("tgit"))
tgit_med_task = register_adapter("tgit_med")(_factory("tgit_med"))
