#!/usr/bin/env python3
"""Are the pixels vitforge decodes from TIFFs the ones Pillow decodes?

Writes every JPEG and PNG under the folders given as TIFFs of the kinds met in practice, into a
scratch folder: uncompressed, LZW, Deflate (Pillow), JPEG-compressed RGB (Pillow, through
libtiff), and JPEG-compressed YCbCr 2×2 in strips and in tiles (libtiff's `tiffcp`, its default
for colour). Then runs `bench/jpeg_parity.py` on each kind's folder, which has vitforge decode
each file (`decoded_pixels` example, also timing it) and compares with Pillow sample for sample.
Exit status 1 when any sample differs.

Usage (needs `pip install pillow numpy` and libtiff's `tiffcp`, Debian `libtiff-tools`):

    bench/tiff_parity.py ../shared/data/catsdogs-dev ../shared/data/catsdogs-more
"""

import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def main():
    folders = [Path(f).resolve() for f in sys.argv[1:]]
    if not folders:
        sys.exit(__doc__)
    files = sorted(p for f in folders for p in f.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    kinds = ["raw", "lzw", "deflate", "jpeg-rgb", "jpeg-ycbcr-strips", "jpeg-ycbcr-tiles"]
    with tempfile.TemporaryDirectory() as out:
        out = Path(out)
        for kind in kinds:
            (out / kind).mkdir()
        for i, f in enumerate(files):
            name = f"{i:05d}-{f.stem}.tif"
            with Image.open(f) as im:
                rgb = im.convert("RGB")
            raw = out / "raw" / name
            rgb.save(raw)
            rgb.save(out / "lzw" / name, compression="tiff_lzw")
            rgb.save(out / "deflate" / name, compression="tiff_adobe_deflate")
            rgb.save(out / "jpeg-rgb" / name, compression="jpeg", quality=90)
            subprocess.run(["tiffcp", "-c", "jpeg:90", "-r", "16", raw, out / "jpeg-ycbcr-strips" / name], check=True)
            subprocess.run(["tiffcp", "-c", "jpeg:90", "-t", "-w", "128", "-l", "128", raw, out / "jpeg-ycbcr-tiles" / name], check=True)
        status = 0
        for kind in kinds:
            print(f"== {kind}: {len(files)} TIFFs", flush=True)
            status |= subprocess.run([sys.executable, ROOT / "bench" / "jpeg_parity.py", out / kind]).returncode
        sys.exit(status)


if __name__ == "__main__":
    main()
