"""Tiles of True OBS's fused step update (``kernels/obs_update.py``) timed at real step shapes (issue 14).

    PYTHONPATH=src python3 benchmarks/obs_update_tiles.py [--out DIR]

For each step shape (rows ``R`` of a chunk, columns per step ``q``, positions ``n``, ``U``'s columns so far ``t``):
the mean step of the seed layer at ``prune_weight``'s defaults under 24 GiB, of a 4096×14336 layer at ng=16, and
of that layer at q = 256 / 512 (where :data:`~sparsekit.kernels.obs_update.FUSED_MAX_Q` is decided), the torch
reference and every candidate :class:`~sparsekit.kernels.obs_update.Tiles` run with TF32 on (as True OBS runs
them) and are timed (``triton.testing.do_bench``, median); each candidate's largest difference from the reference
is printed. Then the seed layer is pruned with the default tiles and with the fastest ones for its ``q`` (same
process, 2 runs each): the time and whether the masks agree. Needs CUDA and Triton. ``--out DIR``: the JSON
lines also go to ``DIR/obs_update_tiles.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from sparsekit import prune_weight
from sparsekit.data.synthetic import seed_shape_layer
from sparsekit.kernels import obs_update
from sparsekit.kernels.obs_linalg import tf32
from sparsekit.kernels.obs_update import Tiles

DEVICE = "cuda"
LAYER_Q = 128  # columns per step of the seed layer at prune_weight's defaults (ng=64, 2:4)
# (name, R, q, n, t, U width): mean steps of the two layers (BENCHMARKS.md, issue 14)
SHAPES = [("seed ng=64", 184, 128, 7296, 2432, 4880), ("4096x14336 ng=16", 256, 32, 10752, 3584, 7184),
          ("4096x14336 ng=128", 200, 256, 10752, 3584, 7184), ("4096x14336 ng=256", 200, 512, 10752, 3584, 7184)]
_WIDE = [Tiles(128, 128, 32, 4, 2), Tiles(64, 128, 32, 8, 2), Tiles(128, 128, 32, 8, 2), Tiles(64, 128, 32, 4, 3),
         Tiles(256, 128, 32, 8, 2)]  # q > 128: 128-wide N-tiles, Gt's slice re-read from L2 per tile
CANDIDATES = {
    128: [Tiles(64, 128, 32, 8, 2), Tiles(64, 128, 32, 4, 3), Tiles(128, 128, 32, 8, 2), Tiles(128, 128, 32, 8, 3),
          Tiles(128, 128, 16, 8, 3), Tiles(32, 128, 32, 4, 3), Tiles(64, 128, 64, 8, 2), Tiles(128, 64, 32, 4, 3),
          Tiles(256, 128, 32, 8, 2), Tiles(64, 128, 16, 4, 4), Tiles(128, 128, 32, 4, 2)],
    32: [Tiles(128, 32, 32, 4, 3), Tiles(256, 32, 32, 4, 3), Tiles(256, 32, 32, 8, 3), Tiles(128, 32, 16, 4, 4),
         Tiles(64, 32, 32, 4, 3), Tiles(512, 32, 32, 8, 2), Tiles(256, 32, 16, 8, 4)],
    256: _WIDE,
    512: _WIDE,
}


def step_operands(R: int, q: int, n: int, t: int, width: int, seed: int = 0) -> tuple:
    """Random operands of one step on :data:`DEVICE` with the production strides (``U``, ``w``, ``diag``: views of
    ``K`` positions)."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    K = n + t
    Gt = torch.randn(R, q, n, device=DEVICE, generator=g)
    X = torch.randn(R, q, q, device=DEVICE, generator=g).tril_() / q**0.5
    a = torch.randn(R, q, device=DEVICE, generator=g)
    U = torch.zeros(R, K, width, dtype=torch.float16, device=DEVICE)
    w, diag = torch.randn(R, K, device=DEVICE, generator=g), torch.rand(R, K, device=DEVICE, generator=g) + 1
    return Gt, X, a, U[:, :n], w[:, :n], diag[:, :n]


