#!/usr/bin/env python
"""Prepare .gpu/ for benchmarks/gpu_check.sh on a CUDA machine that has no network and takes
at most 64 MiB of files per call (our workplace's `device` tool).

What goes in, and why:
  .gpu/data/     the study's 490 photos (coco128 + coco-mini) with their labels. The JPEGs
                 are re-encoded at quality 90, same pixel size, so that the photos (80 MB as
                 shipped) fit the transfer limit. Labels are copied unchanged; they stay
                 valid because no image is resized.
  .gpu/work/proposals/ss500.jsonl
                 the full CPU study's selective-search boxes (500 px), when that study has
                 mined at least once. The GPU image has OpenCV without the contrib module
                 (no ximgproc), and opencv-contrib's wheel alone is 69 MB, so selective
                 search runs here and the GPU run reuses its boxes: both studies mine the
                 same proposals.

On a CUDA machine that holds ../shared/data and opencv-contrib, skip this script: run
`python -m benchmarks.study --mode gpu` directly.

  python benchmarks/gpu_prepare.py [--quality 90]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SOURCES = ("coco128", "coco-mini")
CACHE = REPO / "benchmarks" / "work" / "study_long" / "proposals" / "ss500.jsonl"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--dest", default=str(REPO / ".gpu"))
    p.add_argument("--quality", type=int, default=90)
    args = p.parse_args(argv)

    from PIL import Image

    src, dest = Path(args.data), Path(args.dest)
    n_img, size = 0, 0
    for name in SOURCES:
        for f in sorted((src / name).rglob("*")):
            if not f.is_file():
                continue
            out = dest / "data" / name / f.relative_to(src / name)
            out.parent.mkdir(parents=True, exist_ok=True)
            if f.suffix.lower() in (".jpg", ".jpeg"):
                if not out.exists():
                    with Image.open(f) as im:
                        im.convert("RGB").save(out, "JPEG", quality=args.quality)
                n_img += 1
            elif not out.exists():
                shutil.copy(f, out)
            size += out.stat().st_size
    print(f"{n_img} photos, {size / 2**20:.1f} MiB in {dest / 'data'}")
    if CACHE.exists():
        cache = dest / "work" / "proposals" / CACHE.name
        cache.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(CACHE, cache)
        lines = len(CACHE.read_text().splitlines()) - 1
        print(f"selective-search cache: {lines} photos -> {cache}")
    else:
        print(f"no {CACHE}: run the CPU study's first mining first (the GPU image cannot run "
              "selective search)", file=sys.stderr)
        return 1
    if ".gpu/" not in (REPO / ".git" / "info" / "exclude").read_text():
        print("add '/.gpu/' to .git/info/exclude so .gpu is carried, not committed", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
