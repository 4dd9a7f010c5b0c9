"""``sparsekit export SRC --out OUT [--format compact]``: a pruned ``save_pretrained`` folder -> a compact 2:4
checkpoint (printing lives here; the work is :func:`sparsekit.compact.export_compact`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sparsekit.errors import InputError

__all__ = ["add_cli"]

FORMATS = ("compact",)


def _cmd_export(args: argparse.Namespace) -> int:
    from sparsekit.compact import export_compact

    src, out = Path(args.src), Path(args.out)
    if not (src / "config.json").is_file():
        raise InputError(f"{src} is not a save_pretrained folder (no config.json); give the folder `sparsekit prune` wrote.")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise InputError(f"{out} exists and is not empty; choose another --out or pass --overwrite.")
    report = export_compact(src, out)
    n, ratio = report["compact_modules"], report["ratio"]
    print(f"{n} linears stored as 2:4 values + 2-bit positions: {report['compact_bytes'] / 2**20:.1f} MiB "
          f"({ratio:.1%} of their dense {report['dense_bytes'] / 2**20:.1f} MiB); "
          f"weights file {report['weights_file_bytes'] / 2**20:.1f} MiB (source {report['src_weights_bytes'] / 2**20:.1f} MiB)")
    print(f"saved to {out}; load with sparsekit.load_compact({str(out)!r}) or `sparsekit eval {out}`")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def add_cli(subparsers: Any) -> None:
    """Register ``sparsekit export``."""
    p = subparsers.add_parser(
        "export",
        help="write a pruned model as a compact 2:4 checkpoint (kept values + 2-bit positions, ~56%% of dense)",
        description="Store every exactly-2:4 linear of a save_pretrained folder as its kept values (M x K/2) and "
                    "packed 2-bit positions (safetensors + a versioned sparsekit_compact.json); everything else is "
                    "unchanged. Load it with sparsekit.load_compact(DIR) (linears become Sparse24Linear).",
    )
    p.add_argument("src", metavar="SRC", help="a folder written by `sparsekit prune` (or any save_pretrained folder)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", choices=FORMATS, default="compact", help="storage format (default: compact)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the size report as JSON")
    p.set_defaults(func=_cmd_export)
