"""``sparsekit eval MODEL_DIR [--reference DENSE]``: the verdict on a saved model (printing lives here; the
work is :func:`sparsekit.evaluate.evaluate`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sparsekit.data.models import load_model
from sparsekit.errors import InputError
from sparsekit.evaluate import evaluate
from sparsekit.pipeline.report import REPORT_FILE, jsonable

__all__ = ["add_cli"]


def _cmd_eval(args: argparse.Namespace) -> int:
    model_dir = Path(args.model_dir)
    if not model_dir.exists():
        raise InputError(f"no such model directory: {model_dir}.")
    reference = args.reference
    report_path = model_dir / REPORT_FILE
    calib = None
    source = None
    if report_path.exists():
        rep = json.loads(report_path.read_text())
        if reference is None:
            reference = rep.get("extra", {}).get("model_spec")
        c = rep.get("calibration", {})
        if c.get("source"):
            source = c["source"]
            kinds = f" ({', '.join(c['sources'])})" if c.get("sources") else ""
            calib = f"{source!r} text{kinds}, {c.get('num_tokens')} tokens"
    pruned, tokenizer = load_model(str(model_dir))
    dense = None
    if reference and reference != "none":
        dense, _ = load_model(reference)
        print(f"reference (dense): {reference}")
    baselines = {}
    if args.baseline:
        baselines[_baseline_label(Path(args.baseline))] = load_model(args.baseline)[0]
    seq_len = args.seq_len or 512
    sources = args.texts.split(",") if args.texts else None
    verdict = evaluate(pruned, dense, tokenizer, sources=sources, max_tokens=args.tokens, seq_len=seq_len,
                       device=args.device, baselines=baselines, calibration=source or "mixed")
    verdict.calibration = calib
    print(verdict.format())
    if args.json:
        Path(args.json).write_text(json.dumps(jsonable(verdict.to_dict()), indent=2, allow_nan=False))
    return 0


def _baseline_label(path: Path) -> str:
    """The method named in a saved baseline's report (``"sparsegpt"`` gives the gap ratio), else ``"baseline"``."""
    rep = path / REPORT_FILE
    if rep.exists():
        return str(json.loads(rep.read_text()).get("config", {}).get("method") or "baseline")
    return "baseline"


def add_cli(subparsers: Any) -> None:
    """Register ``sparsekit eval``."""
    p = subparsers.add_parser(
        "eval",
        help="verdict on a saved model: perplexity (causal LMs) or embedding cosine similarity (encoders)",
        description="Evaluate a saved (pruned) model against its dense reference on held-out text.",
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a directory written by `sparsekit prune` (or any HF model)")
    p.add_argument("--reference", default=None,
                   help="dense model: minilm | smollm2 | PATH (default: the one named in MODEL_DIR's report; 'none' to skip)")
    p.add_argument("--texts", default=None, help="comma-separated held-out text kinds (default: every available "
                   "kind not in the model's calibration, and the held-out split of those in it)")
    p.add_argument("--baseline", default=None, metavar="DIR", help="another pruned model (e.g. `sparsekit prune "
                   "--method sparsegpt`'s output) shown alongside; a SparseGPT one adds the gap ratio")
    p.add_argument("--tokens", type=int, default=8192, help="held-out tokens per text kind (perplexity)")
    p.add_argument("--seq-len", type=int, default=None, help="perplexity window length (default 512)")
    p.add_argument("--device", default=None, help="cpu | cuda")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the verdict as JSON")
    p.set_defaults(func=_cmd_eval)
