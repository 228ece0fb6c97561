#!/usr/bin/env python3
"""Where a training step's GPU time goes: kernel time summed by kernel name, as Markdown tables.

Reads an Nsight Compute CSV (`ncu --metrics gpu__time_duration.sum --csv --page raw`, one row per
launch) and/or a JSON file from `bench/torch_reference.py --profile` ({name: [ns, launches]});
prints, for each file that exists, the launches, the kernel time and the 20 largest names with
their shares. Used by scripts/gpu-check.sh.

Usage: python3 bench/kernel_shares.py NCU.csv TORCH.json
"""
import csv
import json
import os
import sys
from collections import defaultdict


def table(title, times):
    total = sum(t for t, _ in times.values())
    if not total:
        print(f"\n{title}: no kernel times")
        return
    print(f"\n{title}: {sum(n for _, n in times.values())} launches, {total / 1e6:.1f} ms of kernel time\n")
    print("| kernel | launches | ms | share |")
    print("| --- | --- | --- | --- |")
    for name, (t, n) in sorted(times.items(), key=lambda kv: -kv[1][0])[:20]:
        print(f"| `{name[:100]}` | {n} | {t / 1e6:.2f} | {100 * t / total:.1f}% |")


def from_ncu(path):
    rows = csv.DictReader(line for line in open(path) if line.startswith('"'))
    times = defaultdict(lambda: [0.0, 0])
    for row in rows:
        try:
            ns = float(row["gpu__time_duration.sum"].replace(",", ""))
        except (KeyError, ValueError):
            continue  # the units row, or a row without the metric
        name = row.get("Kernel Name", "?").split("(")[0].split("<")[0]
        times[name][0] += ns
        times[name][1] += 1
    return times


def main():
    for path in sys.argv[1:]:
        if not os.path.exists(path) or os.path.getsize(path) == 0:
            continue
        if path.endswith(".csv"):
            table(f"vitforge ({os.path.basename(path)}, ncu)", from_ncu(path))
        else:
            table(f"PyTorch ({os.path.basename(path)}, torch.profiler)", {k: tuple(v) for k, v in json.load(open(path)).items()})


if __name__ == "__main__":
    main()
