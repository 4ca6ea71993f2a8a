"""TextTokenizer: ids identical to open_clip's SimpleTokenizer as vendored by FuseLIP (reference-facts 2.1).

`ReferenceSimpleTokenizer` below is a plain-Python implementation written from the algorithm description. It
derived, once, the literal id table `EXPECTED_IDS` (the same table came out of open_clip 3.3.0's own
SimpleTokenizer); the fast tokenizer must reproduce the table and agree with the reference on random text.
"""
from __future__ import annotations

import concurrent.futures
import gzip
import hashlib
import html
import multiprocessing
import pickle
import random
from pathlib import Path

import ftfy
import pytest
import regex
import torch

from fuselip_med.core import text_tokenizer as tt
from fuselip_med.core.text_tokenizer import DEFAULT_BPE_PATH, TextTokenizer

BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
SOT, EOT, MASK = 49406, 49407, 49408


# ----------------------------------------------------------------------------------------------------------
# Plain-Python reference (also imported by benchmarks/bench_tokenizer.py)
# ----------------------------------------------------------------------------------------------------------
def reference_bytes_to_unicode() -> dict[int, str]:
    """GPT-2 table: printable latin-1 bytes map to themselves, the other bytes to chr(256), chr(257), ..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return dict(zip(printable + others, [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]))


class ReferenceSimpleTokenizer:
    """The reference algorithm, written out plainly, with its BPE cache."""

    specials = ["<start_of_text>", "<end_of_text>"]

    def __init__(self, bpe_path: str = DEFAULT_BPE_PATH, add_mask_token: bool = True, context_length: int = 180):
        lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
        self.byte_encoder = reference_bytes_to_unicode()
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab]
        vocab += ["".join(merge) for merge in merges]
        vocab += self.specials
        self.encoder = {token: i for i, token in enumerate(vocab)}
        if add_mask_token:  # FuseLIP: encoder/decoder only, not the split pattern
            self.encoder["[MASK]"] = max(self.encoder.values()) + 1
        self.bpe_ranks = {merge: rank for rank, merge in enumerate(merges)}
        self.cache = {token: token for token in self.specials}
        self.pattern = regex.compile(
            "|".join(self.specials) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )
        self.context_length = context_length

    @staticmethod
    def clean(text: str) -> str:
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        return " ".join(text.split()).strip().lower()

    def bpe(self, token: str) -> str:
        if token in self.cache:
            return self.cache[token]
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            rank, (first, second) = min(
                (self.bpe_ranks.get(pair, float("inf")), pair) for pair in zip(word, word[1:])
            )
            if rank == float("inf"):
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        result = " ".join(word)
        self.cache[token] = result
        return result

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in self.pattern.findall(self.clean(text)):
            token = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[symbol] for symbol in self.bpe(token).split(" "))
        return ids

    def __call__(self, texts, context_length: int | None = None) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        context_length = context_length or self.context_length
        rows = [[SOT] + self.encode(text) + [EOT] for text in texts]
        out = torch.zeros(len(rows), context_length, dtype=torch.long)
        for i, row in enumerate(rows):
            if len(row) > context_length:
                row = row[:context_length]
                row[-1] = EOT
            out[i, : len(row)] = torch.tensor(row)
        return out


# ----------------------------------------------------------------------------------------------------------
# Literal expectations (derived once with the reference above; open_clip 3.3.0 gives the same ids)
# ----------------------------------------------------------------------------------------------------------
LONG_WORD = "pneumonoultramicroscopicsilicovolcanoconiosis" * 3
LONG_UNIT = "No acute cardiopulmonary abnormality; 5 mm nodule! "
EXPECTED_IDS: dict[str, list[int]] = {
    'a photo of a cat.': [320, 1125, 539, 320, 2368, 269],
    'CT chest axial view': [1122, 10563, 46550, 1093],
    'crop to upper left': [9955, 531, 7067, 1823],
    'Pneumothorax — résumé naïve': [28714, 617, 4130, 9203, 2005, 29106, 7054, 4166, 1097, 35689, 563],
    'Ground-glass opacity 🫁 in a smoker 😷, clinician 👩🏽\u200d⚕️ ✔': [
        2461, 268, 3313, 676, 7511, 558, 104, 479, 530, 320, 32348, 37943, 267, 2879, 5374, 18800, 8514, 4244,
        2234, 44853, 13749,
    ],
    '&amp;lt; &amp; &#39;': [283, 261, 262],
    'Lesion &lt;5 mm&gt; &quot;stable&quot; &#x2019;s': [534, 1015, 283, 276, 2848, 285, 257, 10492, 257, 568],
    '5 mm': [276, 2848],
    'T2-weighted MRI 3.0T': [339, 273, 268, 43179, 24773, 274, 269, 271, 339],
    'before <end_of_text> after': [1348, 49407, 953],
    '<start_of_text>x<END_OF_TEXT>': [49406, 343, 49407],
    '<ſtart_of_text>': [27, 129, 123, 16707, 62, 684, 62, 18169, 285],
    '[MASK]': [314, 8306, 316],
    '胸部X线片显示肺炎 日本語のテキスト': [
        164, 225, 116, 165, 225, 101, 87, 163, 118, 123, 163, 231, 229, 42891, 122, 163, 97, 118, 164, 224,
        118, 163, 224, 492, 39121, 44353, 34002, 252, 21575, 2429, 228, 47121, 32421, 486,
    ],
    'line one\tline\ttwo\nthree\r\nfour \xa0 five\u2028six': [1148, 637, 1148, 1237, 2097, 2721, 3127, 4093],
    '': [],
    '   \n\t ': [],
    "it's the patient's; they'LL DON'T we'd": [585, 568, 518, 6262, 568, 282, 889, 1342, 847, 713, 649, 1896],
    'İstanbul ſ Kelvin 10 µm vs 10 μm ½ ² ⅷ ٣': [
        328, 16384, 11231, 129, 379, 32859, 272, 271, 126, 113, 332, 1547, 272, 271, 138, 120, 332, 33613,
        41175, 158, 227, 371, 149, 352,
    ],
    'ＣＴ ｆｕｌｌｗｉｄｔｈ café cafÃ© donâ€™t': [1122, 9407, 23571, 15304, 15304, 847, 713],
    '\x00control\x07chars \x1b[31mred\x1b[0m \u200bzero\ufeffwidth': [9963, 540, 864, 736, 9844, 14867, 23571],
    '!!!!!!!! ?!?! ... -- ((( )))': [21622, 16349, 678, 2432, 33287, 18305],
    LONG_WORD: [
        28714, 749, 20253, 9800, 535, 532, 1065, 901, 1556, 13697, 9916, 78, 616, 3167, 564, 588, 3855, 749,
        20253, 9800, 535, 532, 1065, 901, 1556, 13697, 9916, 78, 616, 3167, 564, 588, 3855, 749, 20253, 9800,
        535, 532, 1065, 901, 1556, 13697, 9916, 78, 39031, 13903,
    ],
    LONG_UNIT: [
        871, 19734, 6211, 39858, 749, 856, 596, 28748, 696, 282, 276, 2848, 578, 691, 579, 256,
    ],
}


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer()


@pytest.fixture(scope="module")
def ref() -> ReferenceSimpleTokenizer:
    return ReferenceSimpleTokenizer()


def random_texts(n: int, seed: int) -> list[str]:
    rnd = random.Random(seed)
    alphabet = (
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
        "!!!!!!!?.,;:-_()[]{}<>/\\'\"#%&*+=@^`|~$"
        " \t\n\r\x0b\x0c\x1c\x85\xa0\u2028\u3000"
        "éèêëàâäçñöüßøæœÉÀÖÅİıſKµμ°±²³½⅓ⅷ٣४"
        "αβγδΔΩжЖюЯ中文胸部肺炎日本語한국어ไทยעבריתعربي"
        "😀🫁👩🏽‍⚕️✔“”‘’—–…ﬁＡｂ１\u0301\u0308\u200b\ufeff\x00\x07\x1b"
    )
    fragments = [
        "&amp;", "&lt;", "&gt;", "&#39;", "&#x2019;", "&nbsp;", "&amp;lt;", "<end_of_text>", "<START_OF_TEXT>",
        "<ſtart_of_text>", "[MASK]", "'s", "'LL", "'re", " mm ", "3.0T", "T2-weighted", "Ã©", "â€™", "\x1b[31m",
        "pneumothorax", "consolidation", "!!", "!?!", "1234567890", " ", "  ",
    ]
    texts = []
    for _ in range(n):
        parts = []
        for _ in range(rnd.randint(0, 30)):
            if rnd.random() < 0.25:
                parts.append(rnd.choice(fragments))
            else:
                parts.append("".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 8))))
        texts.append("".join(parts))
    return texts


# ----------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------
def test_shipped_bpe_file_is_the_clip_file():
    assert hashlib.sha256(Path(DEFAULT_BPE_PATH).read_bytes()).hexdigest() == BPE_SHA256
    notice = (Path(DEFAULT_BPE_PATH).parent / "LICENSE-CLIP-BPE.txt").read_text()
    assert "Copyright (c) 2021 OpenAI" in notice and "MIT License" in notice


def test_missing_bpe_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt.gz"):
        TextTokenizer(bpe_path=tmp_path / "nope.txt.gz")


# ----------------------------------------------------------------------------------------------------------
# Vocabulary layout
# ----------------------------------------------------------------------------------------------------------
def test_vocabulary_layout(tok):
    assert (tok.sot_token_id, tok.eot_token_id, tok.pad_token_id, tok.pad_id) == (SOT, EOT, 0, 0)
    assert tok.mask_token_id == MASK and tok.vocab_size == 49409 and tok.context_length == 180
    assert tok.all_special_ids == [SOT, EOT, MASK]
    plain = TextTokenizer(add_mask_token=False)
    assert plain.mask_token_id is None and plain.vocab_size == 49408 and plain.all_special_ids == [SOT, EOT]


def test_reference_vocabulary_agrees(ref):
    assert len(ref.encoder) == 49409 and ref.encoder["[MASK]"] == MASK
    assert ref.encoder["!"] == 0 and ref.encoder["!</w>"] == 256
    assert ref.encoder["<start_of_text>"] == SOT and ref.encoder["<end_of_text>"] == EOT


# ----------------------------------------------------------------------------------------------------------
# Ids
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", list(EXPECTED_IDS), ids=range(len(EXPECTED_IDS)))
def test_expected_ids(tok, ref, text):
    assert tok.encode(text) == EXPECTED_IDS[text]
    assert ref.encode(text) == EXPECTED_IDS[text]


def test_reference_facts_examples(tok):
    assert tok.encode("a photo of a cat.") == [320, 1125, 539, 320, 2368, 269]
    assert tok.encode("CT chest axial view") == [1122, 10563, 46550, 1093]
    assert tok.encode("crop to upper left") == [9955, 531, 7067, 1823]
    assert tok.encode("[MASK]") == [314, 8306, 316]
    assert tok("")[0].tolist() == [SOT, EOT] + [0] * 178


def test_random_texts_match_reference(ref):
    tok = TextTokenizer()  # fresh cache
    texts = random_texts(400, seed=1234)
    for text in texts:
        assert tok.encode(text) == ref.encode(text), repr(text)
    # the batched rows too, with a short context so that some rows truncate
    assert torch.equal(tok(texts, context_length=24), ref(texts, context_length=24))
    assert torch.equal(tok(texts), ref(texts))


def test_bpe_backend_matches_reference_on_every_vocabulary_entry(ref):
    """Every vocabulary string, BPE'd as one word, by the fast backend and the reference loop."""
    _, vocab, bpe = tt._load_backend(str(Path(DEFAULT_BPE_PATH).resolve()))
    words = [s[: -len("</w>")] if s.endswith("</w>") else s for s in vocab[:SOT]]
    words += ["".join(words[100 + 7 * i : 104 + 7 * i]) for i in range(2000)]  # concatenations of pieces
    for word in words:
        assert [t.value for t in bpe.tokenize(word)] == ref.bpe(word).split(" "), word


