#!/usr/bin/env python3
"""Writes a large JPEG made of many photos, tiled: a stand-in for a phone photo (4032×3024,
12 megapixels, 4:2:0 at quality 92 by default) with real photos' detail, for timing decoding and
resizing (`cargo run --release --example prepare_time`, `IMAGE=… bench/predict_latency.sh`).

Usage (needs `pip install pillow`):

    bench/mosaic.py OUT.jpg FOLDER [WIDTH HEIGHT]
    bench/mosaic.py /tmp/mosaic12.jpg ../shared/data/catsdogs-more

The first 96 JPEGs under FOLDER (sorted by path) fill a 12 × 8 grid, each resized to its cell.
"""

import sys
from pathlib import Path

from PIL import Image


def main():
    if len(sys.argv) not in (3, 5):
        sys.exit(__doc__)
    out, folder = Path(sys.argv[1]), Path(sys.argv[2])
    width, height = (int(sys.argv[3]), int(sys.argv[4])) if len(sys.argv) == 5 else (4032, 3024)
    photos = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))[:96]
    if len(photos) < 96:
        sys.exit(f"{folder} has {len(photos)} JPEGs; 96 are needed")
    cell_w, cell_h = width // 12, height // 8
    mosaic = Image.new("RGB", (width, height))
    for i, photo in enumerate(photos):
        tile = Image.open(photo).convert("RGB").resize((cell_w, cell_h), Image.BICUBIC)
        mosaic.paste(tile, ((i % 12) * cell_w, (i // 12) * cell_h))
    mosaic.save(out, quality=92)
    print(f"wrote {out}: {width}×{height} from {len(photos)} photos of {folder}")


if __name__ == "__main__":
    main()
