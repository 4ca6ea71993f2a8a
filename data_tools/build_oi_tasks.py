#!/usr/bin/env python
"""Open Images V7 box annotations -> the OI-Crop and OI-Pos task files (``oi-crop.json``, ``oi-pos.json``).

    python data_tools/build_oi_tasks.py --boxes oidv7-test-annotations-bbox.csv \\
        --classes oidv7-class-descriptions-boxable.csv --images open_images/test --out open_images

Then ``fuselip-med eval --tasks oi-crop,oi-pos --data oi_crop=open_images/oi-crop.json --data
oi_pos=open_images/oi-pos.json`` (or ``--suite paper --data-root DIR`` with ``DIR/open_images``). The rules
and their parameters are in ``fuselip_med.eval.oi_build``; the counts the run produced are printed and stored
in each file's ``meta.counts``. Writing is atomic: rerun to rebuild.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--boxes", required=True, help="the split's *-annotations-bbox.csv")
    parser.add_argument("--classes", required=True, help="class-descriptions-boxable.csv (LabelName,DisplayName)")
    parser.add_argument("--images", required=True, help="folder with the split's <ImageID>.jpg images")
    parser.add_argument("--out", required=True, help="folder to write oi-crop.json and oi-pos.json into")
    parser.add_argument("--subset", default="test", help="the split name stored in the files' meta (default test)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the candidate choice (default 0)")
    parser.add_argument("--max-per-label", type=int, default=10, help="samples per label and task (default 10)")
    args = parser.parse_args(argv)
    from fuselip_med.eval.oi_build import OIRules, build_oi_tasks

    try:
        counts = build_oi_tasks(args.boxes, args.classes, args.images, args.out, subset=args.subset,
                                rules=OIRules(seed=args.seed, max_per_label=args.max_per_label))
    except (OSError, KeyError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(counts, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
