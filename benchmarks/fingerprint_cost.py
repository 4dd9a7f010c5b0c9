"""Cost of the resume fingerprint (issue 15): SHA-256 of every weight tensor, streamed, on a thread pool.

    PYTHONPATH=src python3 benchmarks/fingerprint_cost.py [--gib 1.5] [--dtype bfloat16] [--job-minutes 3]

Builds a model of random ``4096 x 8192`` linears holding ``--gib`` GiB of weights, times
:func:`sparsekit.pipeline.fingerprint.weight_digests` on one thread and on every core, and extrapolates to an
8B model in bfloat16 (Llama-3-8B: 8.03e9 parameters, 16.1 GB) against a job of ``--job-minutes`` (default 3: the
FLOP floor of an 8B job at True OBS ng=256 on one H200, benchmarks/FLOORS_issue14.md; SparseGPT's calibration
passes take about as long). Writes ``fingerprint_cost.json`` to ``$OUT`` (default
``benchmarks/results/fingerprint_cost``) and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from torch import nn

from sparsekit.pipeline.fingerprint import weight_digests

BYTES_8B = 8.03e9 * 2  # Llama-3-8B in bfloat16


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=1.5)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--job-minutes", type=float, default=3.0)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    per = 4096 * 8192 * torch.finfo(dtype).bits // 8
    n = max(1, round(args.gib * 2**30 / per))
    model = nn.Sequential(*[nn.Linear(8192, 4096, bias=False, dtype=dtype) for _ in range(n)])
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    rows = []
    for workers in sorted({1, os.cpu_count() or 1}):
        weight_digests(model, workers)  # warm the pages
        t = time.perf_counter()
        weight_digests(model, workers)
        s = time.perf_counter() - t
        rate = total / s
        t8b = BYTES_8B / rate
        rows.append({"workers": workers, "bytes": total, "seconds": s, "GB_per_s": rate / 1e9, "8B_seconds": t8b,
                     "share_of_job": t8b / (args.job_minutes * 60)})
    out = Path(os.environ.get("OUT") or "benchmarks/results/fingerprint_cost")
    out.mkdir(parents=True, exist_ok=True)
    (out / "fingerprint_cost.json").write_text(json.dumps({"cpu_count": os.cpu_count(), "rows": rows}, indent=1))
    print(f"| threads | weights | time | GB/s | 8B bf16 (16.1 GB) | share of a {args.job_minutes:g}-min job |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['bytes'] / 1e9:.2f} GB | {r['seconds']:.2f} s | {r['GB_per_s']:.2f} | "
              f"{r['8B_seconds']:.1f} s | {r['share_of_job']:.2%} |")


if __name__ == "__main__":
    main()
