"""Generalisation of whole-model pruning: perplexity (SmolLM2) and embedding similarity (MiniLM) per held-out
domain, dense vs SparseGPT vs True OBS (the CLI's defaults) vs ADMM, every block linear at 2:4 (issue 16).

    # on a GPU machine (the Debian texts copied beforehand with benchmarks/copy_texts.sh DEST):
    SPARSEKIT_TEXT_ROOT=DEST PYTHONPATH=src python3 benchmarks/generalisation.py --device cuda
    # dense, each method with the fixed damping and with the one chosen on held-out calibration tokens (+reg):
    ... --methods sparsegpt,sparsegpt+reg,true-obs,true-obs+reg,admm,admm+reg --reg-scope model
    # +reg+all: as +reg, then the blocks after the choosing one pruned on every calibration token (held-out too)
    ... --methods sparsegpt,true-obs+reg,true-obs+reg+all,admm+reg,admm+reg+all --reg-scope model
    # on a CPU, a quick check of the whole path (first block only, few tokens):
    PYTHONPATH=src python3 benchmarks/generalisation.py --max-blocks 1 --calib-tokens 512 --eval-tokens 512 \
        --method-options '{"admm": {"iters": 20}}'

Domains: :func:`sparsekit.data.text.heldout_domains` of the calibration source (``mixed``: the held-out split of
each calibration kind, marked ``*``, and every other available kind whole). The summary is
:func:`sparsekit.evaluate.generalisation_summary`: per domain ``(ppl − dense) / (ppl_sparsegpt − dense)`` (for
MiniLM ``(1 − cos) / (1 − cos_sparsegpt)``), lower is better, and its mean. JSON and a log go under ``$OUT``
(default ``out/generalisation``, git-ignored), rewritten after every method so a cut-short run keeps
what it finished; the table is printed last.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import torch

try:  # the public API; the pipeline module is the fallback while the package is being restructured
    from sparsekit import PruneConfig, prune_model_  # type: ignore[attr-defined]
except ImportError:
    from sparsekit.pipeline import PruneConfig, prune_model_
from sparsekit.pipeline import DEFAULT_OPTIONS, SKIP, Rule, find_blocks

from sparsekit.data.text import TEXT_ROOT_ENV, calibration_sources, domain_texts, heldout_domains, load_texts
from sparsekit.data.text import tokenize_for_calibration
from sparsekit.cli.prune import calibration_size
from sparsekit.regularize import DEFAULT_GRID
from sparsekit.evaluate import (
    domain_windows,
    generalisation_summary,
    perplexity_by_domain,
    sentence_embeddings,
    split_sentences,
)

log = logging.getLogger("generalisation")

#: method label -> (method, options); True OBS with the CLI's default options. A label with the suffix ``+reg``
#: (e.g. ``admm+reg``) runs the method with the regularisation chosen on a held-out slice (--reg-grid etc.); with
#: ``+reg+all`` the linears that reuse the choice (--reg-scope model, the blocks after the first) are then pruned
#: on every calibration token, the held-out ones included (``PruneConfig.heldout_calibrates``).
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "sparsegpt": ("sparsegpt", {}),
    "true-obs": ("true-obs", dict(DEFAULT_OPTIONS)),
    "admm": ("admm", {}),
}
REG = "+reg"
ALL = "+reg+all"


def _reg_fields(args: argparse.Namespace, calibrates: bool) -> dict[str, Any]:
    """PruneConfig's held-out regularisation fields of a ``+reg`` (``calibrates``: ``+reg+all``) label."""
    grid = DEFAULT_GRID if args.reg_grid == "default" else [
        (float(d), m or "mean") for d, _, m in (x.partition(":") for x in args.reg_grid.split(","))]
    return dict(reg_grid=grid, reg_shrinks=[float(a) for a in args.reg_shrinks.split(",")],
                reg_scope=args.reg_scope, heldout_fraction=args.heldout_fraction, heldout_calibrates=calibrates)


def _load(name: str, path: str | None) -> tuple[Any, Any]:
    from sparsekit.data.models import load_model

    return load_model(path or name)


