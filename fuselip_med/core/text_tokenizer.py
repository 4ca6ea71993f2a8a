"""CLIP BPE text tokenizer whose ids equal those of open_clip's ``SimpleTokenizer`` as vendored by FuseLIP.

The reference algorithm, step by step (``reference-facts.md`` section 2.1):

1. Clean: ``ftfy.fix_text``, ``html.unescape`` twice, strip, collapse whitespace runs to one space, lower-case.
2. Split with the ``regex`` pattern (IGNORECASE)
   ``<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+``.
   A literal special string in the text is one piece and maps to its special id.
3. Map each piece's UTF-8 bytes through the GPT-2 byte->unicode table, append ``</w>`` to the last symbol and
   apply the 48,894 CLIP merges, lowest rank first, each time merging every occurrence left to right.
4. Rows are ``[sot] + ids + [eot]``, right-padded with 0; a longer row is cut to the context length and its
   last position overwritten with eot.

``[MASK]`` (id 49408, on by default because the released models were trained with it) is added to the
vocabulary only, not to the split pattern: the text "[MASK]" is three ordinary pieces.

What makes it fast while keeping every id identical:

- the BPE step runs in the Hugging Face ``tokenizers`` BPE model (Rust). Its priority-queue merging (lowest
  rank, then leftmost position) gives the same result as the reference loop because in the CLIP merge list
  every merge's parts are base symbols or results of earlier merges (checked: no exceptions), so a merge can
  never create a pair that outranks the one being applied;
- each distinct piece is BPE'd once and its ids are kept in a per-instance cache (as the reference caches
  its BPE strings);
- text made only of printable ASCII, tab and newline, without ``&``, skips ``ftfy``/``html.unescape``: both
  return such text unchanged (ftfy returns ASCII text as it is; every other ftfy fixer and ``html.unescape``
  acts only on characters outside this set);
- cleaned text that is pure ASCII is split with an equivalent stdlib ``re`` pattern (about twice as fast);
  cleaned text holds no upper-case letters and no whitespace other than single spaces, and on such ASCII text
  both patterns give the same pieces.

The tests compare against a plain-Python implementation of the reference on fixed and random inputs.
"""
from __future__ import annotations

import gzip
import html
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import ftfy
import numpy as np
import regex
import torch
from tokenizers import models

from fuselip_med.vocab import (
    EOT_TOKEN,
    EOT_TOKEN_ID,
    MASK_TOKEN,
    MASK_TOKEN_ID,
    PAD_TOKEN_ID,
    SOT_TOKEN,
    SOT_TOKEN_ID,
    TEXT_VOCAB_SIZE,
)

DEFAULT_BPE_PATH = str(Path(__file__).resolve().parent.parent / "assets" / "bpe_simple_vocab_16e6.txt.gz")
DEFAULT_CONTEXT_LENGTH = 180
NUM_MERGES = 49152 - 256 - 2  # lines 1 ... 48894 of the file, as the reference reads it

_CACHE_LIMIT = 100_000  # pieces kept per instance before the cache is emptied (bounds worker memory)

_UNICODE_FINDALL = regex.compile(
    SOT_TOKEN + "|" + EOT_TOKEN + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
).findall
# The same split for cleaned pure-ASCII text (lower-case, single spaces only).
_ASCII_FINDALL = re.compile(
    SOT_TOKEN + "|" + EOT_TOKEN + r"""|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+"""
).findall
# Text that ftfy.fix_text and html.unescape return unchanged: printable ASCII, tab, newline, no "&".
_CLEANING_IS_NOOP = re.compile(r"[\t\n\x20-\x25\x27-\x7e]*").fullmatch


@lru_cache()
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character table used by CLIP."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


# As a str.translate table: the latin-1 character of byte b (ordinal b) -> that byte's symbol.
_BYTE_TRANSLATION = bytes_to_unicode()
_BYTE_DECODER = {c: b for b, c in _BYTE_TRANSLATION.items()}


def clean_text(text: str) -> str:
    """The reference "lower" clean: ftfy, html-unescape twice, strip, collapse whitespace, lower-case."""
    if _CLEANING_IS_NOOP(text):
        return " ".join(text.split()).lower()
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).strip().lower()


@lru_cache(maxsize=4)
def _load_backend(bpe_path: str) -> tuple[dict[str, int], list[str], Any]:
    """(encoder, decoder, HF BPE model) for one merges file; shared by the instances of a process."""
    try:
        with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except OSError as err:
        raise FileNotFoundError(
            f"Cannot read the CLIP BPE file {bpe_path!r} ({err}); pass bpe_path=None to use the one shipped "
            "with fuselip_med."
        ) from None
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    if any(len(merge) != 2 for merge in merges):
        raise ValueError(f"{bpe_path!r} is not a CLIP BPE merges file: a merge line does not hold two symbols.")
    byte_symbols = list(bytes_to_unicode().values())
    vocab = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
    encoder = {token: i for i, token in enumerate(vocab)}
    bpe = models.BPE(
        vocab=encoder,
        merges=merges,
        end_of_word_suffix="</w>",
        dropout=None,
        unk_token=None,
        fuse_unk=False,
        byte_fallback=False,
        ignore_merges=False,
    )
    return encoder, vocab, bpe


