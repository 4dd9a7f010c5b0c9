"""``sparsekit`` command line: ``prune``, ``eval``, ``export``, ``bench``, ``env``.

One module per subcommand (``cli/prune.py``, ``cli/eval.py``, ``cli/export.py``, ``cli/bench.py``), each with ``add_cli(subparsers)``,
registered in one place (:data:`COMMANDS`); ``env`` is here. Argument parsing, progress bars (tqdm) and printing
happen in this package only: ``sparsekit.pipeline``, ``sparsekit.bench`` and ``sparsekit.evaluate`` are libraries.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import logging
import platform
import sys

#: modules that register subcommands (each defines ``add_cli(subparsers)``), in the order ``--help`` lists them
COMMANDS = ("sparsekit.cli.prune", "sparsekit.cli.eval", "sparsekit.cli.export", "sparsekit.cli.bench")


def _env(args: argparse.Namespace) -> int:
    import torch

    import sparsekit

    print(f"{'sparsekit':<13} {sparsekit.__version__}")
    print(f"{'python':<13} {platform.python_version()} ({sys.executable})")
    print(f"{'torch':<13} {torch.__version__}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"{f'cuda:{i}':<13} {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
    else:
        print(f"{'cuda':<13} not available (CPU only)")
    for dist in ("transformers", "safetensors", "gguf", "tqdm", "matplotlib", "accelerate", "sentencepiece"):
        try:  # the installed distribution's version: no import (transformers/matplotlib load lazily)
            print(f"{dist:<13} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            print(f"{dist:<13} not installed (pip install 'sparsekit[hf]')")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsekit",
        description="Prune LLM weights to hardware sparsity patterns with Optimal Brain Surgeon mathematics.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).add_cli(sub)
    p = sub.add_parser("env", help="print versions and devices")
    p.set_defaults(func=_env)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        argv = ["prune"]  # `sparsekit` alone runs the built-in default job
    args = parser.parse_args(argv)
    args.command_line = "sparsekit " + " ".join(argv)  # recorded in the outputs of `bench --out`
    if args.command is None:
        parser.print_help()
        return 2
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    from sparsekit.errors import SparsekitError

    try:
        return int(args.func(args) or 0)
    except SparsekitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
