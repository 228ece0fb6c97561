#!/usr/bin/env python3
"""A small closed-loop load generator for POST /predict (standard library only).

`--concurrency` clients each send one image per request, back to back, for `--seconds` (or
`--requests` in total). Prints one JSON line: requests, status counts, throughput, and latency
percentiles of the 200 answers.

Usage: bench/predict_load.py URL IMAGE [--concurrency 16] [--seconds 30] [--requests N]
   e.g. bench/predict_load.py http://127.0.0.1:8080/predict cat.jpg --concurrency 16 --seconds 30
"""
import argparse
import http.client
import json
import mimetypes
import statistics
import threading
import time
import urllib.parse
from collections import Counter

ap = argparse.ArgumentParser()
ap.add_argument("url")
ap.add_argument("image")
ap.add_argument("--concurrency", type=int, default=16)
ap.add_argument("--seconds", type=float, default=30)
ap.add_argument("--requests", type=int, default=0)
ap.add_argument("--api-key", default=None)
a = ap.parse_args()
u = urllib.parse.urlsplit(a.url)
body = open(a.image, "rb").read()
ctype = mimetypes.guess_type(a.image)[0] or "application/octet-stream"
headers = {"content-type": ctype}
if a.api_key:
    headers["authorization"] = f"Bearer {a.api_key}"
lock = threading.Lock()
latencies, statuses = [], Counter()
sent = 0
deadline = time.monotonic() + a.seconds


def take():
    global sent
    with lock:
        if a.requests and sent >= a.requests:
            return False
        if not a.requests and time.monotonic() >= deadline:
            return False
        sent += 1
        return True


def client():
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=120)
    path = u.path + (f"?{u.query}" if u.query else "")
    while take():
        t = time.monotonic()
        try:
            conn.request("POST", path, body=body, headers=headers)
            resp = conn.getresponse()
            resp.read()
            status = resp.status
        except OSError as e:
            status = type(e).__name__
            conn.close()
            conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=120)
        dt = time.monotonic() - t
        with lock:
            statuses[status] += 1
            if status == 200:
                latencies.append(dt)


start = time.monotonic()
threads = [threading.Thread(target=client) for _ in range(a.concurrency)]
for t in threads:
    t.start()
for t in threads:
    t.join()
elapsed = time.monotonic() - start
lat = sorted(latencies)


def pct(p):
    return round(1000 * lat[min(len(lat) - 1, int(p * len(lat)))], 1) if lat else None


print(json.dumps({
    "concurrency": a.concurrency,
    "requests": sum(statuses.values()),
    "statuses": {str(k): v for k, v in statuses.items()},
    "seconds": round(elapsed, 1),
    "ok_per_s": round(len(lat) / elapsed, 2),
    "p50_ms": pct(0.50),
    "p90_ms": pct(0.90),
    "p99_ms": pct(0.99),
    "mean_ms": round(1000 * statistics.mean(lat), 1) if lat else None,
}))