class TextTokenizer:
    """CLIP BPE tokenizer producing FuseLIP's text rows: ``tokenizer(texts)`` -> LongTensor (N, context_length).

    Picklable (for DataLoader workers: only the settings travel, the vocabulary is reloaded) and safe to share
    between threads.
    """

    sot_token_id: int = SOT_TOKEN_ID
    eot_token_id: int = EOT_TOKEN_ID
    pad_token_id: int = PAD_TOKEN_ID
    pad_id: int = PAD_TOKEN_ID  # reference name (vendored open_clip addition)
    mask_token_id: int | None = MASK_TOKEN_ID
    vocab_size: int = TEXT_VOCAB_SIZE
    context_length: int = DEFAULT_CONTEXT_LENGTH

    def __init__(
        self,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        add_mask_token: bool = True,
        bpe_path: str | os.PathLike | None = None,
    ):
        if int(context_length) < 1:
            raise ValueError(f"context_length must be a positive number of tokens, got {context_length}.")
        self.context_length = int(context_length)
        self.add_mask_token = bool(add_mask_token)
        self.bpe_path = None if bpe_path is None else os.fspath(bpe_path)
        encoder, vocab, self._bpe = _load_backend(os.path.abspath(self.bpe_path or DEFAULT_BPE_PATH))
        self.sot_token_id = encoder[SOT_TOKEN]
        self.eot_token_id = encoder[EOT_TOKEN]
        self._decoder = list(vocab)
        if self.add_mask_token:
            self.mask_token_id = len(vocab)  # max id + 1
            self._decoder.append(MASK_TOKEN)
        else:
            self.mask_token_id = None
        self.vocab_size = len(self._decoder)
        self.all_special_ids = [self.sot_token_id, self.eot_token_id] + (
            [self.mask_token_id] if self.add_mask_token else []
        )
        self._skip_on_decode = frozenset(self.all_special_ids)
        self._special_pieces = {SOT_TOKEN: (self.sot_token_id,), EOT_TOKEN: (self.eot_token_id,)}
        self._cache: dict[str, tuple[int, ...]] = {}

    # -- pickling: settings only --------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        return {"context_length": self.context_length, "add_mask_token": self.add_mask_token, "bpe_path": self.bpe_path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def __repr__(self) -> str:
        return (
            f"TextTokenizer(context_length={self.context_length}, add_mask_token={self.add_mask_token}, "
            f"vocab_size={self.vocab_size})"
        )

    # -- encoding -----------------------------------------------------------------------------------------
    def _piece_ids(self, piece: str) -> tuple[int, ...]:
        ids = self._special_pieces.get(piece)
        if ids is None:
            word = piece.encode("utf-8").decode("latin-1").translate(_BYTE_TRANSLATION)
            ids = tuple(token.id for token in self._bpe.tokenize(word))
        cache = self._cache
        if len(cache) >= _CACHE_LIMIT:
            cache.clear()
        cache[piece] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """BPE ids of one text, without sot/eot."""
        if not isinstance(text, str):
            raise TypeError(f"TextTokenizer.encode expects a str, got {type(text).__name__}.")
        text = clean_text(text)
        pieces = _ASCII_FINDALL(text) if text.isascii() else _UNICODE_FINDALL(text)
        cache_get = self._cache.get
        ids: list[int] = []
        for piece in pieces:
            piece_ids = cache_get(piece)
            if piece_ids is None:
                piece_ids = self._piece_ids(piece)
            ids.extend(piece_ids)
        return ids

    def batch_encode(self, texts: Sequence[str]) -> list[list[int]]:
        """BPE ids of each text, without sot/eot."""
        return [self.encode(text) for text in texts]

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.LongTensor:
        """Rows ``[sot] + ids + [eot]`` padded with 0 (or cut, eot last) to ``context_length``: LongTensor (N, L)."""
        if isinstance(texts, str):
            texts = [texts]
        length = context_length or self.context_length  # the reference's `or`: 0/None mean the default
        if length < 1:
            raise ValueError(f"context_length must be a positive number of tokens, got {context_length}.")
        out = np.zeros((len(texts), length), dtype=np.int64)
        sot, eot = self.sot_token_id, self.eot_token_id
        for i, text in enumerate(texts):
            row = [sot, *self.encode(text), eot]
            if len(row) > length:
                row = row[:length]
                row[-1] = eot
            out[i, : len(row)] = row
        return torch.from_numpy(out)

    # -- decoding -----------------------------------------------------------------------------------------
    def decode(self, ids: Sequence[int] | torch.Tensor | np.ndarray) -> str:
        """Text of a 1-D id sequence, for inspection.

        Trailing padding (0) and sot/eot/[MASK] are skipped; "</w>" becomes a space (as in the reference) and
        the result is stripped. A 0 before the last non-pad id is the BPE symbol "!", not padding.
        """
        if isinstance(ids, (torch.Tensor, np.ndarray)):
            if ids.ndim != 1:
                raise ValueError(f"decode takes one 1-D id sequence, got shape {tuple(ids.shape)}.")
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        while ids and ids[-1] == self.pad_token_id:
            ids.pop()
        symbols = []
        for i in ids:
            if i in self._skip_on_decode:
                continue
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"Token id {i} is outside the text vocabulary (0 ... {self.vocab_size - 1}).")
            symbols.append(self._decoder[i])
        text = "".join(symbols)
        data = bytearray(_BYTE_DECODER[c] for c in text)
        return data.decode("utf-8", errors="replace").replace("</w>", " ").strip()