def test_very_long_word_matches_reference(tok, ref):
    rnd = random.Random(7)
    word = "".join(rnd.choice("abcdefghijklmnopqrstuvwxyzéü") for _ in range(2000))
    assert tok.encode(word) == ref.encode(word)
    assert tok.encode("a" * 5000) == ref.encode("a" * 5000)


def test_ascii_split_equals_unicode_split_on_cleaned_ascii():
    chars = [chr(c) for c in range(128) if not (chr(c).isspace() and c != 32) and not chr(c).isupper()]
    for a in chars:
        for b in chars:
            for text in (a + b, "x" + a + b + "1", "'" + a + b):
                assert tt._ASCII_FINDALL(text) == tt._UNICODE_FINDALL(text), repr(text)
    for text in ("<start_of_text>", "<end_of_text>x", "a<end_of_text", "it's we'll i'd", "<<end_of_text>>"):
        assert tt._ASCII_FINDALL(text) == tt._UNICODE_FINDALL(text), repr(text)


def test_cleaning_shortcut_only_skips_noops():
    rnd = random.Random(3)
    alphabet = "".join(chr(c) for c in range(32, 127) if chr(c) != "&") + "\t\n"
    for _ in range(2000):
        text = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 60)))
        assert tt._CLEANING_IS_NOOP(text)
        assert ftfy.fix_text(text) == text and html.unescape(text) == text
    for text in ("a &amp; b", "x\ry", "\x1b[31mred", "café", "a\x0bb", "\x7f"):
        assert not tt._CLEANING_IS_NOOP(text)
        assert tt.clean_text(text) == ReferenceSimpleTokenizer.clean(text)


