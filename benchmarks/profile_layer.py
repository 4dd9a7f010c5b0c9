"""Where one layer's time goes: ``prune_weight`` at a model shape, timed and profiled (issue 14).

    PYTHONPATH=src python3 benchmarks/profile_layer.py --shape 14336x4096 --method admm [--opt tf32=True ...]
        [--rows N] [--tokens N] [--profile] [--repeats 1] [--max-memory 24GiB] [--obs-update fused|reference|both]
        [--out DIR]

The layer is synthetic (:func:`sparsekit.data.synthetic.seed_shape_layer` at the given shape: log-normal channel
scales, power-law correlations, ``--tokens`` samples behind ``H``), on CUDA when present. ``--rows`` prunes only
the first rows (True OBS and the other row-separable methods cost the same per row whatever the count, once the
planner's chunk is full). One warm-up on 64 rows, then ``--repeats`` timed runs (median), the peak memory, the
method's stats (ADMM: iterations, refit solver), and with ``--profile`` the top CUDA kernels of one more run and
the torch operators that launched them (with the host time each took).
Options are ``key=value`` with Python literals (``ng=256``, ``order='largest_first'``, ``tf32=True``).

``--obs-update reference`` makes True OBS run its torch reference update instead of the fused Triton kernel
(:mod:`sparsekit.kernels.obs_update`); ``both`` times the two in turn on the same layer (one JSON line each, then
one comparing them: mask agreement, weight difference, loss ratio). ``--out DIR`` also writes the lines to
``DIR/profile_layer.jsonl``.
"""

from __future__ import annotations

import argparse
import ast
import json
import statistics
import os
import time

import torch

from sparsekit import prune_weight
from sparsekit.data.synthetic import seed_shape_layer
from sparsekit.kernels import obs_update

_AVAILABLE = obs_update.available


def _options(pairs: list[str]) -> dict:
    out = {}
    for p in pairs:
        key, _, value = p.partition("=")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="2560x9728", help="MxK")
    ap.add_argument("--method", default="true-obs")
    ap.add_argument("--opt", nargs="*", default=[], help="method options, key=value (Python literals)")
    ap.add_argument("--pattern", default="2:4")
    ap.add_argument("--rows", type=int, default=None, help="prune only the first N rows")
    ap.add_argument("--tokens", type=int, default=None, help="samples behind H (default 2·K)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--max-memory", default=None)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--obs-update", choices=("fused", "reference", "both"), default="fused",
                    help="True OBS's per-step update: the Triton kernel, the torch reference, or both in turn")
    ap.add_argument("--out", default=None, help="also append the JSON lines to DIR/profile_layer.jsonl")
    args = ap.parse_args(argv)
    M, K = (int(v) for v in args.shape.lower().split("x"))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    layer = seed_shape_layer(M, K, tokens=args.tokens or 2 * K, device=dev)
    W = layer.weight if args.rows is None else layer.weight[: args.rows]
    opts = _options(args.opt)
    run = lambda w: prune_weight(w, layer.hessian, args.pattern, args.method, max_memory=args.max_memory, **opts)  # noqa: E731
    lines, results = [], {}
    for variant in ("fused", "reference") if args.obs_update == "both" else (args.obs_update,):
        obs_update.available = _AVAILABLE if variant == "fused" else (lambda t, any_dtype=False: False)
        line, results[variant] = _measure(run, W, args.repeats, dev)
        kernel = variant == "fused" and _AVAILABLE(W)  # the fused kernel can run here (Triton, CUDA)
        lines.append({"shape": [W.shape[0], K], "method": args.method, "options": args.opt, "device": dev,
                      "obs_update": variant, "kernel": kernel, **line})
        print(json.dumps(lines[-1]), flush=True)
        if args.profile:
            acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            with torch.profiler.profile(activities=acts) as prof:
                run(W)
            table = prof.key_averages().table  # kernels by their own time, then the torch ops that launched them
            print(table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=70), flush=True)
            print(table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70), flush=True)
    obs_update.available = _AVAILABLE
    if len(results) == 2:
        f, r = results["fused"], results["reference"]
        lines.append({"compare": "fused vs reference", "speedup": lines[1]["median_s"] / lines[0]["median_s"],
                      "mask_agreement": (f.mask == r.mask).float().mean().item(),
                      "max_abs_weight_diff": (f.weight - r.weight).abs().max().item(),
                      "loss_ratio": f.loss / r.loss})
        print(json.dumps(lines[-1]), flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "profile_layer.jsonl"), "a") as fh:
            fh.writelines(json.dumps(x) + "\n" for x in lines)


def _measure(run, W: torch.Tensor, repeats: int, dev: str) -> tuple[dict, object]:
    """One warm-up on 64 rows, then ``repeats`` timed runs: (times, peak, loss, stats), the last result."""
    run(W[:64])
    times, res = [], None
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = run(W)
        if dev == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else float("nan")
    stats = {k: v for k, v in res.stats.items() if isinstance(v, (int, float, str, bool)) or v is None}
    return {"median_s": statistics.median(times), "times_s": times, "peak_gib": peak, "loss": res.loss,
            "stats": stats}, res


if __name__ == "__main__":
    main()
