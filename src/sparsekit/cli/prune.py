"""``sparsekit prune``: load a model, calibrate, prune, save, print the verdict (progress bars and printing
live here; the work is :func:`sparsekit.pipeline.prune_model_`)."""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from sparsekit.hessian import DEFAULT_DAMP
from sparsekit.data.models import MODELS, lazy_loadable, load_model, load_model_lazy
from sparsekit.errors import InputError
from sparsekit.pipeline import distributed
from sparsekit.patterns import get_pattern
from sparsekit.pipeline import (
    CHECKPOINT_SUBDIR,
    DEFAULT_METHOD,
    DEFAULT_OPTIONS,
    DEFAULT_PATTERN,
    PROGRESS_FILE,
    REPORT_FILE,
    Progress,
    PruneConfig,
    Rule,
    pattern_name,
    prune_model_,
    save_pruned,
)
from sparsekit.pipeline.checkpoint import check_writable
from sparsekit.pipeline.lazy import fix_mmap_threshold

__all__ = ["add_cli", "config_from_args", "parse_options"]

def _parse_value(v: str) -> Any:
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def parse_options(items: Sequence[str]) -> dict[str, Any]:
    """``["k=v", ...]`` → dict with ints, floats, booleans and ``none`` parsed."""
    out: dict[str, Any] = {}
    for it in items:
        k, sep, v = it.partition("=")
        if not sep or not k:
            raise InputError(f"option {it!r} must look like key=value (e.g. blocksize=128).")
        out[k.strip()] = _parse_value(v.strip())
    return out


