"""Scaling of ``prune_model_`` over torch.distributed ranks (issue 18): one GPU per rank, random Llama-3-8B-shaped
blocks, 2:4, 128 × 2048 calibration tokens, True OBS and ADMM (its rows split over the ranks, coupled through
:mod:`sparsekit.coupling`).

    # one run per world size (the 1-GPU run first: the speed-ups are against it), then the table
    for n in 1 2 4 8; do
      NCCL_NVLS_ENABLE=0 PYTHONPATH=src torchrun --nproc-per-node $n benchmarks/distributed_scale.py --out $OUT
    done
    PYTHONPATH=src python benchmarks/distributed_scale.py --table --out $OUT
    # on a one-GPU machine: the same code through one NCCL rank, and the run without a process group (--check)
    NCCL_NVLS_ENABLE=0 PYTHONPATH=src torchrun --nproc-per-node 1 benchmarks/distributed_scale.py --check --out $OUT

Every rank builds the same random model (seeded) and calibration tokens; rank 0 writes
``$OUT/scale_<method>_w<N>.json`` (wall time of ``prune_model_`` and of each block, per-stage pruning time summed over linears, peak
GPU memory (max over ranks), peak host RSS of rank 0, and a SHA-256 of all pruned weights) and prints the table
(1/2/4/8 GPUs, whichever were run). One rank prunes every linear whole, as a run without a process group does
(the same GPU work: ``--check`` below expects bit-identical weights). With two or more ranks True OBS's linears are
cut into ``--row-parts`` parts whatever the world size and ADMM's into one part per rank; cuBLAS rounds a part's
GEMMs differently from the whole linear's (it chooses kernels by shape), so on GPUs the hashes may differ from the
1-GPU run (True OBS's may agree between 2, 4 and 8 GPUs, where its parts and chunks coincide) while the mean loss
agrees to float32 rounding (on CPUs the hashes agree: tests/test_distributed.py). ``--check`` (one process only)
also prunes the same model without a process group and records whether the weights are bit-identical. ``--reg-grid default`` chooses the
damping on held-out tokens as ``sparsekit prune`` does by default (every linear is then split one part per rank;
rows labelled ``METHOD+reg``). ``--shape tiny --device cpu`` runs the same code on CPUs through gloo (a smoke test).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import time
from pathlib import Path

import torch

SHAPES = {  # hidden, ffn, heads, kv heads
    "llama3-8b": (4096, 14336, 32, 8),
    "tiny": (64, 128, 4, 2),
}


def _model(shape: str, layers: int, dtype: torch.dtype):
    import transformers

    hidden, ffn, heads, kv = SHAPES[shape]
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def _digest(model) -> str:
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if ".layers." in f".{name}" and p.dim() == 2:
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def _prune(args, method: str, device: str):
    from sparsekit.pipeline import PruneConfig, prune_model_
    from sparsekit.pruners import METHODS
    from sparsekit.regularize import DEFAULT_GRID

    model = _model(args.shape, args.layers, getattr(torch, args.dtype))
    calib = torch.randint(0, 1024, (args.nseq, args.seq_len), generator=torch.Generator().manual_seed(1))
    heldout = dict(reg_grid=DEFAULT_GRID, reg_scope="model") if args.reg_grid == "default" else {}
    cfg = PruneConfig(pattern=args.pattern, method=method, options=dict(METHODS[method].options),
                      device=device, batch_size=args.batch_size, row_parts=args.row_parts, **heldout)
    blocks: list[float] = []  # wall seconds of each block (the first includes the warm-up)
    start = [0.0]

    def progress(ev) -> None:
        if ev.event == "block_start":
            start[0] = time.perf_counter()
        elif ev.event == "block_done":
            blocks.append(time.perf_counter() - start[0])

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    report = prune_model_(model, cfg, calib, progress)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return model, report, time.perf_counter() - t0, blocks


def run(args) -> None:
    import torch.distributed as dist

    from sparsekit.pipeline.distributed import init_from_env, leave

    device = init_from_env(args.device) or args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for method in args.method:
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        model, report, wall, blocks = _prune(args, method, device)
        peak = torch.tensor([torch.cuda.max_memory_allocated() if device.startswith("cuda") else 0],
                            device=device if dist.is_initialized() and dist.get_backend() == "nccl" else "cpu")
        if dist.is_initialized():
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        if rank != 0:
            continue
        stages: dict[str, float] = {}
        for lay in report.pruned:
            stage = lay.name.rsplit(".", 1)[-1]
            stages[stage] = stages.get(stage, 0.0) + lay.time_s
        row = {
            "method": method + ("+reg" if args.reg_grid == "default" else ""), "world": world, "shape": args.shape, "layers": args.layers, "pattern": args.pattern,
            "tokens": args.nseq * args.seq_len, "wall_s": wall, "block_s": blocks, "prune_s_by_linear": stages,
            "mean_loss": report.mean_loss, "gpu_peak_bytes": int(peak.item()),
            "host_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "weights_sha256": _digest(model), "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
            "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE"),
        }
        rows.append(row)
        del model
    lead = leave()
    if lead and args.check and world == 1:  # the same runs without a process group
        for row, method in zip(rows, args.method):
            plain, _, plain_wall, _ = _prune(args, method, device)
            row.update(plain_wall_s=plain_wall, identical_to_plain=_digest(plain) == row["weights_sha256"])
            del plain
    if lead:
        for row in rows:
            (out / f"scale_{row['method']}_w{world}.json").write_text(json.dumps(row, indent=1))
        table(out)


def _steady(r: dict) -> float | None:
    """Mean seconds per block after the first (its warm-up: kernel compilation, NCCL set-up); None without."""
    later = r.get("block_s", [])[1:]
    return sum(later) / len(later) if later else None


def table(out: Path) -> None:
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("scale_*_w*.json"))]
    print("| method | GPUs | wall s | speed-up | s/block after the first | its speed-up | mean loss | GPU peak GiB | "
          "host peak GiB | same weights as 1 | 1 rank = no group |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["method"], r["world"])):
        base = next((b for b in rows if b["method"] == r["method"] and b["world"] == 1), None)
        speed = f"{base['wall_s'] / r['wall_s']:.2f}×" if base else "?"
        steady, steady_base = _steady(r), base and _steady(base)
        per_block = "?" if steady is None else f"{steady:.1f}"
        steady_speed = f"{steady_base / steady:.2f}×" if steady and steady_base else "?"
        same = "?" if base is None else ("yes" if base["weights_sha256"] == r["weights_sha256"] else "NO")
        print(f"| {r['method']} | {r['world']} | {r['wall_s']:.1f} | {speed} | {per_block} | {steady_speed} | "
              f"{r['mean_loss']:.2%} | "
              f"{r['gpu_peak_bytes'] / 2**30:.1f} | {r['host_peak_bytes'] / 2**30:.1f} | {same} | "
              f"{r.get('identical_to_plain', '-')} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", action="append", default=None, help="true-obs, admm (repeatable; default both)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--layers", type=int, default=3,
                    help="blocks of the model (Llama-3-8B has 32; the first is the warm-up)")
    ap.add_argument("--nseq", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--pattern", default="2:4")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--row-parts", type=int, default=8)
    ap.add_argument("--device", default=None, help="cpu forces gloo; default: one GPU per rank")
    ap.add_argument("--check", action="store_true", help="one process: also prune without a process group, compare")
    ap.add_argument("--reg-grid", choices=("none", "default"), default="none",
                    help="default: choose the damping on held-out tokens as `sparsekit prune` does by default "
                         "(every linear then splits one part per rank); rows are labelled METHOD+reg")
    ap.add_argument("--table", action="store_true", help="only print the table of the JSON files in --out")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out/distributed"))
    args = ap.parse_args()
    args.method = args.method or ["true-obs", "admm"]
    if args.table:
        table(Path(args.out))
    else:
        run(args)


if __name__ == "__main__":
    main()
