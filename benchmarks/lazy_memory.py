"""Host memory of ``sparsekit prune --low-memory`` against the whole-model load (issue 18).

    OMP_NUM_THREADS=1 PYTHONPATH=src python3 benchmarks/lazy_memory.py --out $OUT                 # CPU preset
    PYTHONPATH=src python3 benchmarks/lazy_memory.py --layers 8 --hidden 4096 --ffn 14336 --heads 32 \\
        --kv-heads 8 --vocab 128256 --device cuda --out $OUT                                         # 8B-shaped

Writes a random Llama-shaped model (from a ``LlamaConfig``, weights ``N(0, 0.02²)``, norms 1, in ``--dtype``,
default bfloat16 as released checkpoints are) to a temporary folder as one safetensors shard per block plus one
for the rest, block by block (the model is never whole in this process), with a byte-level tokenizer. Then runs
``sparsekit prune`` on it twice, each in its own process: with ``--no-low-memory`` (the whole model loaded, as
float32) and with ``--low-memory``; same method, calibration (``stdlib`` text), ``--reg-grid none``, ``--no-eval``.
Records each run's peak resident host memory (``ru_maxrss`` of the child, from ``wait4``), peak CUDA memory
(``torch.cuda.max_memory_allocated`` in the child) and wall time, and checks that the two output folders hold
the same tensors bit for bit. Prints a table and writes ``lazy_memory.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def _tokenizer() -> Any:
    """A byte-level tokenizer (256 ids, no merges): any text maps into a vocabulary of at least 256."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE({c: i for i, c in enumerate(alphabet)}, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=alphabet[0])


