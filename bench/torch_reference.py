#!/usr/bin/env python3
"""PyTorch + transformers reference for `vitforge bench`: the same figures, the same JSON shape.

Measures, for a named ViT (tiny/small/base, patch 16, 224x224) or a model folder, at given batch
sizes: inference images/s (no_grad, eval), one full training step (forward, loss, backward,
clip_grad_norm_(1.0), AdamW step) images/s, a head-only step (backbone frozen with
requires_grad=False, so autograd builds no graph through it) images/s, and the process's peak RSS.
Median of --iters timed runs after --warmup untimed ones, with 2 threads by default (the machine
vitforge is compared on). One JSON line per figure:

    {"impl": "pytorch", "config", "batch", "mode", "images_per_s", "peak_rss_mb", "cpu"}

("cpu": the CPU's name, family and model, as `vitforge bench` gives it; null where /proc/cpuinfo
names no model.)

With --device cuda, timings wait for the GPU (torch.cuda.synchronize) and each line also has
"peak_gpu_mb" (torch.cuda.max_memory_allocated); f32 then runs with PyTorch's defaults (TF32 in
products where it allows it), and --precision bf16 measures bf16 weights under inference_mode for
inference and torch.autocast(bfloat16) with f32 master weights for a training step.

Usage: python3 bench/torch_reference.py --config small --batch 8 --mode train --iters 5
       python3 bench/torch_reference.py --device cuda --precision bf16 --config base --batch 64
Needs: torch, transformers (pip install torch transformers).
"""
import argparse
import json
import resource
import statistics
import time

import torch
from transformers import ViTConfig, ViTForImageClassification

PRESETS = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}
LABELS = 10  # as vitforge bench


def build(args):
    if args.model:
        model = ViTForImageClassification.from_pretrained(args.model, num_labels=LABELS, ignore_mismatched_sizes=True)
        return args.model, model
    hidden, heads = PRESETS[args.config]
    cfg = ViTConfig(hidden_size=hidden, num_attention_heads=heads, intermediate_size=4 * hidden, num_hidden_layers=12,
                    image_size=224, patch_size=16, num_labels=LABELS, layer_norm_eps=1e-12,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return args.config, ViTForImageClassification(cfg)


def cpu_description():
    """The CPU's name with its family and model, from /proc/cpuinfo's first processor (None where
    it names no model), as `vitforge bench` gives it."""
    try:
        with open("/proc/cpuinfo") as f:
            first = f.read().split("\n\n")[0]
    except OSError:
        return None
    fields = dict((k.strip(), v.strip()) for k, _, v in (l.partition(":") for l in first.splitlines()) if _)
    if "model name" not in fields:
        return None
    if "cpu family" in fields and "model" in fields:
        return f"{fields['model name']} (family {fields['cpu family']} model {fields['model']})"
    return fields["model name"]


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def write_profile(path, run, cuda):
    """Profiles one call of run: each kernel's (or on a CPU, each op's own) total time and count."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        run()
    shares = {}
    for e in prof.key_averages():
        if cuda:  # named self_cuda_time_total before PyTorch 2.4
            us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        else:
            us = e.self_cpu_time_total
        if us > 0:
            shares[e.key] = [us * 1000.0, e.count]
    with open(path, "w") as f:
        json.dump(shares, f)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="small", choices=sorted(PRESETS))
    ap.add_argument("--model", help="a model folder instead of a named architecture")
    ap.add_argument("--batch", default="8", help="comma-separated batch sizes")
    ap.add_argument("--mode", default="infer,train,head_only", help="comma-separated: infer, train, head_only")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--precision", default="f32", choices=["f32", "bf16"])
    ap.add_argument("--profile", metavar="FILE",
                    help="after timing, profile one more run of each figure with torch.profiler and write "
                         "{kernel name: [ns, launches]} as JSON to FILE (GPU kernels; CPU ops on a CPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    name, model = build(args)
    cfg = model.config
    dev = torch.device(args.device)
    model.to(dev)
    cuda = dev.type == "cuda"
    bf16 = args.precision == "bf16"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for batch in [int(b) for b in args.batch.split(",")]:
        pixels = torch.randn(batch, cfg.num_channels, cfg.image_size, cfg.image_size, device=dev)
        labels = (torch.arange(batch) % LABELS).to(dev)
        for mode in args.mode.split(","):
            if mode == "infer":
                model.eval()
                for p in model.parameters():
                    p.requires_grad_(True)
                infer_model = model.to(torch.bfloat16) if bf16 else model
                infer_pixels = pixels.to(torch.bfloat16) if bf16 else pixels

                def run():
                    with torch.inference_mode():
                        infer_model(pixel_values=infer_pixels).logits
                    sync()
            elif mode in ("train", "head_only"):
                model.float()
                model.train()
                for n, p in model.named_parameters():
                    p.requires_grad_(mode == "train" or n.startswith("classifier."))
                opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)

                def run():
                    opt.zero_grad(set_to_none=True)
                    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                        loss = model(pixel_values=pixels, labels=labels).loss
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
                    opt.step()
                    sync()
            else:
                raise SystemExit(f"unknown mode {mode}")
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            for _ in range(args.warmup):
                run()
            times = []
            for _ in range(max(args.iters, 1)):
                t = time.perf_counter()
                run()
                times.append(time.perf_counter() - t)
            if args.profile:
                write_profile(args.profile, run, cuda)
            median = statistics.median(times)
            line = {"impl": "pytorch", "config": name, "batch": batch, "mode": mode, "precision": args.precision,
                    "device": args.device, "images_per_s": round(batch / median, 2), "peak_rss_mb": round(peak_rss_mb()),
                    "cpu": cpu_description()}
            if cuda:
                line["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
