"""Batch-encode synthetic radiology captions: TextTokenizer vs the plain-Python reference BPE.

    python benchmarks/bench_tokenizer.py [--captions 10000] [--context-length 180] [--seed 0]

The reference is `ReferenceSimpleTokenizer` from tests/test_text_tokenizer.py (the open_clip algorithm in plain
Python, with its BPE cache). "cold" builds both tokenizers anew and encodes once (empty caches); "warm" encodes
the same captions again. Both must give identical tensors. Single process, CPU; each figure is the best of
--repeats runs.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fuselip_med.core.text_tokenizer import TextTokenizer, _load_backend  # noqa: E402
from tests.test_text_tokenizer import ReferenceSimpleTokenizer  # noqa: E402

MODALITIES = [
    "CT", "MRI", "X-ray", "Chest radiograph", "Ultrasound", "PET-CT", "T2-weighted MRI", "Contrast-enhanced CT",
]
VIEWS = ["axial", "coronal", "sagittal", "PA", "lateral", "AP supine", "oblique"]
REGIONS = ["chest", "abdomen", "brain", "pelvis", "left knee", "right shoulder", "lumbar spine", "neck"]
FINDINGS = [
    "a {n} mm nodule in the right upper lobe", "ground-glass opacities", "a left-sided pneumothorax",
    "an enhancing mass ({n}.{m} x {m}.{n} cm)", "no acute cardiopulmonary abnormality", "a hypodense hepatic lesion",
    "pleural effusion with adjacent atelectasis", "a displaced fracture of the distal radius",
    "mild degenerative changes at L{n}-L{m}", "restricted diffusion in the left MCA territory",
]
EXTRAS = ["", "", "", " (arrow).", " (arrowheads)!", "; follow-up in {n} months.", " — résumé of prior study.",
          " Lesion 10 µm; SUVmax {n}.{m}.", " Tilt {n}°.", " &amp; contrast", " Case #{n}{m}{n}."]


def synthetic_captions(n: int, seed: int) -> list[str]:
    rnd = random.Random(seed)
    captions = []
    for _ in range(n):
        numbers = {"n": rnd.randint(1, 9), "m": rnd.randint(0, 9)}
        caption = (
            f"{rnd.choice(MODALITIES)} of the {rnd.choice(REGIONS)}, {rnd.choice(VIEWS)} view, showing "
            f"{rnd.choice(FINDINGS)}{rnd.choice(EXTRAS)}"
        )
        captions.append(caption.format(**numbers))
    return captions


PASSES = ("cold (empty caches)", "warm (second pass)")


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", type=int, default=10_000)
    parser.add_argument("--context-length", type=int, default=180)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    captions = synthetic_captions(args.captions, args.seed)
    length = args.context_length
    non_ascii = sum(not text.isascii() or "&" in text for text in captions)

    best: dict[str, float] = {}  # fastest of the repeats, per measurement

    def record(key: str, seconds: float) -> None:
        best[key] = min(seconds, best.get(key, float("inf")))

    for _ in range(args.repeats):
        _load_backend.cache_clear()  # a truly fresh TextTokenizer: vocabulary reloaded, BPE caches empty
        reference, seconds = timed(ReferenceSimpleTokenizer)
        record("ref build", seconds)
        fast, seconds = timed(TextTokenizer, length)
        record("fast build", seconds)
        for label in PASSES:
            expected, ref_s = timed(reference, captions, length)
            got, fast_s = timed(fast, captions, length)
            if not torch.equal(expected, got):
                raise SystemExit("TextTokenizer and the reference disagree: this is a bug.")
            record(f"ref {label}", ref_s)
            record(f"fast {label}", fast_s)

    print(
        f"{len(captions)} synthetic radiology captions ({non_ascii} with non-ASCII or '&'), context length {length}, "
        f"1 CPU thread, best of {args.repeats}; ids identical"
    )
    print(f"construction: reference {best['ref build'] * 1e3:.0f} ms, TextTokenizer {best['fast build'] * 1e3:.0f} ms")
    header = f"{'pass':<22}{'reference captions/s':>22}{'TextTokenizer captions/s':>26}{'speedup':>10}"
    print(header)
    print("-" * len(header))
    for label in PASSES:
        ref_s, fast_s = best[f"ref {label}"], best[f"fast {label}"]
        print(f"{label:<22}{len(captions) / ref_s:>22,.0f}{len(captions) / fast_s:>26,.0f}{ref_s / fast_s:>9.1f}x")


if __name__ == "__main__":
    main()
