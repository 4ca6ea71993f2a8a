"""Image decoding throughput: decoded images/s through a torch DataLoader (PNG and DICOM, 0 and 2 workers).

Builds a temporary folder of generated 512x512 RGB PNGs and copies of pydicom test CTs (512x512 uncompressed
and JPEG 2000 lossless from pydicom-data when installed, else the 128x128 CT_small.dcm), decodes every file
with ``fuselip_med.data.images.decode_image`` to a (3, 256, 256) tensor and prints one table. CPU only; about
half a minute.

    python benchmarks/bench_data.py [--images 64] [--batch-size 16] [--workers 0 2]
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import warnings

import numpy as np
import torch
from PIL import Image
from pydicom.data import get_testdata_file
from torch.utils.data import DataLoader, Dataset

from fuselip_med.data.images import DecodeOptions, decode_image


class FileDataset(Dataset):
    def __init__(self, paths: list[str], options: DecodeOptions) -> None:
        self.paths, self.options = paths, options

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return decode_image(self.paths[index], self.options)


def make_pngs(folder: str, count: int) -> list[str]:
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 200, 512, dtype=np.float32)
    paths = []
    for i in range(count):
        image = ramp[None, :, None] + ramp[:, None, None] * 0.25 + rng.normal(0, 12, (512, 512, 3))
        path = os.path.join(folder, f"img_{i:04d}.png")
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def copy_dicom(folder: str, name: str, count: int) -> list[str] | None:
    source = get_testdata_file(name, download=False)  # never download: CI machines have no network
    if source is None:
        return None
    paths = []
    for i in range(count):
        path = os.path.join(folder, f"{os.path.splitext(name)[0]}_{i:04d}.dcm")
        shutil.copyfile(source, path)
        paths.append(path)
    return paths


def images_per_second(paths: list[str], workers: int, batch_size: int, options: DecodeOptions) -> float:
    loader = DataLoader(FileDataset(paths, options), batch_size=batch_size, num_workers=workers,
                        persistent_workers=workers > 0)
    for _ in loader:  # warm-up epoch: worker start-up, imports, file cache
        pass
    start = time.perf_counter()
    count = sum(batch.shape[0] for batch in loader)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="files per format")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args()
    warnings.simplefilter("ignore", UserWarning)  # pydicom's remarks on its test files
    torch.set_num_threads(1)
    options = DecodeOptions()

    with tempfile.TemporaryDirectory() as folder:
        sets: list[tuple[str, list[str]]] = [("PNG 512x512 RGB", make_pngs(folder, args.images))]
        for name, label in [("693_UNCR.dcm", "DICOM CT 512x512 uncompressed"),
                            ("693_J2KR.dcm", "DICOM CT 512x512 JPEG 2000"),
                            ("CT_small.dcm", "DICOM CT 128x128 uncompressed")]:
            paths = copy_dicom(folder, name, args.images)
            if paths is not None:
                sets.append((label, paths))

        rows = []
        for label, paths in sets:
            for workers in args.workers:
                rate = images_per_second(paths, workers, args.batch_size, options)
                rows.append((label, workers, rate, 1000.0 / rate))

    print(f"decode_image -> (3, {options.image_size}, {options.image_size}); {args.images} files per format, "
          f"batch {args.batch_size}, torch threads 1, {os.cpu_count()} CPUs")
    print(f"{'format':<32} {'workers':>7} {'images/s':>10} {'ms/image':>9}")
    for label, workers, rate, ms in rows:
        print(f"{label:<32} {workers:>7} {rate:>10.1f} {ms:>9.2f}")


if __name__ == "__main__":
    main()
