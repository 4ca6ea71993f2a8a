"""Indexing from a PACS against indexing from disk: instances/s fetched (QIDO-RS + WADO-RS into the cache) and
fetched + embedded from a local Orthanc, against embedding the same files from a folder, in one run.

A local Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``, started as the tests start it: ``tests/orthanc.py``)
receives ``--series`` CT series of ``--slices`` 256 x 256 int16 slices; then, with a tiny FuseLIP (random
weights) on the CPU:

- ``disk``: ``index build`` over the folder (hashing, decoding, embedding);
- ``dicomweb fetch``: ``sync_instances`` into an empty cache (``--max-concurrent`` 1 and 4);
- ``dicomweb fetch + embed``: the sync plus ``index build`` over the cached files (a fresh cache and index).

    python benchmarks/bench_dicomweb.py [--series 4] [--slices 32] [--threads 2]

Without Orthanc it says so and exits 0 (``make bench`` runs on machines without it).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests/orthanc.py and tests/dicom_series.py: the same server and series as the tests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=4)
    parser.add_argument("--slices", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from tests.orthanc import ORTHANC, dicomweb_plugin

    if not ORTHANC or not dicomweb_plugin():
        print("bench_dicomweb: Orthanc with its DICOMweb plugin is not installed "
              "(apt-get install orthanc orthanc-dicomweb); nothing measured.")
        return

    import torch

    from fuselip_med.core.fuselip import FuseLIP, FuseLIPConfig
    from fuselip_med.data.adapters.dicomweb import (
        PASSWORD_ENV,
        DicomwebQuery,
        DicomwebServer,
        sync_instances,
    )
    from fuselip_med.data.phi import Pseudonyms
    from fuselip_med.search.index import IndexEntry, IndexSettings, ModelId, build_index, index_salt, list_entries
    from tests.dicom_series import write_series
    from tests.orthanc import start_orthanc

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = FuseLIP(FuseLIPConfig.from_size("tiny")).eval()
    model_id = ModelId("tiny", "bench")
    settings = IndexSettings(index_type="flat")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = tmp / "export"
        paths = [p for s in range(args.series)
                 for p in write_series(folder / f"series{s}", "CT", args.slices, seed=s, size=256)]
        n = len(paths)
        server = start_orthanc(tmp / "orthanc")
        try:
            server.upload(paths)
            os.environ[PASSWORD_ENV] = server.password
            pacs = DicomwebServer(server.dicomweb, user=server.user)

            start = time.perf_counter()
            salt = index_salt(tmp / "disk_index")
            entries, _ = list_entries(folder, pseudonyms=Pseudonyms(salt))
            build_index(tmp / "disk_index", entries, model, model_id, settings, progress=False, salt=salt)
            rows.append(("disk: index build over the folder", n, time.perf_counter() - start))

            for concurrent in (1, 4):
                start = time.perf_counter()
                sync_instances(pacs, DicomwebQuery(), tmp / f"cache{concurrent}", max_concurrent=concurrent,
                               progress=False)
                rows.append((f"dicomweb: fetch only, {concurrent} in flight", n, time.perf_counter() - start))

            start = time.perf_counter()
            report = sync_instances(pacs, DicomwebQuery(), tmp / "pacs_index" / ".dicomweb", max_concurrent=4,
                                    progress=False)
            cached = [IndexEntry(i.key, str(i.path), None, "dicomweb") for i in report.instances]
            build_index(tmp / "pacs_index", cached, model, model_id, settings, progress=False)
            rows.append(("dicomweb: fetch (4 in flight) + index build", n, time.perf_counter() - start))
        finally:
            server.stop()
    print(f"\n{args.series} CT series x {args.slices} slices (256 x 256 int16), tiny FuseLIP, CPU, "
          f"{args.threads} threads, Orthanc {ORTHANC} on 127.0.0.1\n")
    print("| path | instances | seconds | instances/s |\n|---|---:|---:|---:|")
    for name, count, seconds in rows:
        print(f"| {name} | {count} | {seconds:.2f} | {count / seconds:.1f} |")


if __name__ == "__main__":
    main()
