#!/usr/bin/env python3
"""Are the pixels vitforge decodes from TIFFs the ones Pillow decodes?

Writes every JPEG and PNG under the folders given as TIFFs of the kinds met in practice, into a
scratch folder: uncompressed, LZW, Deflate (Pillow), JPEG-compressed RGB (Pillow, through
libtiff), JPEG-compressed YCbCr 2×2 in strips and in tiles (libtiff's `tiffcp`, its default
for colour), and palette colours (Pillow's adaptive 256-colour palette, LZW). Then runs `bench/jpeg_parity.py` on each kind's folder, which has vitforge decode
each file (`decoded_pixels` example, also timing it) and compares with Pillow sample for sample.
Exit status 1 when any sample differs.

Usage (needs `pip install pillow numpy` and libtiff's `tiffcp`, Debian `libtiff-tools`):

    bench/tiff_parity.py ../shared/data/catsdogs-dev ../shared/data/catsdogs-more

`KINDS=palette,lzw` (say) writes and checks only those kinds.
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def write(kind, rgb, raw, path):
    """Writes `rgb` to `path` as a TIFF of `kind`; `raw` is where its uncompressed TIFF is (or
    goes), which `tiffcp` recompresses."""
    if kind == "raw":
        rgb.save(path)
    elif kind in ("lzw", "deflate"):
        rgb.save(path, compression={"lzw": "tiff_lzw", "deflate": "tiff_adobe_deflate"}[kind])
    elif kind == "jpeg-rgb":
        rgb.save(path, compression="jpeg", quality=90)
    elif kind == "palette":
        rgb.convert("P", palette=Image.Palette.ADAPTIVE).save(path, compression="tiff_lzw")
    else:
        if not raw.exists():
            rgb.save(raw)
        strips = ["-r", "16"] if kind == "jpeg-ycbcr-strips" else ["-t", "-w", "128", "-l", "128"]
        subprocess.run(["tiffcp", "-c", "jpeg:90", *strips, raw, path], check=True)


def main():
    folders = [Path(f).resolve() for f in sys.argv[1:]]
    if not folders:
        sys.exit(__doc__)
    files = sorted(p for f in folders for p in f.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    kinds = ["raw", "lzw", "deflate", "jpeg-rgb", "jpeg-ycbcr-strips", "jpeg-ycbcr-tiles", "palette"]
    if os.environ.get("KINDS"):
        wanted = os.environ["KINDS"].split(",")
        if unknown := set(wanted) - set(kinds):
            sys.exit(f"unknown kinds {sorted(unknown)}: choose from {kinds}")
        kinds = [k for k in kinds if k in wanted]
    with tempfile.TemporaryDirectory() as out:
        out = Path(out)
        for kind in {"raw", *kinds}:
            (out / kind).mkdir()
        for i, f in enumerate(files):
            name = f"{i:05d}-{f.stem}.tif"
            with Image.open(f) as im:
                rgb = im.convert("RGB")
            for kind in kinds:
                write(kind, rgb, out / "raw" / name, out / kind / name)
        status = 0
        for kind in kinds:
            print(f"== {kind}: {len(files)} TIFFs", flush=True)
            status |= subprocess.run([sys.executable, ROOT / "bench" / "jpeg_parity.py", out / kind]).returncode
        sys.exit(status)


if __name__ == "__main__":
    main()
