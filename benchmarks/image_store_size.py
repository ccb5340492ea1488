#!/usr/bin/env python
"""What the decoded-image store takes: bytes per photo and per 1,000 photos, per working size.

Fills a fresh store (orl.imagestore) with every photo of a folder at each working size and
sums the entry files (uint8, 3 x H x W, plus a 128-byte .npy header). The size depends only on
the photos' aspect ratios and the working size, not on the machine, so the results file can be
compared across runs. Writes benchmarks/results/image_store_size.{json,md}.

  python benchmarks/image_store_size.py                     # ../shared/data/coco128 and data/sample
  python benchmarks/image_store_size.py --images DIR --sizes 128,224,320,448
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from orl.images import list_images  # noqa: E402
from orl.imagestore import ImageStore  # noqa: E402

FOLDERS = [REPO.parent / "shared" / "data" / "coco128" / "images", REPO / "data" / "sample" / "images"]
RESULTS = REPO / "benchmarks" / "results" / "image_store_size.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", action="append", help="photo folders (default: coco128 and the bundled sample)")
    # 128: 2 x the tiny preset's 64 px views; 224: cpu (112); 320: the study's GPU runs (160); 448: paper (224).
    p.add_argument("--sizes", default="128,224,320,448")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    folders = [Path(f) for f in args.images] if args.images else [f for f in FOLDERS if f.exists()]
    rows = []
    for folder in folders:
        paths = [str(folder / f) for f in list_images(folder)]
        for size in (int(s) for s in args.sizes.split(",")):
            with tempfile.TemporaryDirectory() as tmp:
                store = ImageStore(tmp, size)
                entries, failed = store.ensure(paths, workers=min(4, os.cpu_count() or 1))
                stored = [e for e in entries if e is not None]
                disk = sum(e.path.stat().st_size for e in stored)
            per_photo = disk / len(stored)
            rows.append({"folder": os.path.relpath(folder, REPO), "working_size": size, "photos": len(stored),
                         "refused": len(failed), "bytes": disk, "bytes_per_photo": per_photo,
                         "mb_per_1000_photos": per_photo * 1000 / 1e6,
                         "pixel_bytes_per_photo": sum(e.nbytes for e in stored) / len(stored)})
            print(rows[-1], flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python " + " ".join([os.path.relpath(__file__, REPO), *sys.argv[1:]]),
                               "results": rows}, indent=1) + "\n")
    lines = ["# Decoded-image store: size on disk (and in the page cache when in use)", "",
             f"`{json.loads(out.read_text())['command']}`", "",
             "| photos | working size (px, shorter side) | MB per 1,000 photos | KB per photo |",
             "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['folder']} ({r['photos']}) | {r['working_size']} | {r['mb_per_1000_photos']:.0f} | "
                     f"{r['bytes_per_photo'] / 1e3:.0f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