# ----------------------------------------------------------------------------------------------------------
# Rows: shapes, padding, truncation, context length
# ----------------------------------------------------------------------------------------------------------
def test_rows_shape_and_padding(tok):
    out = tok(["a photo of a cat.", ""])
    assert out.dtype == torch.long and out.shape == (2, 180)
    assert out[0, :8].tolist() == [SOT, 320, 1125, 539, 320, 2368, 269, EOT]
    assert (out[0, 8:] == 0).all() and out[1, :2].tolist() == [SOT, EOT] and (out[1, 2:] == 0).all()
    assert tok("a photo of a cat.").shape == (1, 180)
    assert tok([]).shape == (0, 180)


def test_truncation_keeps_eot_last(tok, ref):
    text = LONG_UNIT * 40
    unit = EXPECTED_IDS[LONG_UNIT]
    row = tok(text)[0].tolist()
    assert row == ([SOT] + unit * 40)[:179] + [EOT]
    assert torch.equal(tok(text), ref(text))
    # 178 content tokens fit exactly; 179 do not, and the last content token gives way to eot
    fits, over = "a " * 178, "a " * 179
    assert tok(fits)[0].tolist() == [SOT] + [320] * 178 + [EOT]
    assert tok(over)[0].tolist() == [SOT] + [320] * 178 + [EOT]
    assert tok(over, context_length=5)[0].tolist() == [SOT, 320, 320, 320, EOT]


