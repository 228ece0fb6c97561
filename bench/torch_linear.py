"""PyTorch's speed on the products of a ViT layer, to set beside `product_speed` (our kernel's):
best of 5 timed loops of about 2 GFLOP each of `torch.nn.functional.linear` (x·Wᵀ + b), GFLOP/s.

Usage: python3 bench/torch_linear.py [THREADS] [ROWS] [SHAPES] [f32|bf16]
  e.g. python3 bench/torch_linear.py 1 1576 "768,2304;768,3072;3072,768"   (ViT-B/16, batch 8)
  SHAPES: depth and columns of each product (k,n;k,n), as `product_speed`'s SHAPES.
  bf16: x, W and b in bfloat16 (as PyTorch's bf16 inference runs them); default f32.
"""
import sys
import time

import torch

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
rows = int(sys.argv[2]) if len(sys.argv) > 2 else 1576
shapes = [tuple(int(v) for v in s.split(",")) for s in (sys.argv[3] if len(sys.argv) > 3 else "768,2304;768,3072;3072,768").split(";")]
dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[sys.argv[4] if len(sys.argv) > 4 else "f32"]
torch.set_num_threads(threads)
print(f"torch {torch.__version__}, {threads} thread(s), {rows} rows, {dtype}", file=sys.stderr)
for k, n in shapes:
    x, w, b = (torch.randn(*shape).to(dtype) for shape in ((rows, k), (n, k), (n,)))
    reps = max(3, int(2e9 / (rows * n * k)))
    best = float("inf")
    with torch.inference_mode():
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(reps):
                torch.nn.functional.linear(x, w, b)
            best = min(best, (time.perf_counter() - start) / reps)
    print(f"rows {rows:5}  k {k:5}  n {n:5}: {2 * rows * n * k / best / 1e9:6.0f} GFLOP/s")
