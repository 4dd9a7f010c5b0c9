"""Whole-model pruning at real model shapes under memory budgets (issue 14), through ``prune_model_``.

    PYTHONPATH=src python3 benchmarks/model_scale.py [--quick] [--shapes qwen3-4b,llama3-8b,llama3-70b-block,seed-layer]
        [--methods sparsegpt,true-obs-16,true-obs-256,admm] [--budgets 24,48,80,0] [--blocks 2]
        [--samples 128] [--seq-len 2048] [--max-seconds 300] [--model-device cuda|cpu] [--out DIR] [--tiny]

Each case (shape × method × budget) runs in a fresh subprocess so a memory cap never leaks into the next one:
the child caps itself with ``torch.cuda.set_per_process_memory_fraction(budget / total)`` (budget ``0``: the whole
GPU), builds a Hugging Face model of the shape from its config (``Qwen3Config`` / ``LlamaConfig``, random bf16
weights, ``--blocks`` blocks, a small vocabulary; nothing is downloaded), draws ``--samples × --seq-len`` random
calibration tokens and runs :func:`sparsekit.prune_model_` at pattern 2:4. It times every block (the pipeline's
``block_start``/``block_done`` events), splits each block's time into the time inside ``prune_weight`` (the
layers' reported times) and outside it (calibration passes, Hessian accumulation), extrapolates the whole
model from the blocks after the first (the first if there is only one), and records the peak CUDA memory
(``max_memory_allocated`` / ``max_memory_reserved``). A case that runs past ``--max-seconds`` is killed and
recorded as ``timeout`` with the blocks it finished; a failure is recorded with its error type and message.
The pseudo-shape ``seed-layer`` times ``prune_weight`` alone on the seed's layer (``seed_shape_layer``, 2560 ×
9728) after a warm-up, e.g. with ``--methods true-obs-default`` (``prune_weight``'s defaults) under the budgets.

The budget reaches the pipeline twice: as ``PruneConfig.max_memory`` (the planner's budget, passed to every
``prune_weight`` call) and as the process's memory fraction (the hard cap the allocator enforces). Each case
records its time per block inside ``prune_weight`` and outside it, the peaks, the planner's chunk per layer
(``chunk_size``; ADMM: ``refit_chunk_size``), the OOM retries and the pipeline's memory plan
(``memory_plan``: estimate, budget, whether the activations were offloaded). ``--quick`` runs the preset
:data:`QUICK` (≈ 9 min on one H200, each case with its own time limit).

Writes ``model_scale.json`` (and one ``case_*.json`` per case) to ``--out`` (default ``$OUT``, else
``benchmarks/results/model_scale``) and prints a Markdown table last. ``--tiny`` runs small configs on the CPU
(a smoke test of the whole harness).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from typing import Any

#: shape name -> (config class, hidden size, ffn size, attention heads, kv heads, head dim, blocks of the model)
SHAPES: dict[str, tuple[str, int, int, int, int, int, int]] = {
    "qwen3-4b": ("Qwen3Config", 2560, 9728, 32, 8, 128, 36),
    "llama3-8b": ("LlamaConfig", 4096, 14336, 32, 8, 128, 32),
    "llama3-70b-block": ("LlamaConfig", 8192, 28672, 64, 8, 128, 80),
}
TINY_SHAPES: dict[str, tuple[str, int, int, int, int, int, int]] = {
    "qwen3-tiny": ("Qwen3Config", 64, 192, 4, 2, 16, 36),
    "llama-tiny": ("LlamaConfig", 64, 224, 4, 2, 16, 32),
}
#: method key -> (method, options): True OBS at the CLI's default (ng=16) and the seed's headline ng=256
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "true-obs-default": ("true-obs", {}),  # prune_weight's defaults (ng=64, left to right, planner-chosen chunks)
    "sparsegpt": ("sparsegpt", {}),
    "true-obs-16": ("true-obs", {"ng": 16, "order": "largest_first"}),
    "true-obs-256": ("true-obs", {"ng": 256, "order": "largest_first"}),
    "admm": ("admm", {}),
    "admm-tf32": ("admm", {"tf32": True}),
}
#: the seed's layer (``seed_shape_layer``: W 2560 × 9728, synthetic H), pruned by ``prune_weight`` alone
SEED_LAYER = "seed-layer"
#: ``--quick``: (shape, method, budget GiB (0: whole GPU), blocks, seconds before the case is killed); ≤ 540 s
QUICK: list[tuple[str, str, float, int, float]] = [
    ("llama3-8b", "sparsegpt", 0, 2, 35),
    ("llama3-8b", "true-obs-256", 0, 2, 60),
    ("llama3-8b", "admm", 0, 2, 60),
    ("llama3-8b", "sparsegpt", 24, 2, 35),
    ("llama3-8b", "true-obs-256", 24, 2, 65),
    ("llama3-8b", "admm", 24, 2, 65),
    ("llama3-8b", "true-obs-16", 0, 1, 75),
    ("qwen3-4b", "sparsegpt", 24, 2, 25),
    ("qwen3-4b", "true-obs-16", 24, 2, 35),
    ("qwen3-4b", "true-obs-256", 24, 2, 30),
    ("qwen3-4b", "admm", 24, 2, 30),
    (SEED_LAYER, "true-obs-default", 24, 1, 20),
]
VOCAB = 1024
GIB = 2**30


def _import_api() -> tuple[Any, Any]:
    try:
        from sparsekit import PruneConfig, prune_model_  # type: ignore[attr-defined]
    except ImportError:
        from sparsekit.pipeline import PruneConfig, prune_model_
    return PruneConfig, prune_model_


def build_model(shape: tuple[str, int, int, int, int, int, int], blocks: int, device: str) -> Any:
    """A causal LM of ``shape`` with ``blocks`` blocks, random weights in bfloat16 on ``device``."""
    import torch
    import transformers

    cls_name, d, ffn, heads, kv, head_dim, _ = shape
    cfg = getattr(transformers, cls_name)(
        hidden_size=d, intermediate_size=ffn, num_hidden_layers=blocks, num_attention_heads=heads,
        num_key_value_heads=kv, head_dim=head_dim, vocab_size=VOCAB, max_position_embeddings=8192,
        tie_word_embeddings=False,
    )
    model_cls = getattr(transformers, cls_name.replace("Config", "ForCausalLM"))
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = model_cls(cfg)
    finally:
        torch.set_default_dtype(prev)
    return model.eval()


def _max_memory(case: dict[str, Any]) -> str | None:
    """The case's budget as ``max_memory`` (``None``: the whole device); the memory fraction stays the hard cap."""
    return f"{case['budget_gib']:g}GiB" if case["budget_gib"] else None