def write_model(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The random model, one shard per block and one for the rest, written one tensor at a time."""
    import transformers

    from sparsekit.pipeline.lazy import SHARD_INDEX, write_safetensors

    cfg = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, max_position_embeddings=4096,
        dtype=args.dtype, architectures=["LlamaForCausalLM"])
    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(cfg)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)

    def value(shape: torch.Size, norm: bool) -> Any:
        return lambda: (torch.ones(shape) if norm else torch.randn(shape, generator=gen) * 0.02).to(dtype)

    groups: dict[int, list[tuple[str, torch.Tensor]]] = {}
    for name, p in skeleton.named_parameters():
        block = int(name.split(".")[2]) if name.startswith("model.layers.") else args.layers
        groups.setdefault(block, []).append((name, p))
    n = args.layers + 1
    folder.mkdir(parents=True)
    weight_map = {}
    total = 0
    for block, params in sorted(groups.items()):
        path = folder / f"model-{block + 1:05d}-of-{n:05d}.safetensors"
        like = [(name, torch.empty(p.shape, dtype=dtype, device="meta"), value(p.shape, "norm" in name))
                for name, p in params]
        total += write_safetensors(path, like)
        weight_map.update({name: path.name for name, _ in params})
    (folder / SHARD_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    cfg.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    block_params = sum(p.numel() for p in skeleton.model.layers[0].parameters())
    return {"params": sum(p.numel() for p in skeleton.parameters()), "bytes_on_disk": total,
            "block_float32_bytes": block_params * 4, "model_float32_bytes": total // dtype.itemsize * 4}


def _child(result: str, argv: list[str]) -> None:
    """Run ``sparsekit <argv>`` here; write its exit code, wall time and peak CUDA memory to ``result``."""
    from sparsekit.cli import main as sparsekit

    t0 = time.perf_counter()
    rc = sparsekit(argv)
    cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    Path(result).write_text(json.dumps({"rc": rc, "wall_s": time.perf_counter() - t0, "cuda_peak_bytes": cuda}))


def run_prune(model: Path, out: Path, low: bool, args: argparse.Namespace, log: Path) -> dict[str, Any]:
    argv = ["prune", "--model", str(model), "--out", str(out), "--method", args.method, "--calib", "stdlib",
            "--tokens", str(args.tokens), "--seq-len", str(args.seq_len), "--reg-grid", "none", "--no-eval",
            "--low-memory" if low else "--no-low-memory"] + (["--device", args.device] if args.device else [])
    result = out.with_suffix(".json")
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, __file__, "--child", str(result), "--", *argv], stdout=f,
                                stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or not result.exists():
        raise SystemExit(f"sparsekit {' '.join(argv)} failed ({proc.returncode}); see {log}")
    rec = json.loads(result.read_text())
    rec.update(low_memory=low, peak_rss_bytes=usage.ru_maxrss * 1024, command="sparsekit " + " ".join(argv))
    return rec


def _tensors(folder: Path) -> dict[str, Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    return {k: folder / "model.safetensors" for k in _keys(folder / "model.safetensors")}


def _keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def same_outputs(a: Path, b: Path) -> bool:
    """Whether two saved folders hold the same tensor names and values (compared one tensor at a time)."""
    from safetensors import safe_open

    ta, tb = _tensors(a), _tensors(b)
    if ta.keys() != tb.keys():
        return False
    for k in ta:
        with safe_open(str(ta[k]), "pt") as fa, safe_open(str(tb[k]), "pt") as fb:
            if not torch.equal(fa.get_tensor(k), fb.get_tensor(k)):
                return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--ffn", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", default="bfloat16", help="dtype of the weights on disk (both runs prune in float32)")
    ap.add_argument("--method", default="sparsegpt")
    ap.add_argument("--tokens", type=int, default=None, help="calibration tokens (default: 4096 on a CPU, 32768 on CUDA)")
    ap.add_argument("--seq-len", type=int, default=None, help="default: 512 on a CPU, 2048 on CUDA")
    ap.add_argument("--device", default=None, help="cpu | cuda (default: the CLI's default, the CPU)")
    ap.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results/lazy_memory")
    ap.add_argument("--workdir", default=None, help="where the model and outputs are written (default: a temporary "
                    "folder, removed after)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if args.child:
        _child(args.child, rest[1:] if rest[:1] == ["--"] else rest)
        return
    if rest:
        ap.error(f"unrecognised arguments: {' '.join(rest)}")
    cuda = bool(args.device and args.device.startswith("cuda"))
    args.tokens = args.tokens or (32768 if cuda else 4096)
    args.seq_len = args.seq_len or (2048 if cuda else 512)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="lazy-memory-", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        model = write_model(work / "model", args)
        model["write_s"] = time.perf_counter() - t0
        runs = [run_prune(work / "model", work / f"out-{m}", m == "low", args, out / f"prune_{m}.log")
                for m in ("whole", "low")]
        same = same_outputs(work / "out-whole", work / "out-low")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rec = {"args": {k: v for k, v in vars(args).items() if k != "child"}, "model": model, "runs": runs,
           "identical_outputs": same, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "device": torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)"}
    (out / "lazy_memory.json").write_text(json.dumps(rec, indent=1))
    gib = 2.0 ** 30
    print(f"model: {args.layers} blocks x (hidden {args.hidden}, ffn {args.ffn}), vocab {args.vocab}; "
          f"{model['params'] / 1e9:.2f} B parameters, {model['bytes_on_disk'] / gib:.2f} GiB on disk ({args.dtype}), "
          f"{model['model_float32_bytes'] / gib:.2f} GiB in float32, a block {model['block_float32_bytes'] / gib:.3f} "
          f"GiB; {rec['device']}; outputs identical: {same}")
    print("| load | peak host RSS | peak CUDA | time |")
    print("|---|---|---|---|")
    for r in runs:
        peak = "-" if r["cuda_peak_bytes"] is None else f"{r['cuda_peak_bytes'] / gib:.2f} GiB"
        print(f"| {'--low-memory' if r['low_memory'] else 'whole model'} | {r['peak_rss_bytes'] / gib:.2f} GiB | "
              f"{peak} | {r['wall_s']:.1f} s |")


if __name__ == "__main__":
    main()