def sweep(name: str, R: int, q: int, n: int, t: int, width: int) -> list[dict]:
    import triton.testing

    Gt, X, a, U, w, diag = step_operands(R, q, n, t, width)
    ref = [w.clone(), diag.clone()]
    obs_update.z_update_reference_(Gt, X, a, ref[0], U, t, ref[1])
    ref.append(U[:, :, t : t + q].clone())  # the new columns (U is shared: each run rewrites them)
    w2, d2 = w.clone(), diag.clone()  # the torch reference's time: what True OBS runs above FUSED_MAX_Q
    ms = triton.testing.do_bench(lambda: obs_update.z_update_reference_(Gt, X, a, w2, U, t, d2), warmup=5, rep=50)
    lines = [{"shape": name, "R": R, "q": q, "n": n, "t": t, "tiles": "torch reference", "ms": ms}]
    print(json.dumps(lines[-1]), flush=True)
    for cfg in CANDIDATES[q]:
        out = [w.clone(), diag.clone()]
        try:
            obs_update.z_update_(Gt, X, a, U, t, out[0], out[1], config=cfg)
        except Exception as e:  # noqa: BLE001 - a tile set that does not compile is reported, not fatal
            lines.append({"shape": name, "tiles": list(cfg.__dict__.values()), "error": repr(e)[:200]})
            continue
        out.append(U[:, :, t : t + q])
        err = max((o.float() - r.float()).abs().max().item() for o, r in zip(out, ref))
        ms = triton.testing.do_bench(lambda: obs_update.z_update_(Gt, X, a, U, t, out[0], out[1], config=cfg),
                                     warmup=5, rep=50)
        lines.append({"shape": name, "R": R, "q": q, "n": n, "t": t, "tiles": list(cfg.__dict__.values()),
                      "ms": ms, "max_abs_diff_vs_reference": err, "default": cfg == obs_update.tiles(q)})
        print(json.dumps(lines[-1]), flush=True)
    return lines


def layer_ab(best: Tiles) -> dict:
    """The seed layer under 24 GiB at ``prune_weight``'s defaults, default tiles vs ``best`` for its ``q``."""
    layer = seed_shape_layer(2560, 9728, tokens=2 * 9728, device="cuda")
    default = obs_update.tiles
    res = {}
    for label, fn in (("default", default), ("best", lambda q: best if q == LAYER_Q else default(q))):
        obs_update.tiles = fn
        prune_weight(layer.weight[:64], layer.hessian, "2:4", "true-obs", max_memory="24GiB")
        times = []
        for _ in range(2):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            r = prune_weight(layer.weight, layer.hessian, "2:4", "true-obs", max_memory="24GiB")
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        res[label] = (statistics.median(times), r)
    obs_update.tiles = default
    (td, rd), (tb, rb) = res["default"], res["best"]
    return {"layer": "seed 2560x9728, 24 GiB", "best_tiles": list(best.__dict__.values()), "default_s": td,
            "best_s": tb, "speedup": td / tb, "mask_agreement": (rd.mask == rb.mask).float().mean().item(),
            "loss_default": rd.loss, "loss_best": rb.loss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    lines = []
    with tf32(True):  # as True OBS runs the kernel on CUDA (TF32 tl.dot)
        for shape in SHAPES:
            lines += sweep(*shape)
    ok = [x for x in lines if "ms" in x and x["q"] == LAYER_Q and x["tiles"] != "torch reference"]
    best = Tiles(*min(ok, key=lambda x: x["ms"])["tiles"])
    lines.append(layer_ab(best))
    print(json.dumps(lines[-1]), flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "obs_update_tiles.jsonl"), "a") as fh:
            fh.writelines(json.dumps(x) + "\n" for x in lines)


if __name__ == "__main__":
    main()