def run_case(case: dict[str, Any], path: str) -> None:
    """The child: run one case, rewriting ``path`` (JSON) after every block so a killed case keeps its blocks."""
    import torch

    PruneConfig, prune_model_ = _import_api()
    cuda = case["device"] == "cuda"
    rec: dict[str, Any] = dict(case, status="running", blocks=[], peak_allocated_gib=None, peak_reserved_gib=None)

    def save() -> None:
        if cuda:
            rec["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
            rec["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
        rec["max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
        with open(path + ".tmp", "w") as f:
            json.dump(rec, f, indent=1)
        os.replace(path + ".tmp", path)

    if cuda and case["budget_gib"]:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, case["budget_gib"] * GIB / total), 0)
        rec["memory_fraction"] = case["budget_gib"] * GIB / total
    if case["shape"] == SEED_LAYER:
        run_layer_case(case, rec, save)
        return
    t0 = time.perf_counter()
    shape = (TINY_SHAPES if case["tiny"] else SHAPES)[case["shape"]]
    model = build_model(shape, case["num_blocks"], case["model_device"])
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(0, VOCAB, (case["samples"], case["seq_len"]), generator=g)
    rec["build_s"] = time.perf_counter() - t0
    method, options = METHODS[case["method"]]
    config = PruneConfig(pattern="2:4", method=method, options=options, device=case["device"],
                         max_memory=_max_memory(case))
    cur: dict[str, Any] = {}

    def progress(ev: Any) -> None:
        now = time.perf_counter()
        if ev.event == "block_start":
            cur.clear()
            cur.update(t=now, inside=0.0, layers=[])
        elif ev.event == "layer_done" and ev.report is not None:
            cur["inside"] += ev.report.time_s
            st = ev.report.stats or {}
            cur["layers"].append({"name": ev.report.name, "shape": list(ev.report.shape), "time_s": ev.report.time_s,
                                  "loss": ev.report.loss, "chunk_size": st.get("chunk_size"),
                                  "refit_chunk_size": st.get("refit_chunk_size"),
                                  "admm_iters": st.get("admm_iters"), "refit_solver": st.get("refit_solver"),
                                  "oom_retries": st.get("oom_retries", 0) + st.get("refit_oom_retries", 0)})
        elif ev.event == "block_done":
            total_s = now - cur["t"]
            rec["blocks"].append({"block": ev.block, "time_s": total_s, "inside_prune_weight_s": cur["inside"],
                                  "outside_s": total_s - cur["inside"], "layers": cur["layers"]})
            save()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t1 = time.perf_counter()
    try:
        report = prune_model_(model, config, calib, progress)
        rec["status"] = "ok"
        rec["memory_plan"] = report.extra.get("memory")
    except Exception as exc:  # recorded, not raised: the table shows what failed and why
        rec["status"] = type(exc).__name__
        rec["error"] = str(exc).splitlines()[0][:400] if str(exc) else ""
        rec["traceback"] = traceback.format_exc()[-4000:]
    rec["run_s"] = time.perf_counter() - t1
    save()


def run_layer_case(case: dict[str, Any], rec: dict[str, Any], save: Any) -> None:
    """The seed layer through ``prune_weight`` (one warm-up on 64 rows, then the timed run of every row)."""
    import torch

    from sparsekit import prune_weight
    from sparsekit.data.synthetic import seed_shape_layer

    layer = seed_shape_layer(*((64, 256) if case["tiny"] else ()), device=case["device"])
    method, options = METHODS[case["method"]]
    cuda = case["device"] == "cuda"
    try:
        mem = _max_memory(case)
        prune_weight(layer.weight[:64], layer.hessian, "2:4", method, max_memory=mem, **options)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        res = prune_weight(layer.weight, layer.hessian, "2:4", method, max_memory=mem, **options)
        rec["status"] = "ok"
        rec["blocks"] = [{"block": 0, "time_s": res.time_s, "inside_prune_weight_s": res.time_s, "outside_s": 0.0,
                          "layers": [{"name": "seed", "shape": list(layer.weight.shape), "time_s": res.time_s,
                                      "loss": res.loss, "chunk_size": res.stats.get("chunk_size"),
                                      "oom_retries": res.stats.get("oom_retries", 0)}]}]
    except Exception as exc:  # recorded, not raised
        rec["status"] = type(exc).__name__
        rec["error"] = str(exc).splitlines()[0][:400] if str(exc) else ""
        rec["traceback"] = traceback.format_exc()[-4000:]
    save()


def summarise(rec: dict[str, Any], model_blocks: int) -> dict[str, Any]:
    """Per-block time (the blocks after the first, or the first), inside/outside split, whole-model estimate."""
    blocks = rec.get("blocks", [])
    timed = blocks[1:] or blocks
    if not timed:
        return {"per_block_s": None, "inside_s": None, "outside_s": None, "model_min": None}
    n = len(timed)
    per = sum(b["time_s"] for b in timed) / n
    inside = sum(b["inside_prune_weight_s"] for b in timed) / n
    return {"per_block_s": per, "inside_s": inside, "outside_s": per - inside, "model_min": per * model_blocks / 60}


def _cell(rec: dict[str, Any]) -> str:
    s = rec["summary"]
    peak = rec.get("peak_allocated_gib")
    peak_txt = f", {peak:.1f} GiB peak" if peak is not None else ""
    if s["per_block_s"] is None:
        return f"**{rec['status']}**{peak_txt}"
    if rec["shape"] == SEED_LAYER:
        lay = rec["blocks"][0]["layers"][0]
        return f"{s['per_block_s']:.2f} s{peak_txt}, chunk {lay['chunk_size']}, loss {lay['loss']:.4f}"
    txt = (f"{s['per_block_s']:.1f} s/block ({s['inside_s']:.1f} in prune_weight){peak_txt}, "
           f"model ≈ {s['model_min']:.1f} min")
    return txt if rec["status"] == "ok" else f"**{rec['status']}** after {len(rec['blocks'])} block(s): {txt}"


def _detail_row(rec: dict[str, Any]) -> str:
    """One case: status, time split, peaks, the planner's chunk per layer, OOM retries."""
    s = rec["summary"]
    fmt = lambda v, f="{:.1f}": "—" if v is None else f.format(v)  # noqa: E731
    layers = rec["blocks"][0]["layers"] if rec.get("blocks") else []
    chunks = " ".join(
        f"{lay['name'].rsplit('.', 1)[-1]}:" + ("" if lay.get("chunk_size") is not None else "refit ")
        + str(lay["chunk_size"] if lay.get("chunk_size") is not None else lay["refit_chunk_size"])
        for lay in layers if lay.get("chunk_size") is not None or lay.get("refit_chunk_size") is not None) or "—"
    retries = sum(lay.get("oom_retries") or 0 for b in rec.get("blocks", []) for lay in b["layers"])
    budget = "whole GPU" if not rec["budget_gib"] else f"{rec['budget_gib']:g} GiB"
    peak = f"{fmt(rec.get('peak_allocated_gib'))} / {fmt(rec.get('peak_reserved_gib'))}"
    status = rec["status"] + (f" ({rec['error'][:80]})" if rec.get("error") else "")
    return (f"| {rec['shape']} | {budget} | {rec['method']} | {status} | {fmt(s['per_block_s'], '{:.2f}')} | "
            f"{fmt(s['inside_s'], '{:.2f}')} | {fmt(s['outside_s'], '{:.2f}')} | {peak} | {chunks} | {retries} | "
            f"{rec.get('wall_s', 0):.0f} |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=None,
                    help=f"comma-separated: {', '.join(SHAPES)}, {SEED_LAYER} (prune_weight alone, the seed layer)")
    ap.add_argument("--methods", default="sparsegpt,true-obs-16,true-obs-256,admm",
                    help="comma-separated: " + ", ".join(METHODS))
    ap.add_argument("--budgets", default="24,48,80,0", help="GiB per process, comma-separated; 0 = whole GPU")
    ap.add_argument("--blocks", type=int, default=2, help="blocks built and timed (>= 2 to extrapolate)")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--max-seconds", type=float, default=300, help="per case; then killed, recorded as timeout")
    ap.add_argument("--model-device", default=None, help="where the model lives (default: the pruning device)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--tiny", action="store_true", help="small configs on the CPU (smoke test)")
    ap.add_argument("--quick", action="store_true",
                    help="the preset of QUICK (≈ 9 min on one H200; each case has its own time limit); ignores "
                         "--shapes/--methods/--budgets/--blocks/--max-seconds")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)  # child mode: JSON case
    ap.add_argument("--case-out", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.case is not None:
        run_case(json.loads(a.case), a.case_out)
        return

    import torch

    out = a.out or os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results", "model_scale")
    os.makedirs(out, exist_ok=True)
    shapes_tab = dict(TINY_SHAPES if a.tiny else SHAPES)
    shapes = (a.shapes or ",".join(shapes_tab)).split(",")
    shapes_tab[SEED_LAYER] = ("", 0, 0, 0, 0, 0, 1)
    methods = a.methods.split(",")
    for name, known in ((shapes, shapes_tab), (methods, METHODS)):
        bad = [x for x in name if x not in known]
        if bad:
            ap.error(f"unknown {bad}; use {', '.join(known)}")
    device = "cpu" if a.tiny or not torch.cuda.is_available() else "cuda"
    budgets = [0.0] if device == "cpu" else [float(b) for b in a.budgets.split(",")]
    samples, seq_len = (4, 32) if a.tiny and a.samples == 128 and a.seq_len == 2048 else (a.samples, a.seq_len)
    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "samples": samples, "seq_len": seq_len, "blocks": a.blocks,
    }
    env = dict(os.environ)
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    if a.quick:
        plan = QUICK
        if device != "cuda":  # no budgets on the CPU; --tiny: the small shapes
            small = {"llama3-8b": "llama-tiny", "qwen3-4b": "qwen3-tiny"} if a.tiny else {}
            plan = list({(small.get(sh, sh), m): (small.get(sh, sh), m, 0.0, n, t * 4)
                         for sh, m, b, n, t in QUICK}.values())
        shapes = list(dict.fromkeys(sh for sh, *_ in plan))
        methods = list(dict.fromkeys(m for _, m, *_ in plan))
        budgets = list(dict.fromkeys(float(b) for _, _, b, *_ in plan))
    else:
        plan = [(sh, m, b, a.blocks, a.max_seconds) for sh in shapes for b in budgets for m in methods]
    results = []
    for shape, method, budget, blocks, max_s in plan:
        budget = float(budget) if device == "cuda" else 0.0
        case = {"shape": shape, "method": method, "budget_gib": budget, "device": device,
                "model_device": a.model_device or device, "num_blocks": blocks, "samples": samples,
                "seq_len": seq_len, "tiny": a.tiny, "max_seconds": max_s}
        path = os.path.join(out, f"case_{shape}_{method}_{budget:g}GiB.json")
        if os.path.exists(path):
            os.remove(path)
        cmd = [sys.executable, os.path.abspath(__file__), "--case", json.dumps(case), "--case-out", path]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max_s)
            tail = (proc.stderr or "")[-2000:]
            status = None if proc.returncode == 0 else f"exit {proc.returncode}"
        except subprocess.TimeoutExpired:
            tail, status = "", "timeout"
        rec = json.load(open(path)) if os.path.exists(path) else dict(case, blocks=[], status="no result")
        if status is not None:
            rec["status"] = status if rec.get("status") in (None, "running") or status == "timeout" else \
                rec["status"]
            rec["stderr_tail"] = tail
        rec["wall_s"] = time.perf_counter() - t0
        rec["summary"] = summarise(rec, shapes_tab[shape][-1])
        with open(path, "w") as f:
            json.dump(rec, f, indent=1)
        results.append(rec)
        print(f"{shape} {budget:g} GiB {method}: {_cell(rec)}", flush=True)
        with open(os.path.join(out, "model_scale.json"), "w") as f:
            json.dump({"meta": meta, "cases": results}, f, indent=1)
    print("\n| shape | budget | method | status | s/block | in prune_weight | outside | peak alloc / reserved GiB "
          "| chunks (first block) | OOM retries | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for rec in results:
        print(_detail_row(rec))
    print(f"\n{meta['device']}, torch {meta['torch']}, {meta['date']}, {samples} × {seq_len} calibration tokens, "
          f"pattern 2:4, {a.blocks} blocks timed\n")
    print("| shape | budget | " + " | ".join(methods) + " |")
    print("|---|---|" + "---|" * len(methods))
    for shape in shapes:
        for budget in budgets:
            found = {r["method"]: _cell(r) for r in results if r["shape"] == shape and r["budget_gib"] == budget}
            if not found:
                continue
            cells = [found.get(m, "—") for m in methods]
            label = "whole device" if budget == 0 else f"{budget:g} GiB"
            name = "seed layer (prune_weight)" if shape == SEED_LAYER else f"{shape} ({shapes_tab[shape][-1]} blocks)"
            print(f"| {name} | {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
