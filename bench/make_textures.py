#!/usr/bin/env python3
"""A second, very different task for bench/quality_matrix.sh: five classes of synthetic textures
(stripes, checkerboard, dots, rings, smooth noise) with random colours, scales, angles and phases,
as an image folder `<class>/<n>.png` of 224×224 images.

Usage: bench/make_textures.py OUT --per-class N [--seed S]
"""
import argparse
import math
import random
from pathlib import Path

import numpy as np
from PIL import Image

ap = argparse.ArgumentParser()
ap.add_argument("out", type=Path)
ap.add_argument("--per-class", type=int, default=60)
ap.add_argument("--seed", type=int, default=0)
a = ap.parse_args()
S = 224
yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)


def colours(rng):
    c1 = np.array([rng.random() for _ in range(3)], dtype=np.float32)
    c2 = np.array([rng.random() for _ in range(3)], dtype=np.float32)
    return c1, c2


def render(kind, rng):
    period = rng.uniform(10, 40)
    angle = rng.uniform(0, math.pi)
    phase = rng.uniform(0, 2 * math.pi)
    u = xx * math.cos(angle) + yy * math.sin(angle)
    v = -xx * math.sin(angle) + yy * math.cos(angle)
    if kind == "stripes":
        m = 0.5 + 0.5 * np.sin(2 * math.pi * u / period + phase)
    elif kind == "checkerboard":
        m = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    elif kind == "dots":
        cu = (u / period) % 1 - 0.5
        cv = (v / period) % 1 - 0.5
        m = (np.sqrt(cu**2 + cv**2) < rng.uniform(0.15, 0.35)).astype(np.float32)
    elif kind == "rings":
        cx, cy = rng.uniform(0, S), rng.uniform(0, S)
        m = 0.5 + 0.5 * np.sin(2 * math.pi * np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) / period + phase)
    else:  # smooth noise: a random low-resolution grid upsampled
        g = rng.randint(3, 10)
        small = np.array([[rng.random() for _ in range(g)] for _ in range(g)], dtype=np.float32)
        m = np.asarray(Image.fromarray((small * 255).astype(np.uint8)).resize((S, S), Image.BICUBIC), dtype=np.float32) / 255
    c1, c2 = colours(rng)
    img = m[..., None] * c1 + (1 - m[..., None]) * c2
    img += np.array([rng.gauss(0, 0.08) for _ in range(S * S * 3)], dtype=np.float32).reshape(S, S, 3)
    return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))


rng = random.Random(a.seed)
for kind in ["stripes", "checkerboard", "dots", "rings", "noise"]:
    d = a.out / kind
    d.mkdir(parents=True, exist_ok=True)
    for i in range(a.per_class):
        render(kind, rng).save(d / f"{i}.png")
