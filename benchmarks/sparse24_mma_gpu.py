"""The mma.sp decode kernel (``sparsekit.kernels.sparse24_mma``) vs cuBLAS dense and the Triton kernels, bf16.

    PYTHONPATH=src python benchmarks/sparse24_mma_gpu.py [--rounds 9] [--shapes 4096x4096,...] [--tokens 1,4,16]

For every Llama-3-8B shape (out × in) and token count: random weight made 2:4, cuBLAS ``F.linear`` on the
dense-with-zeros weight, the Triton kernel of ``sparse24.DECODE_TABLE`` (the previous best), and the mma kernel
at every tile ``(kw, mw)`` that fits (warps splitting K, 16-row tiles per block). Each is timed as a decoding
model runs it (``sparse24.GraphTimer``: back to back in a CUDA graph, each call reading another copy of the
weight, together ≥ 4× the L2), the variants in alternating rounds (median µs; the per-round ratio's range shows
the noise). Every variant is first checked against float64 (error ≤ 2× that of dense bf16). Bytes moved =
weight (+ positions) + x + y; roofline = bytes / measured copy bandwidth (read + write of 1 GiB). Writes
``$OUT/sparse24_mma_gpu.{json,log}``; a table last, with the time of the tile ``default_tile`` picks.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sparsekit.compact import pack_24
from sparsekit.kernels import sparse24
from sparsekit.kernels.sparse24_mma import KW_CHOICES, MW_CHOICES, default_tile, fits, mma_layout, sparse24_mma

sys.path.insert(0, str(Path(__file__).parent))
from sparse24_gpu import copy_bandwidth, random_24  # noqa: E402

LOG: list[str] = []


def say(msg: str) -> None:
    print(msg, flush=True)
    LOG.append(msg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4096x4096,14336x4096,4096x14336,1024x4096")
    ap.add_argument("--tokens", default="1,4,16")
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    props = torch.cuda.get_device_properties(0)
    bw = copy_bandwidth()
    say(f"device {props.name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}, copy {bw / 1e12:.2f} TB/s")
    l2 = getattr(props, "L2_cache_size", 60 * 2**20)
    rows = []
    for shape in args.shapes.split(","):
        M, K = map(int, shape.split("x"))
        W = random_24(M, K)
        values, meta = pack_24(W)
        fv, fm = mma_layout(values, meta)
        n_copies = max(2, -(-4 * l2 // (values.nbytes + meta.nbytes)))
        Ws = [W] + [W.clone() for _ in range(-(-4 * l2 // W.nbytes))]
        packs = [(values, meta)] + [(values.clone(), meta.clone()) for _ in range(n_copies - 1)]
        frags = [(fv, fm)] + [(fv.clone(), fm.clone()) for _ in range(n_copies - 1)]
        for n in map(int, args.tokens.split(",")):
            x = torch.randn(n, K, device="cuda", dtype=torch.bfloat16)
            ref = x.double() @ W.double().T
            dense_err = (F.linear(x, W).double() - ref).abs().max().item()
            cfg = sparse24.default_config(M, K, n)
            variants = {"dense": lambda i: F.linear(x, Ws[i % len(Ws)]),
                        "triton": lambda i: sparse24.launch(x, *packs[i % len(packs)], None, cfg)}
            for kw in KW_CHOICES:
                for mw in MW_CHOICES:
                    if fits(M, K, n, kw, mw):
                        variants[f"mma {kw},{mw}"] = lambda i, t=(kw, mw): sparse24_mma(x, *frags[i % len(frags)],
                                                                                         None, tile=t)
            errs = {}
            for name, fn in list(variants.items()):
                if name == "dense":
                    continue
                try:
                    errs[name] = (fn(0).double() - ref).abs().max().item()
                except Exception as e:  # noqa: BLE001 - report and drop the variant
                    say(f"{M}x{K} n={n} {name}: failed: {str(e)[:300]}")
                    del variants[name]
                    continue
                if errs[name] > 2 * dense_err + 1e-6:
                    say(f"{M}x{K} n={n} {name}: WRONG err {errs[name]:.3g} vs dense {dense_err:.3g}")
                    del variants[name]
            calls = max(32, len(Ws), len(frags))
            timers = {name: sparse24.GraphTimer(fn, calls) for name, fn in variants.items()}
            times = {name: [] for name in timers}
            names = list(timers)
            for r in range(args.rounds):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    times[name].append(timers[name].once())
            med = {name: statistics.median(t) for name, t in times.items()}
            dense_bytes = W.nbytes + x.nbytes + n * M * 2
            sparse_bytes = values.nbytes + meta.nbytes + x.nbytes + n * M * 2
            mma_names = [k for k in med if k.startswith("mma")]
            best = min(mma_names, key=med.get) if mma_names else None
            default = "mma {},{}".format(*default_tile(M, K, n))
            row = {"M": M, "K": K, "n": n, "us": med, "default_tile": default, "rounds": times, "err": errs, "dense_err": dense_err,
                   "triton_config": cfg.__dict__, "best_mma": best,
                   "roofline": {k: (dense_bytes if k == "dense" else sparse_bytes) / (v * 1e-6) / bw
                                for k, v in med.items()}}
            if best:
                ratios = [d / s for d, s in zip(times["dense"], times[best])]
                row["speedup_range"] = [min(ratios), max(ratios)]
            rows.append(row)
            say(f"{M}x{K} n={n}: " + ", ".join(f"{k} {v:.1f}" for k, v in med.items()))
            del timers
        Ws = packs = frags = None  # free the copies before the next shape
        torch.cuda.empty_cache()
    res = {"device": props.name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
           "copy_bw": bw, "rows": rows}
    (out / "sparse24_mma_gpu.json").write_text(json.dumps(res, indent=1))
    say("\n| shape (out×in) | tokens | dense µs | triton µs | mma µs (best kw,mw) | mma vs dense | range "
        "| mma vs triton | roofline dense | roofline mma | default tile: µs |")
    say("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        b = r["best_mma"]
        if not b:
            continue
        u = r["us"]
        tri = u.get("triton", float("nan"))
        dt = r["default_tile"]
        say(f"| {r['M']}×{r['K']} | {r['n']} | {u['dense']:.1f} | {tri:.1f} | {u[b]:.1f} ({b[4:]}) | "
            f"**{u['dense'] / u[b]:.2f}×** | {r['speedup_range'][0]:.2f}–{r['speedup_range'][1]:.2f} | "
            f"{tri / u[b]:.2f}× | {100 * r['roofline']['dense']:.0f}% | {100 * r['roofline'][b]:.0f}% | "
            f"{dt[4:]}: {u.get(dt, float('nan')):.1f} |")
    (out / "sparse24_mma_gpu.log").write_text("\n".join(LOG) + "\n")


if __name__ == "__main__":
    main()
