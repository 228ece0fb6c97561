"""PyTorch's speed on the products of a ViT layer, to set beside `product_speed` (our kernel's):
best of 5 timed loops of about 2 GFLOP each of `torch.nn.functional.linear` (x·Wᵀ + b), GFLOP/s.

Usage: python3 bench/torch_linear.py [THREADS] [ROWS] [SHAPES]
  e.g. python3 bench/torch_linear.py 1 1576 "768,2304;768,3072;3072,768"   (ViT-B/16, batch 8)
  SHAPES: depth and columns of each product (k,n;k,n), as `product_speed`'s SHAPES.
"""
import sys
import time

import torch

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
rows = int(sys.argv[2]) if len(sys.argv) > 2 else 1576
shapes = [tuple(int(v) for v in s.split(",")) for s in (sys.argv[3] if len(sys.argv) > 3 else "768,2304;768,3072;3072,768").split(";")]
torch.set_num_threads(threads)
print(f"torch {torch.__version__}, {threads} thread(s), {rows} rows", file=sys.stderr)
for k, n in shapes:
    x, w, b = torch.randn(rows, k), torch.randn(n, k), torch.randn(n)
    reps = max(3, int(2e9 / (rows * n * k)))
    best = float("inf")
    with torch.inference_mode():
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(reps):
                torch.nn.functional.linear(x, w, b)
            best = min(best, (time.perf_counter() - start) / reps)
    print(f"rows {rows:5}  k {k:5}  n {n:5}: {2 * rows * n * k / best / 1e9:6.0f} GFLOP/s")