def test_literal_end_of_text_gives_a_second_eot(tok):
    row = tok("before <end_of_text> after")[0].tolist()
    assert row[: row.index(0)] == [SOT, *EXPECTED_IDS["before <end_of_text> after"], EOT]
    assert row.count(EOT) == 2


def test_context_length_override(tok):
    assert tok("a photo", context_length=16).shape == (1, 16)
    short = TextTokenizer(context_length=77)
    assert short.context_length == 77 and short(["x", "y"]).shape == (2, 77)
    assert tok("a photo", context_length=0).shape == (1, 180)  # the reference's `or`
    with pytest.raises(ValueError):
        TextTokenizer(context_length=0)


# ----------------------------------------------------------------------------------------------------------
# Mask, decode, errors
# ----------------------------------------------------------------------------------------------------------
def test_mask_token_is_never_produced_from_text(tok):
    assert tok.encode("[MASK] [mask]") == [314, 8306, 316, 314, 8306, 316]
    assert MASK not in tok(random_texts(50, seed=5)).unique().tolist()
    assert TextTokenizer(add_mask_token=False).encode("[MASK]") == [314, 8306, 316]


def test_decode(tok):
    assert tok.decode(tok("a photo of a cat.")[0]) == "a photo of a cat ."
    assert tok.decode([SOT, 320, MASK, 2368, EOT, 0, 0]) == "a cat"
    ids = tok.encode("wow !$ ok")
    assert 0 in ids  # the "!" symbol, which decode keeps
    assert tok.decode(ids) == tok.decode(tok("wow !$ ok")[0]) == "wow !$ ok"
    assert tok.decode(tok.encode("Pneumothorax — résumé")) == "pneumothorax — résumé"
    with pytest.raises(ValueError):
        tok.decode([49409])
    with pytest.raises(ValueError):
        tok.decode(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError):
        TextTokenizer(add_mask_token=False).decode([MASK])


def test_non_string_input_is_rejected(tok):
    with pytest.raises(TypeError):
        tok.encode(None)
    with pytest.raises(TypeError):
        tok([b"bytes"])


# ----------------------------------------------------------------------------------------------------------
# Workers: pickling, threads, spawned processes
# ----------------------------------------------------------------------------------------------------------
def test_pickle_round_trip():
    tok = TextTokenizer(context_length=77, add_mask_token=False)
    texts = random_texts(20, seed=9)
    expected = tok(texts)
    data = pickle.dumps(tok)
    assert len(data) < 1024  # settings only, not the vocabulary or the cache
    clone = pickle.loads(data)
    assert (clone.context_length, clone.mask_token_id, clone.vocab_size) == (77, None, 49408)
    assert torch.equal(clone(texts), expected)


def test_shared_between_threads(ref):
    tok = TextTokenizer()
    texts = random_texts(200, seed=11)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        rows = list(pool.map(lambda chunk: tok(chunk), [texts[i::4] for i in range(4)]))
    for i in range(4):
        assert torch.equal(rows[i], ref(texts[i::4]))


def _tokenize_in_worker(args):
    tokenizer, texts = args
    return tokenizer(texts)


@pytest.mark.slow
def test_spawned_worker_gives_the_same_rows():
    tok = TextTokenizer()
    texts = random_texts(30, seed=13)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        (rows,) = pool.map(_tokenize_in_worker, [(tok, texts)])
    assert torch.equal(rows, tok(texts))
