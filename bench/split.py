#!/usr/bin/env python3
"""Splits an image folder (`<class>/<image>`) into train and test folders by copying files.

Usage: bench/split.py SRC OUT --train-per-class N --seed S [--test-per-class M] [--train-cap CLASS=K ...]
Writes OUT/train/<class>/... and OUT/test/<class>/... (the rest of each class, or M of the rest). Files are copied,
never linked, so an ingest that refuses links still reads them. --train-cap keeps only K of CLASS's N training
images (an imbalanced training set; the test images are those of the balanced split).
"""
import argparse
import random
import shutil
from pathlib import Path

ap = argparse.ArgumentParser()
ap.add_argument("src", type=Path)
ap.add_argument("out", type=Path)
ap.add_argument("--train-per-class", type=int, required=True)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--test-per-class", type=int, default=None, help="at most this many test images per class")
ap.add_argument("--train-cap", action="append", default=[], metavar="CLASS=K", help="train on only K images of CLASS")
a = ap.parse_args()
caps = {c: int(k) for c, k in (v.split("=", 1) for v in a.train_cap)}
if a.out.exists():
    shutil.rmtree(a.out)
for cls in sorted(p for p in a.src.iterdir() if p.is_dir()):
    files = sorted(f for f in cls.iterdir() if f.is_file())
    random.Random(f"{a.seed}/{cls.name}").shuffle(files)
    if len(files) <= a.train_per_class:
        raise SystemExit(f"class {cls.name} has {len(files)} images, need more than {a.train_per_class}")
    rest = files[a.train_per_class :]
    if a.test_per_class is not None:
        rest = rest[: a.test_per_class]
    train = files[: min(a.train_per_class, caps.get(cls.name, a.train_per_class))]
    for split, part in (("train", train), ("test", rest)):
        dest = a.out / split / cls.name
        dest.mkdir(parents=True, exist_ok=True)
        for f in part:
            shutil.copyfile(f, dest / f.name)
