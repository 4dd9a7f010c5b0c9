"""Time our SparseGPT at the seed's layer shape on a GPU (median of repeats after a warm-up).

    PYTHONPATH=src python3 benchmarks/sparsegpt_gpu.py [--patterns 2:4 ...] [--repeats 3]

Prints one line per pattern and the device ceilings (bf16 GEMM rate, copy bandwidth).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from sparsekit import prune_weight


def synthetic_layer(M: int, K: int, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Heavy-tailed channel scales, low-rank correlation, full rank (fallback if sparsekit.data is absent)."""
    try:
        from sparsekit.data.synthetic import seed_shape_layer

        lay = seed_shape_layer(M=M, K=K, seed=seed, device=device)
        return lay.weight, lay.hessian
    except ImportError:
        g = torch.Generator(device="cpu").manual_seed(seed)
        scale = torch.exp(1.2 * torch.randn(K, generator=g))  # (K,) log-normal channel scales
        F = torch.randn(K, 64, generator=g) / 8  # (K, r) low-rank correlation
        X = torch.randn(2 * K, K, generator=g) + torch.randn(2 * K, 64, generator=g) @ F.T  # (N, K)
        X = (X * scale).to(device)
        H = X.T @ X / X.shape[0]
        W = (torch.randn(M, K, generator=g) * 0.02).to(device)
        return W, H


def ceilings(device: str) -> dict[str, float]:
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    x = torch.empty(2**30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        a @ b
        y.copy_(x)
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(10):
        a @ b
    e1.record()
    torch.cuda.synchronize()
    tflops = 10 * 2 * 8192**3 / (e0.elapsed_time(e1) / 1e3) / 1e12
    e0.record()
    for _ in range(10):
        y.copy_(x)
    e1.record()
    torch.cuda.synchronize()
    tbs = 10 * 2 * 2**30 / (e0.elapsed_time(e1) / 1e3) / 1e12
    return {"bf16_gemm_tflops": tflops, "copy_tb_s": tbs}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2560)
    ap.add_argument("--cols", type=int, default=9728)
    ap.add_argument("--patterns", nargs="+", default=["2:4", "2:4-pairs", "coupled-2:4", "rowpair-16"])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    dev = "cuda"
    W, H = synthetic_layer(args.rows, args.cols, dev)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           **ceilings(dev), "rows": []}
    for pat in args.patterns:
        prune_weight(W, H, pat, "sparsegpt")  # warm-up
        times, loss = [], None
        for _ in range(args.repeats):
            r = prune_weight(W, H, pat, "sparsegpt")
            times.append(r.time_s)
            loss = r.loss
        row = {"pattern": pat, "method": "SparseGPT", "loss": loss, "median_s": statistics.median(times),
               "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
        out["rows"].append(row)
        print(f"{pat:<12} SparseGPT  loss {loss:.4%}  {row['median_s']:.3f} s  peak {row['peak_gib']:.1f} GiB")
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "sparsegpt_gpu.json"), "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
