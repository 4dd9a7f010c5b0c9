"""The GPU performance table of issue 6 at the seed's shape (W 2560×9728, synthetic H), in one run.

    PYTHONPATH=src python3 benchmarks/gpu_table.py [--only KEY ...] [--repeats 3] [--check-rows 128] [--out DIR]
        [--rows N] [--profile KEY ...]

For every row of the table: one warm-up, ``--repeats`` timed runs (median reported, CUDA synchronised, the time of
:func:`sparsekit.prune_weight`), peak GPU memory, and the quality check the issue asks for: the same algorithm on
the first ``--check-rows`` rows in float64 (inputs and every solve), whose loss must be within 0.5% (relative)
of the fast path's loss on the same rows. The layer is :func:`sparsekit.data.synthetic.seed_shape_layer`.
Prints a Markdown table and writes ``gpu_table.json`` to ``--out`` (or ``$OUT``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import torch

from sparsekit import prune_weight
from sparsekit.data.synthetic import seed_shape_layer

#: key -> (pattern, method, options, seed time in s, target in s); None: no published time / no target
TABLE: dict[str, tuple[str, str, dict[str, Any], float | None, float | None]] = {
    # c_dtype=None is float16 U on CUDA (the seed's default); -tf32: float32 U with TF32 GEMMs; -bf16: bfloat16 U
    **{f"true-obs-{name}{suffix}": (pattern, "true-obs", dict(ng=ng, order="largest_first", chunk_size=None, **c),
                                    seed_s, target_s)
       for name, pattern, ng, seed_s, target_s in (("2:4", "2:4", 256, 105, 5), ("coupled", "coupled-2:4", 16, 433, 15),
                                                   ("pairs", "2:4-pairs", 16, 558, 15),
                                                   ("rowpair", "rowpair-16", 16, 215, 10))
       for suffix, c in (("", {}), ("-tf32", dict(c_dtype=torch.float32)), ("-bf16", dict(c_dtype=torch.bfloat16)))},
    "admm-2:4": ("2:4", "admm", dict(init="true-obs", tf32=True, init_options=dict(
        ng=256, order="largest_first", chunk_size=None, c_dtype=torch.bfloat16)), 52, 10),  # "seed": published ALPS
    "admm-2:4+swap": ("2:4", "admm", dict(init="true-obs", tf32=True, refine="swap", init_options=dict(
        ng=256, order="largest_first", chunk_size=None, c_dtype=torch.bfloat16)), 52, 10),
    **{f"admm-{p}": (p, "admm", dict(init="true-obs", tf32=True, init_options=dict(
        ng=16, order="largest_first", chunk_size=None, c_dtype=torch.bfloat16)), None, None)
       for p in ("2:4-pairs", "coupled-2:4", "rowpair-16")},  # no published time, no target: reported only
    "interleaved-64": ("2:4", "obs-interleaved", dict(n_splits=64), 6.0, 1),
    "obs-ord": ("2:4", "obs-ord", dict(ng=256), 14.8, 2),
    "sparsegpt": ("2:4", "sparsegpt", {}, 1.1, 0.5),
}


def _fmt(opts: dict[str, Any]) -> str:
    return ", ".join(f"{k}={str(v).replace('torch.', '')}" for k, v in opts.items())


def run_one(key: str, W: torch.Tensor, H: torch.Tensor, repeats: int, check_rows: int, warmup: int,
            devices: int = 1) -> dict[str, Any]:
    pattern, method, opts, seed_s, target_s = TABLE[key]
    if devices > 1:  # the timed runs split the rows across the GPUs; the float64 check stays on one
        opts = {**opts, "devices": [f"cuda:{i}" for i in range(devices)]}
    for _ in range(warmup):
        prune_weight(W, H, pattern, method, **opts)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times, res = [], None
    for _ in range(repeats):
        res = prune_weight(W, H, pattern, method, **opts)
        times.append(res.time_s)
    peak = torch.cuda.max_memory_allocated() / 2**30
    row = {"key": key, "pattern": pattern, "method": method, "options": _fmt(opts), "loss": res.loss,
           "median_s": statistics.median(times), "times_s": times, "peak_gib": peak, "seed_s": seed_s,
           "target_s": target_s, "stats": {k: v for k, v in res.stats.items() if isinstance(v, (int, float, str))}}
    if check_rows:
        n = check_rows
        fast = prune_weight(W[:n], H, pattern, method, **opts).loss
        o64 = {k: v for k, v in opts.items() if k not in ("c_dtype", "devices")}
        if "init_options" in o64:
            o64["init_options"] = {k: v for k, v in o64["init_options"].items() if k != "c_dtype"}
        ref = prune_weight(W[:n].double(), H.double(), pattern, method, **o64).loss
        row.update(check_rows=n, check_loss=fast, check_loss_fp64=ref, check_rel=fast / ref - 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", choices=list(TABLE), default=list(TABLE))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--check-rows", type=int, default=128, help="rows of the float64 check (0: none)")
    ap.add_argument("--shape", nargs=2, type=int, default=(2560, 9728), metavar=("M", "K"))
    ap.add_argument("--rows", type=int, default=None, help="time only the first ROWS rows (methods too slow for all)")
    ap.add_argument("--devices", type=int, default=1, help="split the rows across this many GPUs (devices=)")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--profile", nargs="*", default=[], choices=list(TABLE), help="also profile one run of these")
    args = ap.parse_args()
    t0 = time.time()
    lay = seed_shape_layer(*args.shape, device="cuda")
    W, H = lay.weight[: args.rows], lay.hessian
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "shape": list(args.shape), "rows": W.shape[0], "repeats": args.repeats, "warmup": args.warmup, "devices": args.devices}
    print(json.dumps(meta), flush=True)
    rows = []
    print("| method | pattern | options | seed | target | ours (median) | peak GiB | loss | fp64 check |", flush=True)
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    for key in args.only:
        try:
            row = run_one(key, W, H, args.repeats, args.check_rows, args.warmup, args.devices)
        except torch.cuda.OutOfMemoryError as e:  # report and go on with the next row
            print(f"| {key} | OOM: {str(e).splitlines()[0]} |", flush=True)
            torch.cuda.empty_cache()
            continue
        rows.append(row)
        chk = f"{row['check_rel']:+.3%} ({row['check_rows']} rows)" if "check_rel" in row else "-"
        seed = "-" if row["seed_s"] is None else f"{row['seed_s']} s"
        target = "-" if row["target_s"] is None else f"≤ {row['target_s']} s"
        print(f"| {row['method']} | {row['pattern']} | {row['options']} | {seed} | {target} "
              f"| {row['median_s']:.2f} s | {row['peak_gib']:.1f} | {row['loss']:.4%} | {chk} |", flush=True)
        if args.out:
            with open(os.path.join(args.out, "gpu_table.json"), "w") as f:
                json.dump({**meta, "rows": rows}, f, indent=1)
    for key in args.profile:
        pattern, method, opts, _, _ = TABLE[key]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            prune_weight(W, H, pattern, method, **opts)
        print(f"profile of {key}:\n" + prof.key_averages().table(sort_by="cuda_time_total", row_limit=15), flush=True)
    print(f"total wall {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