def _pattern_tag(pattern: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", pattern.replace(":", "of").replace("%", "pct"))


def _model_tag(spec: str) -> str:
    return spec if spec in MODELS else (Path(spec).name or "model")


def _is_causal(model: nn.Module) -> bool:
    from sparsekit.evaluate import is_causal_lm

    return is_causal_lm(model)


def _progress_bars(desc: str) -> tuple[Callable[[Progress], None], Callable[[], None]]:
    """A ``progress_fn`` drawing two tqdm bars (``desc``: blocks, layers of the current block), and a closer.
    Quiet when stderr is not a terminal (log files get no carriage returns or escape codes)."""
    from tqdm.auto import tqdm

    bars: dict[str, Any] = {}
    quiet = not sys.stderr.isatty()

    def fn(ev: Progress) -> None:
        if ev.event == "start":
            bars["blocks"] = tqdm(total=ev.num_blocks, initial=ev.block, desc=desc, unit="block", position=0,
                                  disable=quiet)
        elif ev.event == "block_start":
            if "layers" in bars:
                bars["layers"].close()
            bars["layers"] = tqdm(total=ev.num_layers, desc=f"block {ev.block}", unit="layer", position=1, leave=False,
                                  disable=quiet)
        elif ev.event == "layer_start" and "layers" in bars:
            bars["layers"].set_postfix_str(ev.layer.rsplit(".", 2)[-2:][-1] if ev.layer else "")
        elif ev.event == "layer_done" and "layers" in bars:
            bars["layers"].update(1)
        elif ev.event == "block_done" and "blocks" in bars:
            bars["blocks"].update(1)

    def close() -> None:
        for b in bars.values():
            b.close()

    return fn, close


def config_from_args(args: argparse.Namespace) -> PruneConfig:
    """The :class:`PruneConfig` of ``sparsekit prune``'s arguments (no ``--method``: the default method with
    :data:`DEFAULT_OPTIONS`, which ``--option`` overrides)."""
    opts = parse_options(args.option)
    if args.method is None:
        opts = {**DEFAULT_OPTIONS, **opts}
    return PruneConfig(
        pattern=args.pattern,
        method=args.method or DEFAULT_METHOD,
        options={k: v for k, v in opts.items() if k not in ("damp", "damp_mode")},
        rules=[Rule.parse(r) for r in args.rule],
        skip_incompatible=args.skip_incompatible,
        damp=_float_option(opts, "damp", DEFAULT_DAMP),
        damp_mode=str(opts.get("damp_mode", "mean")),
        sequential=args.sequential,
        device=args.device,
        batch_size=args.batch_size,
        offload_activations=args.offload,
        prune_devices=args.prune_devices,
        max_blocks=args.max_blocks,
        row_parts=args.row_parts,
        max_memory=args.max_memory,
        **_regularisation_config(args),
    )


def _float_option(opts: dict[str, Any], key: str, default: float) -> float:
    v = opts.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InputError(f"--option {key}={v} is not a number; give e.g. --option {key}={default}.")
    return float(v)


def _positive(value: int | None, flag: str) -> None:
    if value is not None and value < 1:
        raise InputError(f"{flag} must be >= 1, got {value} (leave it out for the default).")


def _regularisation_config(args: argparse.Namespace) -> dict[str, Any]:
    """The ``reg_*`` / ``heldout_fraction`` fields of :class:`PruneConfig` from ``--reg-grid`` and its flags."""
    from sparsekit.regularize import DEFAULT_GRID

    spec = args.reg_grid.strip().lower()
    if spec in ("", "none", "off"):
        if args.heldout_calibrates:
            raise InputError("--heldout-calibrates needs a --reg-grid (every token calibrates without one); drop it.")
        return {}
    if spec == "default":
        grid: list[tuple[float, str]] = list(DEFAULT_GRID)
    else:
        grid = []
        for item in spec.split(","):
            damp, _, mode = item.strip().partition(":")
            try:
                grid.append((float(damp), mode or "mean"))
            except ValueError:
                raise InputError(f"--reg-grid item {item!r} must look like DAMP[:MODE] (e.g. 0.01:mean,0.1:diag).") from None
    try:
        shrinks = [float(a) for a in args.reg_shrinks.split(",")]
    except ValueError:
        raise InputError(f"--reg-shrinks {args.reg_shrinks!r} must be comma-separated numbers in [0, 1].") from None
    return dict(reg_grid=grid, reg_shrinks=shrinks, reg_scope=args.reg_scope, heldout_fraction=args.heldout_fraction,
                heldout_calibrates=args.heldout_calibrates)


def calibration_size(causal: bool, device: str | None, max_positions: int | None) -> tuple[int, int]:
    """Default ``(tokens, seq_len)``: SparseGPT's 128 x 2048 on CUDA (sequences no longer than the model takes);
    on a CPU what fits a few minutes: 32 x 512 for a causal LM, 512 x 128 for an encoder (8x the 64 x 128 of
    before: every method then does better on text the calibration never saw, the exact ones most;
    benchmarks/GENERALISATION_issue16.md)."""
    if device is not None and str(device).startswith("cuda"):
        seq_len = min(2048, max_positions or 2048) if causal else min(128, max_positions or 128)
        return 128 * 2048, seq_len
    return (16384, 512) if causal else (65536, 128)


def _cmd_prune(args: argparse.Namespace) -> int:
    import shutil

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    _positive(args.tokens, "--tokens")
    _positive(args.seq_len, "--seq-len")
    rank_device = distributed.init_from_env(args.device)  # under torchrun: this rank's device
    if rank_device is not None:
        args.device = rank_device
    lead = distributed.is_lead()  # rank 0 prints, saves and evaluates
    config = config_from_args(args)
    get_pattern(config.pattern)  # fail fast on a bad pattern
    out = Path(args.out or Path("sparsekit-out") / f"{_model_tag(args.model)}-{_pattern_tag(args.pattern)}")
    ckpt_dir = out / CHECKPOINT_SUBDIR
    finished = (out / REPORT_FILE).exists() or any(out.glob("*.safetensors"))
    if finished and not args.overwrite:
        raise InputError(f"{out} already holds a pruned model; pass --overwrite to replace it, or choose another --out.")
    if (ckpt_dir / PROGRESS_FILE).exists() and not args.resume:
        raise InputError(f"{ckpt_dir} holds an unfinished job; pass --resume to continue it, or delete it to restart.")
    check_writable(ckpt_dir, "--out")  # before any work

    # low memory: the blocks stay in the safetensors shards until pruned (default under torchrun where it can)
    low = args.low_memory if args.low_memory is not None else rank_device is not None and lazy_loadable(args.model)
    if low:
        fix_mmap_threshold()  # this process is ours: every large temporary goes back to the system when freed
    model, tokenizer = load_model_lazy(args.model, ckpt_dir) if low else load_model(args.model)
    from sparsekit.data.text import load_texts, tokenize_for_calibration

    from sparsekit.data.text import calibration_sources

    causal = _is_causal(model)
    default_tokens, default_len = calibration_size(
        causal, args.device, getattr(getattr(model, "config", None), "max_position_embeddings", None))
    tokens = args.tokens if args.tokens is not None else default_tokens
    seq_len = args.seq_len if args.seq_len is not None else default_len
    texts = load_texts(args.calib, split="calib")
    calib = tokenize_for_calibration(tokenizer, texts, tokens, seq_len, seed=args.seed)
    sources = list(calibration_sources()) if args.calib == "mixed" else [args.calib]
    held = f", {config.heldout_fraction:g} of it held out to choose the regularisation" if config.reg_grid else ""
    if lead:
        print(f"model {args.model} ({type(model).__name__}); calibration: {args.calib!r} text ({', '.join(sources)}), "
              f"{calib.shape[0]} x {calib.shape[1]} = {calib.numel()} tokens{held}; {config.method} at "
              f"{pattern_name(config.pattern)}" + ("; low memory: one block at a time from the shards" if low else ""))

    progress, close = _progress_bars("blocks") if lead else (None, lambda: None)
    try:
        report = prune_model_(model, config, calib, progress, checkpoint_dir=ckpt_dir, resume=args.resume)
    finally:
        close()
    if not distributed.leave():
        return 0  # the other ranks are done: rank 0 saves and evaluates alone
    report.calibration.update(source=args.calib, sources=sources, seed=args.seed)
    report.extra["model_spec"] = args.model if args.model in MODELS else str(Path(args.model).resolve())
    save_pruned(model, out, report, tokenizer)
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # the saved model supersedes the checkpoints
    print(report.format_table())
    if "regularisation" in report.extra:
        reg = report.extra["regularisation"]
        print(f"regularisation chosen on {reg['heldout_tokens']} held-out tokens ({reg['scope']} scope): "
              + ", ".join(f"{k} x{v}" for k, v in reg["chosen"].items()))
    print(f"saved to {out} (report: {out / REPORT_FILE})")

    if not args.no_eval:
        from sparsekit.evaluate import evaluate

        if low:  # the verdict runs the whole pruned model: read it back from the saved folder
            model, _ = load_model(str(out))
        dense, _ = load_model(args.model)
        baselines: dict[str, nn.Module] = {}
        auto = "sparsegpt" if config.method != "sparsegpt" else "magnitude"
        baseline = args.baseline if args.baseline != "auto" else (None if causal else auto)
        t_eval = time.perf_counter()
        if baseline and baseline != "none" and baseline != config.method:
            bmodel, _ = load_model(args.model)
            # the baseline only needs to be comparable, not sequentially exact: one dense pass per block
            bcfg = dataclasses.replace(config, method=baseline, options={}, rules=(), sequential="block", reg_grid=(),
                                       heldout_calibrates=False)
            print(f"pruning the {baseline} baseline for the verdict (one dense pass per block)")
            bprogress, bclose = _progress_bars(f"{baseline} baseline")
            try:
                breport = prune_model_(bmodel, bcfg, calib, bprogress)
            finally:
                bclose()
            print(f"{baseline} baseline: mean loss {breport.mean_loss:.1%} over {len(breport.pruned)} linears "
                  f"({config.method}: {report.mean_loss:.1%})")
            baselines[baseline] = bmodel
        verdict = evaluate(
            model, dense, tokenizer, baselines=baselines, device=args.device,
            max_tokens=args.eval_tokens or _eval_tokens(args.device), seq_len=min(seq_len, 512),
            max_sentences=256 if _on_cuda(args.device) else 128, calibration=args.calib,
        )
        verdict.calibration = f"{args.calib!r} text ({', '.join(sources)}), {report.calibration['num_tokens']} tokens"
        print(verdict.format(pruned_label=config.method))
        print(f"verdict took {time.perf_counter() - t_eval:.1f}s" + (f" (with the {baseline} baseline)" if baselines else ""))
        report.extra["verdict"] = verdict.to_dict()
        report.to_json(out / REPORT_FILE)
    print(f"total wall time {time.perf_counter() - t0:.1f}s")
    return 0


def _on_cuda(device: str | None) -> bool:
    return device is not None and str(device).startswith("cuda")


def _eval_tokens(device: str | None) -> int:
    """Held-out tokens per kind of text for the verdict: 8192 on CUDA, 2048 on a CPU (a dozen kinds of text)."""
    return 8192 if _on_cuda(device) else 2048


def add_cli(subparsers: Any) -> None:
    """Register ``sparsekit prune``."""
    p = subparsers.add_parser(
        "prune",
        help="prune a Hugging Face model to a sparsity pattern (default: built-in MiniLM at 2:4)",
        description="Prune every linear of a model's blocks with sequential calibration, save it, print the verdict.",
    )
    p.add_argument("--model", default="minilm", help="minilm | smollm2 | PATH to a Hugging Face model (default: minilm)")
    p.add_argument("--pattern", default=DEFAULT_PATTERN, help="default pattern: 2:4, N:M, 2:4-pairs, coupled-2:4, rowpair-16, P%%")
    p.add_argument("--method", default=None, help=f"default method (default: {DEFAULT_METHOD} with "
                   + " ".join(f"{k}={v}" for k, v in DEFAULT_OPTIONS.items()) + ")")
    p.add_argument("--option", action="append", default=[], metavar="K=V", help="method option (repeatable); damp=, damp_mode= apply to all")
    p.add_argument("--rule", action="append", default=[], metavar="REGEX=METHOD:PATTERN",
                   help="per-layer rule by module-name regex, first match wins (repeatable); METHOD 'skip' leaves it dense")
    p.add_argument("--calib", default="mixed", help="calibration text: mixed | stdlib | PATH (file or folder) (default: mixed)")
    p.add_argument("--tokens", type=int, default=None, help="calibration tokens (default: 128 x 2048 on CUDA; on a CPU "
                   "65536 encoders, 16384 causal LMs)")
    p.add_argument("--seq-len", type=int, default=None, help="calibration sequence length (default: 128 encoders; causal "
                   "LMs 2048 on CUDA, 512 on a CPU)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration sequences per forward pass")
    p.add_argument("--sequential", choices=("layer", "block"), default="layer",
                   help="layer: recompute each stage's inputs after pruning earlier stages (default); block: one dense pass per block")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N: where each block is calibrated and pruned")
    p.add_argument("--offload", action="store_true", help="keep calibration activations on the CPU between blocks")
    p.add_argument("--low-memory", action=argparse.BooleanOptionalAction, default=None,
                   help="read each block from the model's safetensors shards only when it is pruned and free it after "
                        "(host memory: the embeddings, the LM head and about one block), write the output one file "
                        "per block (default: on under torchrun for a folder of safetensors, else off); the verdict "
                        "still loads the dense and pruned models whole: --no-eval for a model larger than memory")
    p.add_argument("--prune-devices", nargs="+", default=None, metavar="DEV",
                   help="one process: split each layer's rows across these devices for pruning, one thread each "
                        "(e.g. cuda:0 cuda:1); every method. Several GPUs or machines: torchrun instead")
    p.add_argument("--row-parts", type=int, default=8, help="under torchrun with 2+ ranks: row parts of each "
                   "row-separable linear, spread over the ranks (fixed, so that every such world size cuts them "
                   "alike; ADMM, OBS-ord and held-out choices take one part per rank; one rank prunes every "
                   "linear whole, as one process does)")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="memory budget of the run on --device, e.g. 24GiB or 500MB (default: what the device can "
                        "give); every layer's chunks are planned from it")
    p.add_argument("--out", default=None, help="output directory (default: ./sparsekit-out/MODEL-PATTERN)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted job from its last finished block")
    p.add_argument("--overwrite", action="store_true", help="replace a pruned model already in --out (else an error)")
    p.add_argument("--skip-incompatible", action="store_true", help="leave dense the layers the pattern does not tile")
    p.add_argument("--no-eval", action="store_true", help="skip the verdict (dense vs pruned on held-out text)")
    p.add_argument("--baseline", default="auto", help="also prune with this method for comparison in the verdict "
                   "(auto: SparseGPT for encoders (magnitude if the method is SparseGPT), none for causal LMs; 'none' to disable)")
    p.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens per text kind for perplexity "
                   "(default: 8192 on CUDA, 2048 on a CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration sampling")
    p.add_argument("--max-blocks", type=int, default=None, metavar="N",
                   help="prune only the first N blocks (the rest stay dense): a quick trial of a long job")
    p.add_argument("--reg-grid", default="default", metavar="SPEC",
                   help="choose each layer's damping on held-out calibration tokens: 'default' (sparsekit.regularize."
                        "DEFAULT_GRID; measured better than a fixed damping on every held-out kind of text, "
                        "benchmarks/GENERALISATION_issue16.md), DAMP:MODE,... (e.g. 0.01:mean,0.1:diag), or 'none' "
                        "(the --option damp= for every layer, all tokens calibrate) (default: default)")
    p.add_argument("--reg-shrinks", default="0", metavar="A,...", help="update shrinks tried with every grid point "
                   "(0: the method's update; e.g. 0,0.25,0.5)")
    p.add_argument("--reg-scope", choices=("layer", "model"), default="model",
                   help="model: choose in the first block, reuse by name (default); layer: choose for every linear "
                        "(6x the pruning time with the default grid)")
    p.add_argument("--heldout-fraction", type=float, default=0.125,
                   help="share of the calibration sequences held out to choose the regularisation (with --reg-grid)")
    p.add_argument("--heldout-calibrates", action=argparse.BooleanOptionalAction, default=False,
                   help="with --reg-scope model: prune the linears after the choosing block on every calibration "
                        "token, held-out ones included, at the chosen regularisation (default: off)")
    p.set_defaults(func=_cmd_prune)