def _skip_rules(model: Any, max_blocks: int | None) -> list[Rule]:
    """Leave the blocks from ``max_blocks`` on dense (a quick check of the whole path on a CPU)."""
    path, blocks = find_blocks(model)
    if max_blocks is None or max_blocks >= len(blocks):
        return []
    rest = "|".join(str(i) for i in range(max_blocks, len(blocks)))
    return [Rule(rf"^{re.escape(path)}\.({rest})\.", method=SKIP)]


def _write(out: Path, name: str, result: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{name}.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out / f"{name}.json")


def _table(result: dict[str, Any]) -> str:
    metric = result["metric"]
    methods = list(result["values"])
    lines = [f"{result['model']}: {metric} per held-out domain (* = held-out split of a calibration kind); "
             f"calibration {result['calibration']['source']!r} {result['calibration']['sources']}, "
             f"{result['calibration']['tokens']} tokens; device {result['device']}"]
    head = ["dense"] if metric == "perplexity" else []
    w = max([11] + [len(m) + 2 for m in methods])
    lines.append(f"  {'domain':<11}" + "".join(f"{m:>{w}}" for m in head + methods))
    fmt = f"{{:>{w}.2f}}" if metric == "perplexity" else f"{{:>{w}.4f}}"
    for d in result["domains"]:
        mark = "*" if d["in_calibration"] else " "
        vals = ([result["dense"][d["name"]]] if metric == "perplexity" else []) + [
            result["values"][m][d["name"]] for m in methods]
        lines.append(f" {mark}{d['name']:<11}" + "".join(fmt.format(v) for v in vals))
    s = result.get("summary")
    if s:
        lines.append(f"  {'mean ratio':<11}" + ("" if metric != "perplexity" else f"{'':>{w}}") + "".join(
            f"{s['mean_ratio'][m]:>{w}.3f}" for m in methods) + "   (gap to dense / SparseGPT's; lower is better)")
        lines.append(f"  {'wins':<11}" + ("" if metric != "perplexity" else f"{'':>{w}}") + "".join(
            f"{str(s['wins'][m]) + '/' + str(len(s['domains'])):>{w}}" for m in methods)
            + "   (domains below SparseGPT)")
    return "\n".join(lines)


