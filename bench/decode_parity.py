#!/usr/bin/env python3
"""Does an image reach a fine-tuned model through vitforge as it does through transformers?

Writes one photo in many encodings (PNG in every Pillow mode, 16-bit, GIF, BMP, WebP, JPEG
4:2:0 / 4:4:4 / progressive / grey / arithmetic-coded, TIFF LZW / Deflate with alpha / grey /
bilevel / CMYK / palette / JPEG RGB / JPEG YCbCr tiles, PGM, PPM, EXIF and TIFF orientations) to
a scratch folder, classifies each with `vitforge predict` and with `tests/fixtures/check_export.py` (transformers, the images opened by
Pillow and turned upright by `exif_transpose`, as `transformers`' `load_image` does), and prints
the difference in the predicted label's probability for each.

Usage (needs `pip install torch transformers pillow numpy`, libtiff's `tiffcp` and libjpeg-turbo's
`jpegtran`, Debian `libtiff-tools` and `libjpeg-turbo-progs`):

    bench/decode_parity.py --model MODEL_DIR --image PHOTO [--vitforge target/release/vitforge]

MODEL_DIR is a model vitforge trained (`vitforge train … --output MODEL_DIR`). Exit status 1 when
an encoding differs by more than 1e-5 (the two runtimes' float arithmetic), or a file one side
could not read. Lossy ones included: both sides decode WebP with libwebp's rules and JPEG with
libjpeg-turbo's decoder (vitforge through the `mozjpeg` crate; before 2026-12-06 it used
zune-jpeg, whose rounding moved JPEG rows by up to 5e-3).
"""

import argparse
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def exif(orientation):
    e = Image.Exif()
    e[0x0112] = orientation
    return e.tobytes()


def png16(a16, mode_bits, color_type):
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit RGB)."""
    import struct
    import zlib

    h, w = a16.shape[:2]
    rows = b"".join(b"\0" + a16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, mode_bits, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def variants(photo, out):
    """The names of the files written to `out`."""
    rgb = Image.open(photo).convert("RGB")
    w, h = rgb.size
    a = np.array(rgb)
    alpha = np.linspace(0, 255, w)[None, :].repeat(h, 0).astype(np.uint8)
    rgba = Image.fromarray(np.dstack([a, alpha]), "RGBA")
    grey = rgb.convert("L")
    files = []

    def save(name, img, lossless=True, **kw):
        # Pillow writes WebP lossy unless told; its other formats take no such option.
        img.save(out / name, **({"lossless": lossless} if name.endswith(".webp") else {}), **kw)
        files.append(name)

    save("rgb.png", rgb)
    save("rgba.png", rgba)
    save("l.png", grey)
    save("la.png", Image.fromarray(np.dstack([np.array(grey), alpha]), "LA"))
    save("p.png", rgb.convert("P"))
    save("p_transparent.png", rgb.convert("P"), transparency=0)
    save("1bit.png", rgb.convert("1"))
    rng = np.random.default_rng(0)
    a16 = a.astype(np.uint16) * 257 + rng.integers(0, 257, a.shape).astype(np.uint16)
    (out / "rgb16.png").write_bytes(png16(a16, 16, 2))
    files.append("rgb16.png")
    save("frame.gif", rgb.convert("P"))
    save("transparent.gif", rgba.convert("P"), transparency=0)
    save("24bit.bmp", rgb)
    save("lossless.webp", rgb, lossless=True)
    save("lossless_alpha.webp", rgba, lossless=True)
    save("lossy.webp", rgb, lossless=False, quality=90)  # decoded by libwebp's rules on both sides
    save("q90_420.jpg", rgb, lossless=False, quality=90)
    save("q95_444.jpg", rgb, lossless=False, quality=95, subsampling=0)
    save("progressive.jpg", rgb, lossless=False, quality=95, progressive=True)
    save("grey.jpg", grey, lossless=False, quality=95)
    save("cmyk.jpg", rgb.convert("CMYK"), lossless=False, quality=95)
    # Arithmetic-coded: the 4:2:0 one recoded losslessly by libjpeg-turbo's `jpegtran`.
    subprocess.run(["jpegtran", "-arithmetic", "-outfile", out / "arithmetic.jpg", out / "q90_420.jpg"], check=True)
    files.append("arithmetic.jpg")
    save("lzw.tif", rgb, compression="tiff_lzw")
    save("rgba_deflate.tif", rgba, compression="tiff_adobe_deflate")
    save("l.tif", grey)
    save("1bit_group4.tif", rgb.convert("1"), compression="group4")
    save("cmyk.tif", rgb.convert("CMYK"))
    save("palette.tif", rgb.convert("P", palette=Image.Palette.ADAPTIVE), compression="tiff_lzw")
    save("grey.pgm", grey)
    save("rgb.ppm", rgb)
    save("jpeg_rgb.tif", rgb, compression="jpeg", quality=90)
    # JPEG-compressed YCbCr 2×2 in tiles, libtiff's default for colour (its `tiffcp` writes it).
    subprocess.run(["tiffcp", "-c", "jpeg:90", "-t", "-w", "128", "-l", "128", out / "lzw.tif", out / "jpeg_ycbcr_tiles.tif"], check=True)
    files.append("jpeg_ycbcr_tiles.tif")
    # Stored sideways (a quarter turn back) with EXIF orientation 6, as phones store portraits,
    # and mirrored with orientation 2.
    save("orientation6.png", rgb.transpose(Image.Transpose.ROTATE_90), exif=exif(6))
    save("orientation2.png", rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT), exif=exif(2))
    save("orientation8.webp", rgb.transpose(Image.Transpose.ROTATE_270), lossless=True, exif=exif(8))
    save("orientation6.jpg", rgb.transpose(Image.Transpose.ROTATE_90), lossless=False, quality=95, exif=exif(6))
    save("orientation6.tif", rgb.transpose(Image.Transpose.ROTATE_90), tiffinfo={274: 6})
    return files


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--image", required=True, type=Path)
    ap.add_argument("--vitforge", default=ROOT / "target/release/vitforge", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = variants(args.image, tmp)
        paths = [str(tmp / n) for n in files]
        ours = subprocess.run([str(args.vitforge), "predict", "--model", str(args.model), "--top-k", "1000", *paths], capture_output=True, text=True)
        theirs = subprocess.run([sys.executable, str(ROOT / "tests/fixtures/check_export.py"), str(args.model), *paths], capture_output=True, text=True)
        if theirs.returncode != 0:
            sys.exit(f"check_export.py failed: {theirs.stderr}")
        labels = json.loads((args.model / "config.json").read_text())["id2label"]
        theirs = {Path(r["file"]).name: r for r in map(json.loads, theirs.stdout.splitlines())}
        ours = {Path(p["file"]).name: p for p in json.loads(ours.stdout)["predictions"]}
    bad = 0
    print(f"{'file':22} {'label':>8} {'vitforge':>10} {'transformers':>13} {'difference':>11}")
    for name in files:
        o, t = ours.get(name), theirs.get(name)
        if o is None or "error" in o or t is None:
            print(f"{name:22} not read: {o}")
            bad += 1
            continue
        label = o["label"]
        index = next(int(i) for i, l in labels.items() if l == label)
        diff = abs(o["score"] - t["probs"][index])
        flag = "" if diff <= 1e-5 else "  <- should agree"
        bad += bool(flag)
        print(f"{name:22} {label:>8} {o['score']:10.6f} {t['probs'][index]:13.6f} {diff:11.2e}{flag}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
