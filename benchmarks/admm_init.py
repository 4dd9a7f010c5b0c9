"""Does ADMM's result depend on how good its True OBS init is? (BENCHMARKS.md, issue 8)

    python3 benchmarks/admm_init.py [--rows 256] [--tokens 8192]

On real layers (MiniLM FFN-output L1 and L3, SmolLM2 L20 ``down_proj``; first ``--rows`` rows) at 2:4: the loss
of SparseGPT, and of ADMM warm-started from True OBS (largest-first) with ng=16 and with ng=256 and from
SparseGPT (ADMM's default init), with the loss of each init. CPU; times are for ratios only.
"""

from __future__ import annotations

import argparse
import time

from sparsekit import prune_weight
from sparsekit.data.layers import real_layers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=8192)
    args = ap.parse_args()
    layers = real_layers("minilm", layer_filter=r"encoder\.layer\.[13]\.output\.dense$", num_tokens=args.tokens)
    layers += real_layers("smollm2", layer_filter=r"layers\.20\.mlp\.down_proj$", num_tokens=args.tokens)
    print("| layer | SparseGPT | ADMM from True OBS ng=16 (init) | ADMM from True OBS ng=256 (init) "
          "| ADMM from SparseGPT |")
    print("|---|---|---|---|---|")
    for lay in layers:
        W, H = lay.weight[: args.rows], lay.hessian
        base = prune_weight(W, H, "2:4", "sparsegpt").loss
        cells = [lay.name, f"{base:.3%}"]
        for init, opts in (("true-obs", dict(ng=16, order="largest_first", chunk_size=None)),
                           ("true-obs", dict(ng=256, order="largest_first", chunk_size=None)), ("sparsegpt", {})):
            t0 = time.perf_counter()
            r = prune_weight(W, H, "2:4", "admm", init=init, init_options=opts)
            cells.append(f"{r.loss:.3%} ({r.stats['init_loss']:.3%}) {time.perf_counter() - t0:.0f} s")
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
