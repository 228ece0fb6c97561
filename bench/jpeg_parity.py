#!/usr/bin/env python3
"""Are the pixels vitforge decodes from images the ones Pillow decodes?

Runs `cargo run --release --example decoded_pixels` on the folders given (every JPEG, PNG and TIFF
under them; it also times JPEG decoding against the image crate's own decoder), then compares each
image's pixels with Pillow's (`Image.open(f).convert("RGB")`, as `transformers` reads an image,
before `exif_transpose`; the photos measured have no EXIF orientation) and prints how many
samples differ and by how much. Exit status 1 when any sample differs.

Usage (needs `pip install pillow numpy`):

    bench/jpeg_parity.py ../shared/data/catsdogs-dev ../shared/data/catsdogs-more
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def main():
    folders = [Path(f).resolve() for f in sys.argv[1:]]
    if not folders:
        sys.exit(__doc__)
    files = sorted(p for f in folders for p in f.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".tif", ".tiff"))
    with tempfile.TemporaryDirectory() as out:
        subprocess.run(["cargo", "run", "--quiet", "--release", "--locked", "--example", "decoded_pixels", "--", out, *map(str, folders)], cwd=ROOT, check=True)
        samples = differing = off_by_more = worst = 0
        kinds = {}
        for f in files:
            with Image.open(f) as im:
                kind = f"{im.format} {im.mode}" + (" progressive" if im.info.get("progressive") else "")
                kind += f" {im.info['compression']}" if im.format == "TIFF" else ""
                pillow = np.asarray(im.convert("RGB"), dtype=np.int16)
            ours = np.asarray(Image.open(Path(out) / (f.name + ".png")).convert("RGB"), dtype=np.int16)
            if ours.shape != pillow.shape:
                sys.exit(f"{f}: vitforge {ours.shape}, Pillow {pillow.shape}")
            diff = np.abs(ours - pillow)
            samples += diff.size
            differing += int((diff > 0).sum())
            off_by_more += int((diff > 1).sum())
            worst = max(worst, int(diff.max()))
            kinds[kind] = kinds.get(kind, 0) + 1
    print(f"{len(files)} images ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}), {samples} samples:")
    print(f"  {differing} differ from Pillow's ({100 * differing / samples:.2f}%), {off_by_more} by more than one level, at most {worst}")
    sys.exit(1 if differing else 0)


if __name__ == "__main__":
    main()
