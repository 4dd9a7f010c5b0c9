"""Real layers on the GPU: the CUDA fast paths of True OBS and ADMM against the same algorithm in float64.

    python3 benchmarks/real_layers_gpu.py --save .cache/real_layers.safetensors   # where the model packages are
    PYTHONPATH=src python3 benchmarks/real_layers_gpu.py .cache/real_layers.safetensors [--patterns 2:4 ...]

``--save`` writes MiniLM FFN-output L1 and L3 and SmolLM2 ``down_proj`` L20 and L28 (the layer with an input
channel whose ``H_jj`` is 1446× the mean), H from 8192 tokens of the ``mixed`` text, to one safetensors file
(≈ 50 MB, small enough to carry to a GPU machine that lacks the model packages). The check prints, per layer and
pattern, the float64 loss and the relative difference of every fast path's loss to it (DESIGN.md §5: within
0.5%), with the time of each fast path.
"""

from __future__ import annotations

import argparse
import time

import torch

from sparsekit import prune_weight

#: name -> (method, options); c_dtype None is float16 U on CUDA
VARIANTS = {
    "true-obs fp16 (default)": ("true-obs", dict(ng=16, order="largest_first", chunk_size=None)),
    "true-obs bf16": ("true-obs", dict(ng=16, order="largest_first", chunk_size=None, c_dtype=torch.bfloat16)),
    "true-obs TF32": ("true-obs", dict(ng=16, order="largest_first", chunk_size=None, c_dtype=torch.float32)),
    "admm TF32 (init true-obs fp16)": ("admm", dict(init="true-obs", tf32=True, init_options=dict(
        ng=16, order="largest_first", chunk_size=None))),
}


def save(path: str) -> None:
    from sparsekit.data.layers import real_layers, save_layers

    layers = real_layers("minilm", layer_filter=r"encoder\.layer\.[13]\.output\.dense$", num_tokens=8192)
    layers += real_layers("smollm2", layer_filter=r"layers\.(20|28)\.mlp\.down_proj$", num_tokens=8192)
    save_layers(layers, path)
    print(f"wrote {len(layers)} layers to {path}")


def check(path: str, patterns: list[str]) -> None:
    from sparsekit.data.layers import load_layers

    layers = load_layers(path)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print("| layer | pattern | variant | float64 loss | fast loss | rel. diff | time |")
    print("|---|---|---|---|---|---|---|")
    for lay in layers:
        W, H = lay.weight.cuda(), lay.hessian.cuda()
        for pattern in patterns:
            for name, (method, opts) in VARIANTS.items():
                o64 = {k: v for k, v in opts.items() if k not in ("c_dtype", "tf32")}
                ref = prune_weight(W.double(), H.double(), pattern, method, **o64)
                prune_weight(W, H, pattern, method, **opts)  # warm-up
                res = prune_weight(W, H, pattern, method, **opts)
                print(f"| {lay.name} | {pattern} | {name} | {ref.loss:.4%} | {res.loss:.4%} "
                      f"| {res.loss / ref.loss - 1:+.3%} | {res.time_s:.2f} s |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path", help="the layers file (written with --save)")
    ap.add_argument("--save", action="store_true", help="write the layers file instead of checking")
    ap.add_argument("--patterns", nargs="+", default=["2:4", "rowpair-16"])
    args = ap.parse_args()
    save(args.path) if args.save else check(args.path, args.patterns)


if __name__ == "__main__":
    main()