def run_model(name: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    dense, tok = _load(name, args.smollm2 if name == "smollm2" else args.minilm)
    causal = name == "smollm2" or dense.__class__.__name__.endswith("ForCausalLM")
    default_tokens, default_len = calibration_size(causal, args.device, dense.config.max_position_embeddings)
    seq_len, tokens = args.seq_len or default_len, args.calib_tokens or default_tokens  # the CLI's defaults
    calib = tokenize_for_calibration(tok, load_texts(args.calib, "calib"), tokens, seq_len, seed=0)
    domains = heldout_domains(args.calib)
    texts = domain_texts(domains)
    result: dict[str, Any] = {
        "model": name,
        "metric": "perplexity" if causal else "cosine",
        "device": str(args.device),
        "calibration": {"source": args.calib, "tokens": calib.numel(), "seq_len": seq_len,
                        "sources": calibration_sources() if args.calib == "mixed" else [args.calib]},
        "domains": [vars(d) for d in domains],
        "max_blocks": args.max_blocks,
        "damp": args.damp, "damp_mode": args.damp_mode,
        "values": {}, "prune": {},
    }
    if causal:
        windows = domain_windows(tok, texts, args.eval_tokens, args.eval_seq_len)
        result["eval_tokens"] = {k: w.numel() for k, w in windows.items()}
        t0 = time.perf_counter()
        result["dense"] = perplexity_by_domain(dense, windows, device=args.device)
        log.info("%s dense evaluated in %.1fs", name, time.perf_counter() - t0)
    else:
        sentences = {k: split_sentences(tx, args.eval_sentences) for k, tx in texts.items()}
        result["eval_sentences"] = {k: len(s) for k, s in sentences.items()}
        ref = {k: sentence_embeddings(dense, tok, s, device=args.device) for k, s in sentences.items()}
        result["dense"] = {k: 1.0 for k in sentences}
    rules = _skip_rules(dense, args.max_blocks)
    extra = json.loads(args.method_options) if args.method_options else {}
    for label in args.methods.split(","):
        calibrates = label.endswith(ALL)
        base = label.removesuffix(ALL).removesuffix(REG)
        method, options = METHODS[base]
        config = PruneConfig(pattern=args.pattern, method=method, options={**options, **extra.get(base, {})},
                             rules=rules, damp=args.damp, damp_mode=args.damp_mode, device=args.device,
                             batch_size=args.batch_size,
                             **(_reg_fields(args, calibrates) if calibrates or label.endswith(REG) else {}))
        model = copy.deepcopy(dense)
        t0 = time.perf_counter()
        report = prune_model_(model, config, calib)
        t_prune = time.perf_counter() - t0
        if causal:
            result["values"][label] = perplexity_by_domain(model, windows, device=args.device)
        else:
            result["values"][label] = {
                k: torch.nn.functional.cosine_similarity(
                    sentence_embeddings(model, tok, s, device=args.device), ref[k], dim=-1).mean().item()
                for k, s in sentences.items()}
        losses = [r.loss for r in report.layers if r.loss is not None]
        result["prune"][label] = {"time_s": t_prune, "layers": len(losses),
                                  "mean_layer_loss": sum(losses) / max(1, len(losses)),
                                  "calib_tokens": report.calibration["num_tokens"],
                                  "regularisation": report.extra.get("regularisation")}
        log.info("%s %s: pruned in %.1fs, %s", name, label, t_prune, result["values"][label])
        if "sparsegpt" in result["values"]:
            result["summary"] = generalisation_summary(result["values"], result["dense"])
        _write(out, f"generalisation_{name}", result)
        del model
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="smollm2,minilm", help="comma-separated: smollm2, minilm")
    p.add_argument("--smollm2", default=None, metavar="PATH", help="a local copy of SmolLM2 (HF folder or .gguf)")
    p.add_argument("--minilm", default=None, metavar="PATH", help="a local copy of MiniLM (HF folder)")
    p.add_argument("--methods", default="sparsegpt,true-obs,admm", help=f"comma-separated of {list(METHODS)}, "
                   f"each optionally with {REG!r} (the regularisation chosen on held-out calibration tokens) or "
                   f"{ALL!r} (then, with --reg-scope model, the later blocks calibrated on the held-out tokens too)")
    p.add_argument("--reg-grid", default="default", help="for +reg: 'default' (regularize.DEFAULT_GRID) or DAMP:MODE,...")
    p.add_argument("--reg-shrinks", default="0", help="for +reg: update shrinks, comma-separated")
    p.add_argument("--reg-scope", default="layer", choices=("layer", "model"))
    p.add_argument("--heldout-fraction", type=float, default=0.125)
    p.add_argument("--method-options", default=None, help='JSON {label: {option: value}}, e.g. \'{"admm": {"iters": 20}}\'')
    p.add_argument("--pattern", default="2:4")
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--damp-mode", default="mean")
    p.add_argument("--calib", default="mixed", help="calibration source (sparsekit.data.text.load_texts)")
    p.add_argument("--calib-tokens", type=int, default=None,
                   help="default: 128 x 2048 on CUDA; 16384 (SmolLM2) / 8192 (MiniLM) on a CPU")
    p.add_argument("--seq-len", type=int, default=None, help="calibration sequence length (default 2048 CUDA / "
                   "512 CPU for SmolLM2, 128 for MiniLM)")
    p.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens per domain (perplexity)")
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--eval-sentences", type=int, default=256, help="held-out sentences per domain (MiniLM)")
    p.add_argument("--max-blocks", type=int, default=None, help="prune only the first N blocks (a quick check)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--text-root", default=None, help=f"folder of the copied Debian texts (sets ${TEXT_ROOT_ENV})")
    args = p.parse_args()
    if args.text_root:
        os.environ[TEXT_ROOT_ENV] = args.text_root
    out = Path(os.environ.get("OUT") or "out/generalisation")
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        handlers=[logging.StreamHandler(), logging.FileHandler(out / "generalisation.log")])
    torch.manual_seed(0)
    tables = []
    for name in args.models.split(","):
        tables.append(_table(run_model(name, args, out)))
    text = "\n\n".join(tables)
    (out / "generalisation_table.txt").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
