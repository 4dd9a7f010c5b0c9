"""``sparsekit bench``: the benchmark tables on real or synthetic layers (progress bars and printing live here;
the work is :func:`sparsekit.bench.run_bench`)."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

import torch

from sparsekit.hessian import DEFAULT_DAMP
from sparsekit.bench import (
    SEED_PATTERNS,
    VARIANTS,
    bench_layers,
    format_summary,
    format_tables,
    run_bench,
    variant_status,
    write_outputs,
)

__all__ = ["add_cli"]


def _layers_for(args: argparse.Namespace, progress: Callable[[int, int], None] | None) -> list[Any]:
    cache = None if args.cache_dir == "none" else (args.cache_dir or "default")
    return bench_layers(args.model, args.layers, args.tokens, args.seq_len, args.text, args.shape, args.seed,
                        args.device, cache, progress)


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.list_methods:
        for v in VARIANTS.values():
            st = variant_status(v)
            print(f"{v.key:<22} {v.label:<32} {v.method} {v.kwargs or ''}  {'ok' if st is None else st}")
        return 0
    from tqdm import tqdm

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.device = str(device)
    bar = tqdm(total=0, desc="calibration windows", file=sys.stderr, disable=args.quiet or not sys.stderr.isatty(), leave=False)

    def calib(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    layers = _layers_for(args, calib)
    bar.close()
    warmup = args.warmup if args.warmup is not None else (1 if device.type == "cuda" else 0)
    bar = tqdm(total=0, desc="bench", file=sys.stderr, disable=args.quiet or not sys.stderr.isatty())

    def prog(done: int, total: int, desc: str) -> None:
        bar.total = total
        bar.set_description(desc[-60:], refresh=False)
        bar.update(done - bar.n)

    rows = run_bench(layers, args.patterns, args.methods, device, args.rows, args.repeats, prog, warmup=warmup,
                     damp=args.damp)
    bar.close()
    print(format_tables(rows, args.format, args.per_layer))
    print()
    print(format_summary(rows, args.format))
    if args.out:
        config = {k: v for k, v in vars(args).items() if k not in ("func", "list_methods", "quiet", "command")}
        config["warmup"] = warmup
        config["layers"] = [{"name": l.name, "M": int(l.weight.shape[0]), "K": int(l.weight.shape[1]),
                             "num_tokens": int(l.num_tokens)} for l in layers]
        files = write_outputs(args.out, rows, config, device, args.format, command=args.command_line)
        print("\nwrote " + ", ".join(str(f) for f in files), file=sys.stderr)
    return 0


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``sparsekit bench``."""
    p = subparsers.add_parser(
        "bench", help="benchmark tables (loss, time, vs SparseGPT per pattern and method) on real or synthetic layers",
        description="Prune layers to each pattern with each method variant and print the tables of the reference "
                    "benchmark (benchmark-results.rst: Qwen3-4B layer 0, 2560x9728, patterns 2:4, coupled 2:4, 4:8 "
                    "and 16-column 8-row coupled; our presets 2:4, coupled-2:4, 2:4-pairs, rowpair-16): Method, "
                    "Norm. Loss, Sparsity, Time, vs SparseGPT, and the summary; --out writes JSON and PNG plots.",
    )
    p.add_argument("--model", default="minilm",
                   help="minilm | smollm2 | synthetic | a Hugging Face folder | a .gguf | a .safetensors of "
                        "<name>.weight/<name>.hessian pairs (default: minilm)")
    p.add_argument("--layers", default=None, help="regex or substring of layer names (default: all linears)")
    p.add_argument("--patterns", nargs="+", default=list(SEED_PATTERNS), help="default: the reference tables' four: 2:4 coupled-2:4 2:4-pairs (their 4:8) rowpair-16 (their 16-column, 8-row coupled)")
    p.add_argument("--methods", nargs="+", default=None,
                   help=f"variant keys or method:opt=value specs (default: all: {' '.join(VARIANTS)})")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--rows", type=int, default=None, help="prune only the first N rows (the reference's 32-row True OBS tables)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per cell; the median is reported")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default: 1 on CUDA, 0 on CPU)")
    p.add_argument("--tokens", type=int, default=None,
                   help="calibration tokens (default 8192; synthetic: the reference layer's 244449)")
    p.add_argument("--seq-len", type=int, default=128, help="calibration window length (default 128)")
    p.add_argument("--text", default="mixed", help="calibration text: stdlib | pydoc | docs | mixed | PATH")
    p.add_argument("--shape", type=int, nargs=2, metavar=("M", "K"), default=None,
                   help="synthetic layer shape (default the reference layer's 2560 9728)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--damp", type=float, default=DEFAULT_DAMP, help=f"relative damping (default {DEFAULT_DAMP})")
    p.add_argument("--cache-dir", default=None, help="Hessian cache folder, or 'none' (default ~/.cache/sparsekit)")
    p.add_argument("--format", choices=("rst", "md", "text"), default="rst", help="table format (default rst)")
    p.add_argument("--per-layer", action="store_true", help="also print one table per layer")
    p.add_argument("--out", default=None, help="folder for bench.json, tables and loss-vs-time PNGs")
    p.add_argument("--list-methods", action="store_true", help="list the method variants and whether they run here")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars (also off when stderr is not a terminal)")
    p.set_defaults(func=_cmd_bench)
    return p
