#!/usr/bin/env python3
"""The baseline of bench/QUALITY.md: logistic regression on frozen, standardised CLS features.

Features are the final layer-normed CLS token of the base model, computed with PyTorch +
transformers (ViTImageProcessor, eval transforms); scikit-learn fits the probe to convergence.
Prints one JSON line per variant: C = 1 (scikit-learn's default) and C chosen by 5-fold
cross-validation over the grid vitforge uses, both with balanced class weights off and on.

Usage: bench/probe_baseline.py TRAIN_DIR TEST_DIR BASE_MODEL
Needs: pip install torch transformers scikit-learn pillow
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from transformers import ViTImageProcessor, ViTModel

torch.set_num_threads(2)
train_dir, test_dir, model_dir = map(Path, sys.argv[1:4])
processor = ViTImageProcessor.from_pretrained(model_dir)
model = ViTModel.from_pretrained(model_dir, add_pooling_layer=False).eval()


def load(folder):
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    files = [(f, i) for i, c in enumerate(classes) for f in sorted((folder / c).iterdir()) if f.is_file()]
    feats = []
    with torch.no_grad():
        for k in range(0, len(files), 16):
            imgs = [Image.open(f).convert("RGB") for f, _ in files[k : k + 16]]
            out = model(**processor(images=imgs, return_tensors="pt")).last_hidden_state[:, 0]
            feats.append(out.numpy())
    return np.concatenate(feats), np.array([y for _, y in files])


t0 = time.time()
xtr, ytr = load(train_dir)
xte, yte = load(test_dir)
feature_s = time.time() - t0
grid = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0]
for weights in (None, "balanced"):
    variants = {
        "C=1": LogisticRegression(C=1.0, max_iter=10000, class_weight=weights),
        "C by 5-fold CV": LogisticRegressionCV(Cs=grid, cv=StratifiedKFold(5, shuffle=True, random_state=0), max_iter=10000, class_weight=weights),
    }
    for name, clf in variants.items():
        t = time.time()
        pipe = make_pipeline(StandardScaler(), clf).fit(xtr, ytr)
        pred = pipe.predict(xte)
        print(json.dumps({
            "label": f"sklearn probe, {name}, class_weight={weights}",
            "train_images": len(ytr),
            "test_images": len(yte),
            "accuracy": round(accuracy_score(yte, pred), 4),
            "macro_f1": round(f1_score(yte, pred, average="macro"), 4),
            "feature_s": round(feature_s, 1),
            "fit_s": round(time.time() - t, 2),
        }), flush=True)
