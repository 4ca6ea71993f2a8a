"""Rule-based caption -> QA generation over synthetic ROCOv2-style captions (goal: ROCOv2 train, 60k captions,
in under 1 minute on 2 cores).

    python benchmarks/bench_synth_rules.py [--captions 60000] [--seed 0] [--repeats 1]

Captions mix modalities, planes, sequences, findings with sides, sizes and locations, negations, hedges,
abbreviations, lists and arrows, with ROCOv2's manual concepts (modality; region and projection for X-rays).
Times `synthesize_rules` (single process) and the JSONL write; the best of --repeats runs.
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fuselip_med.data.synth.common import CaptionRow, write_jsonl_atomic  # noqa: E402
from fuselip_med.data.synth.rules import synthesize_rules  # noqa: E402

STUDIES = [  # (caption start, manual concepts)
    ("Axial contrast-enhanced CT of the abdomen", ["C0040405"]),
    ("Coronal CT of the chest", ["C0040405"]),
    ("Axial T2-weighted MRI of the brain", ["C0024485"]),
    ("Sagittal T1WI of the lumbar spine", ["C0024485"]),
    ("FLAIR image", ["C0024485"]),
    ("CXR (PA view)", ["C1306645", "C0817096", "C1996865"]),
    ("AP radiograph of the left knee", ["C1306645", "C0023216", "C1999039"]),
    ("Lateral skull X-ray", ["C1306645", "C0037303", "C0205129"]),
    ("Abdominal ultrasound", ["C0041618"]),
    ("Transverse US of the right kidney", ["C0041618"]),
    ("Digital subtraction angiogram", ["C0002978"]),
    ("FDG PET", ["C0032743"]),
]
FINDINGS = [
    "a {n} mm nodule in the {side} upper lobe", "a {n}.{m} x {m}.{n} cm enhancing mass in the {side} frontal lobe",
    "{side} pleural effusion", "a hypodense lesion in the {side} hepatic lobe", "bilateral pleural effusions",
    "a displaced fracture of the {side} distal radius", "LLL consolidation", "a {n} cm cyst in the {side} kidney",
    "hydronephrosis", "a stenosis of the {side} renal artery", "cardiomegaly",
]
TAILS = ["", ".", " (arrow).", ", no pneumothorax.", " without hemorrhage.", "; possible metastasis.",
         ", with no evidence of fracture or dislocation.", " (white arrows) and ascites.", "; follow-up in {n} months."]


def synthetic_rows(n: int, seed: int) -> list[CaptionRow]:
    rnd = random.Random(seed)
    rows = []
    for i in range(n):
        study, concepts = rnd.choice(STUDIES)
        findings = rnd.sample(FINDINGS, rnd.choice((1, 1, 2, 3)))
        listed = findings[0] if len(findings) == 1 else ", ".join(findings[:-1]) + " and " + findings[-1]
        values = {"n": rnd.randint(1, 9), "m": rnd.randint(0, 9), "side": rnd.choice(("left", "right"))}
        caption = f"{study} showing {listed}{rnd.choice(TAILS)}".format(**values)
        rows.append(CaptionRow(f"ROCOv2_2023_train_{i + 1:06d}", f"train/{i}.jpg", caption, tuple(concepts)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", type=int, default=60000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    rows = synthetic_rows(args.captions, args.seed)
    best_generate = best_write = float("inf")
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            start = time.perf_counter()
            records = synthesize_rules(rows)
            best_generate = min(best_generate, time.perf_counter() - start)
            start = time.perf_counter()
            write_jsonl_atomic(Path(tmp) / "vqa.jsonl", records)
            best_write = min(best_write, time.perf_counter() - start)
    total = best_generate + best_write
    scaled = total * 60000 / max(args.captions, 1)
    print("| captions | QA records | generate (s) | write JSONL (s) | captions/s | 60k captions (s) | goal < 60 s |")
    print("|---:|---:|---:|---:|---:|---:|:---:|")
    print(f"| {args.captions} | {len(records)} | {best_generate:.2f} | {best_write:.2f} | "
          f"{args.captions / total:.0f} | {scaled:.1f} | {'yes' if scaled < 60 else 'no'} |")


if __name__ == "__main__":
    main()
