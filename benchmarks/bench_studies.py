"""Series embedding speed and memory: series/s and peak memory of ``inference.units.embed_series`` on CT series
written here with pydicom (CT Image Storage, int16, ``--px`` square slices), ``--sampled`` (16) slices per series,
for series of 100, 300 and 600 slices, tiny and S FuseLIP (random weights: speed does not depend on them) on the CPU.

Each (size, slice count) runs in its own process, so the peak resident set (``ru_maxrss``) belongs to that run
alone; ``numpy peak`` is the tracemalloc peak during the embedding (headers, sampled pixels, renderings; torch's
own allocations are not traced). Only the sampled slices are decoded, so memory must not grow with the series
length: compare the 100- and 600-slice rows.

    python benchmarks/bench_studies.py [--sizes tiny small] [--lengths 100 300 600] [--px 512] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np


def write_series(folder: Path, n: int, px: int) -> None:
    """A CT series of ``n`` slices, 1 mm apart, as pydicom-written files named in shuffled order."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    order = np.random.default_rng(0).permutation(n)
    base = (np.random.default_rng(1).integers(0, 1400, (px, px))).astype(np.int16)
    for name, z in zip(order, range(n)):
        meta = FileMetaDataset()
        meta.TransferSyntaxUID, meta.MediaStorageSOPClassUID = ExplicitVRLittleEndian, CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, meta.MediaStorageSOPInstanceUID, "CT"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = study, series, z + 1
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0.0, 0.0, float(z)], [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.Rows, ds.Columns = [0.7, 0.7], px, px
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept, ds.WindowWidth, ds.WindowCenter = 1.0, -1024.0, 400, 40
        ds.PixelData = np.roll(base, z, axis=0).tobytes()
        ds.save_as(folder / f"IM{name:06d}", enforce_file_format=True)


def measure(size: str, folder: str, sampled: int, repeats: int) -> dict:
    """One run (in this process): seconds per series (best of ``repeats``) and the memory peaks."""
    import torch

    from fuselip_med.core.fuselip import FuseLIP, FuseLIPConfig
    from fuselip_med.data.phi import Pseudonyms
    from fuselip_med.data.studies import find_series
    from fuselip_med.inference.units import UnitOptions, embed_series

    torch.manual_seed(0)
    model = FuseLIP(FuseLIPConfig.from_size(size)).eval()
    keys = Pseudonyms.fresh()
    embed_series(model, find_series(folder, keys), UnitOptions(slices=2), progress=False)  # warm-up
    times = []
    tracemalloc.start()
    for _ in range(repeats):
        start = time.perf_counter()
        embed_series(model, find_series(folder, keys), UnitOptions(slices=sampled), progress=False)
        times.append(time.perf_counter() - start)
    _, numpy_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"seconds": min(times), "numpy_peak_mb": numpy_peak / 2**20,
            "rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[100, 300, 600])
    parser.add_argument("--sampled", type=int, default=16)
    parser.add_argument("--px", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--run", nargs=2, metavar=("SIZE", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        print(json.dumps(measure(args.run[0], args.run[1], args.sampled, args.repeats)))
        return
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for length in args.lengths:
            folder = Path(tmp) / f"series_{length}"
            write_series(folder, length, args.px)
            for size in args.sizes:
                out = subprocess.run([sys.executable, __file__, "--run", size, str(folder), "--sampled",
                                      str(args.sampled), "--repeats", str(args.repeats)],
                                     check=True, capture_output=True, text=True,
                                     env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}).stdout
                rows.append((size, length, json.loads(out.strip().splitlines()[-1])))
    print(f"series embedding, {args.sampled} sampled slices of {args.px}x{args.px} CT, CPU "
          f"({torch.get_num_threads()} threads)")
    print(f"{'size':6} {'slices':>6} {'series/s':>9} {'s/series':>9} {'numpy peak MB':>14} {'RSS peak MB':>12}")
    for size, length, result in rows:
        print(f"{size:6} {length:6d} {1 / result['seconds']:9.3f} {result['seconds']:9.2f} "
              f"{result['numpy_peak_mb']:14.1f} {result['rss_peak_mb']:12.0f}")


if __name__ == "__main__":
    main()
