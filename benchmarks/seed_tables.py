"""Reproduce every table of ``seeds/benchmark-results.rst`` (same sections, methods, row subsets) on one source.

    python benchmarks/seed_tables.py --model synthetic --device cuda --out results/seed-h100      # GPU, seed shape
    python benchmarks/seed_tables.py --model minilm --layers 'layer.1.output.dense' --quick      # CPU, real layer

A thin driver over :mod:`sparsekit.bench`: each section is one ``run_bench`` call; tables print in the seed's
RST format (``--format md`` for BENCHMARKS.md); ``--out`` writes one folder per section (bench.json, tables,
loss-vs-time PNGs) and ``summary.<fmt>``. ``--quick`` leaves out True OBS and OBS-ord (minutes per layer on CPU).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from sparsekit import bench as B

LF = "order=largest_first"
#: (title, pattern, rows or None for all, variant specs) — the seed's sections in its order
SECTIONS = [
    ("1. 2:4 Structured Sparsity", "2:4", None,
     ["obs-local", "obs-full", "obs-interleaved=8", "obs-interleaved=16", "obs-interleaved=64", "sparsegpt",
      "obs-ord", "true-obs-l2r", "true-obs"]),
    ("2:4, True OBS (first 32 rows only)", "2:4", 32,
     ["obs-full", "obs-interleaved=64", "sparsegpt", f"true-obs:ng=256,{LF}", f"true-obs:ng=1,{LF}"]),
    ("2. Coupled 2:4 Sparsity", "coupled-2:4", None,
     ["obs-local", "obs-full", "obs-interleaved=16", "obs-interleaved=64", "sparsegpt", f"true-obs:ng=16,{LF}",
      f"true-obs:ng=64,{LF}"]),
    ("3. 4:8 Structured Sparsity (2:4 of pairs)", "2:4-pairs", None,
     ["obs-local", "obs-full", "obs-interleaved=16", "obs-interleaved=64", "sparsegpt", f"true-obs:ng=256,{LF}",
      f"true-obs:ng=64,{LF}", f"true-obs:ng=16,{LF}"]),
    ("4:8, True OBS (first 32 rows only)", "2:4-pairs", 32,
     ["sparsegpt", f"true-obs:ng=2,{LF}", f"true-obs:ng=16,{LF}"]),
    ("4. 16-Column Block, 8-Row Coupled Sparsity", "rowpair-16", None,
     ["magnitude", "obs-full", "sparsegpt", f"true-obs:ng=16,{LF}"]),
]
SLOW = ("true-obs", "obs-ord")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="synthetic", help="synthetic | minilm | smollm2 | PATH (default synthetic)")
    ap.add_argument("--layers", default=None, help="layer-name regex (real models)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--shape", type=int, nargs=2, default=None, metavar=("M", "K"))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="leave out True OBS and OBS-ord")
    ap.add_argument("--sections", type=int, nargs="+", default=None, help="section numbers (1-based) to run")
    ap.add_argument("--format", choices=("rst", "md", "text"), default="rst")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    layers = B.bench_layers(args.model, args.layers, args.tokens, shape=args.shape, device=device)
    warmup = 1 if device.type == "cuda" else 0
    full_rows = []
    for i, (title, pattern, rows, specs) in enumerate(SECTIONS, 1):
        if args.sections and i not in args.sections:
            continue
        specs = [s for s in specs if not (args.quick and s.startswith(SLOW))]
        print(f"[{i}/{len(SECTIONS)}] {title}", file=sys.stderr, flush=True)
        res = B.run_bench(layers, [pattern], specs, device, rows, args.repeats, warmup=warmup)
        print(B.heading(title, args.format, "-" if rows is None else "^"))
        print()
        print(B.format_tables(res, args.format))
        print()
        if rows is None:
            full_rows += res
        if args.out:
            B.write_outputs(Path(args.out) / f"section{i}", res, {**vars(args), "section": title}, device,
                            args.format, command=" ".join(["python", *sys.argv]))
    if full_rows:
        summary = B.format_summary(full_rows, args.format)
        print(summary)
        if args.out:
            (Path(args.out) / f"summary.{ {'rst': 'rst', 'md': 'md', 'text': 'txt'}[args.format] }").write_text(
                summary + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
