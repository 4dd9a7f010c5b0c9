"""What the calibration set buys out of domain: the token count, the model's own text, and two data-free priors
(issue 16, target 4: ADMM ≥ 20% below SparseGPT on the layer loss through the Hessian of other kinds of text).

    # 1. where the model packages and the Debian texts are (CPU): prefix Hessians of the calibration text
    PYTHONPATH=src python3 benchmarks/heldout_calibration.py --save .cache/calib_minilm.safetensors --model minilm \\
        --sizes 8192,16384,32768,65536,131072 --random 32768
    PYTHONPATH=src python3 benchmarks/heldout_calibration.py --save .cache/calib_smollm2.safetensors --model smollm2 \\
        --sizes 8192,32768,65536 --self-sizes 8192,32768
    # 2. anywhere: prune every layer on every calibration variant, score through the judges
    OUT=out/hc PYTHONPATH=src python3 benchmarks/heldout_calibration.py .cache/calib_minilm.safetensors \\
        --methods sparsegpt,admm --variants all

Per layer (:data:`LAYERS`: MiniLM's six FFN outputs and two queries, SmolLM2's ``down_proj``/``o_proj`` of blocks
5, 15, 25 and two ``q_proj``) the file holds ``calib@N``: H = XᵀX/N over the first N tokens of the calibration
split of ``mixed`` (prefixes of one window order, so every size contains the smaller ones), ``heldout@8192`` (the
held-out split of the same sources), the judges ``domains@8192`` and ``domains@32768`` (the five kinds of text the
calibration never sees, interleaved, as in ``heldout_layers.py``), and optionally ``self@N``: the model's own
text (causal LMs: sampled from the BOS token, top-p 0.95, temperature 1, 256 tokens per sequence, seed 0), and
``rand@N``: uniformly random non-special tokens (a data-free prior). The variants (:func:`variants`) are each
``calib@N``; ``self@N``; ``mix@A+B`` = the token-weighted union of ``calib@A`` and ``self@B``;
``calib@32768+F·rand`` = ``(1 − F)·calib@32768 + F·rand``; ``pow{p}@32768`` = ``calib@32768`` with its eigenvalues
raised to the power p (trace kept): a flatter spectrum than the damping's ``+ λI``. Every method prunes at the
default damping (0.01 mean). The table gives the median over layers of each method's loss through a judge over
SparseGPT's on the same calibration (the fair margin), and over SparseGPT's on ``calib@8192`` (what the variant
buys against the smallest set). JSON rows go to ``$OUT/heldout_calibration.json`` (default
``out/heldout_calibration``); ``--table FILE.json`` prints the table of saved rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from heldout_layers import _pack, _unpack, judged_texts  # noqa: E402

from sparsekit import prune_weight, relative_error  # noqa: E402

LAYERS = {
    "minilm": r"encoder\.layer\.(\d\.output\.dense|[14]\.attention\.self\.query)$",
    "smollm2": r"layers\.(20\.mlp\.down_proj|(5|20)\.self_attn\.q_proj|(5|15|25)\.(mlp\.down_proj|self_attn\.o_proj))$",
}
METHODS = {"sparsegpt": ("sparsegpt", {}), "admm": ("admm", {}), "admm+swap": ("admm", {"refine": "swap"})}
SEQ_LEN = 128
JUDGES = ("domains@8192", "domains@32768")


def _prefix_hessians(model: Any, modules: dict[str, torch.nn.Linear], ids: torch.Tensor,
                     cuts: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    """``{N: {layer: H over the first N tokens of ids (n_seq, SEQ_LEN)}}``, one forward pass over the largest N
    (float64 sums, weighted by each piece's token count)."""
    from sparsekit.data.layers import _accumulate

    out, total, n, done = {}, {}, 0, 0
    for cut in sorted(cuts):
        part = _accumulate(model, modules, ids[done // SEQ_LEN: cut // SEQ_LEN], 8, torch.float64, None)
        for name, (H, count) in part.items():
            total[name] = total.get(name, 0) + H.double() * count
        n += next(iter(part.values()))[1]
        done = cut
        out[cut] = {name: (S / n).float() for name, S in total.items()}  # (K, K)
        print(f"  {cut} tokens", flush=True)
    return out


def _self_text(model: Any, tok: Any, tokens: int, seed: int = 0) -> torch.Tensor:
    """``(tokens / SEQ_LEN, SEQ_LEN)`` ids the model samples itself from its BOS token (top-p 0.95, T = 1)."""
    torch.manual_seed(seed)
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    seqs = []
    with torch.no_grad():
        for left in range(tokens // 256, 0, -64):
            start = torch.full((min(64, left), 1), bos, dtype=torch.long)
            out = model.generate(input_ids=start, attention_mask=torch.ones_like(start), do_sample=True, top_p=0.95,
                                 temperature=1.0, max_new_tokens=256, min_new_tokens=256, pad_token_id=bos)
            seqs.append(out[:, 1:257])
    return torch.cat(seqs).reshape(-1, SEQ_LEN)


def save(path: str, model_name: str, sizes: list[int], self_sizes: list[int], random: int) -> None:
    from safetensors.torch import save_file

    from sparsekit.data.layers import filter_names
    from sparsekit.data.models import load_model
    from sparsekit.data.text import tokenize_for_calibration
    from sparsekit.pipeline.blocks import block_linears

    model, tok = load_model(model_name)
    linears = dict(block_linears(model))
    modules = {n: linears[n] for n in filter_names(list(linears), LAYERS[model_name])}
    calib, heldout, domains = judged_texts()
    sets = {"calib": (calib, sizes), "heldout": (heldout, [8192]), "domains": (domains, [8192, 32768])}
    ids = {key: tokenize_for_calibration(tok, tx, max(cuts), SEQ_LEN, 0) for key, (tx, cuts) in sets.items()}
    cuts = {key: c for key, (_, c) in sets.items()}
    if self_sizes:
        ids["self"], cuts["self"] = _self_text(model, tok, max(self_sizes)), self_sizes
    if random:
        usable = torch.tensor(sorted(set(range(len(tok))) - set(tok.all_special_ids)))
        pick = torch.randint(len(usable), (random // SEQ_LEN, SEQ_LEN), generator=torch.Generator().manual_seed(0))
        ids["rand"], cuts["rand"] = usable[pick], [random]
    tensors = {f"{n}.weight": m.weight.detach().float().contiguous() for n, m in modules.items()}
    for key in ids:
        print(key, flush=True)
        for cut, hs in _prefix_hessians(model, modules, ids[key], cuts[key]).items():
            tensors.update({f"{n}.{key}@{cut}": _pack(H) for n, H in hs.items()})
    save_file(tensors, path, metadata={"info": json.dumps({"model": model_name, "cuts": cuts})})
    print(f"wrote {path} ({os.path.getsize(path) / 2**20:.1f} MiB)")


def variants(H: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The calibration Hessians to prune on (see the module docstring), from a layer's ``H`` of the file."""
    size = lambda k: int(k.split("@")[1])  # noqa: E731
    calib = sorted((k for k in H if k.startswith("calib@")), key=size)
    out = {k: H[k] for k in calib}
    for s in sorted((k for k in H if k.startswith("self@")), key=size):
        out[s] = H[s]
        for c in (f"calib@{size(s)}", calib[0]):
            if c in H:
                out[f"mix@{size(c)}+{size(s)}"] = (H[c] * size(c) + H[s] * size(s)) / (size(c) + size(s))
    if "calib@32768" in H:
        base = H["calib@32768"]
        for r in (k for k in H if k.startswith("rand@")):
            out.update({f"calib@32768+{f}rand": (1 - f) * base + f * H[r] for f in (0.1, 0.25)})
        L, Q = torch.linalg.eigh(base.double())  # (K,), (K, K)
        L = L.clamp_min(0)
        for p in (0.9, 0.75, 0.5):
            out[f"pow{p}@32768"] = ((Q * L.pow(p)) @ Q.T * (L.sum() / L.pow(p).sum())).to(base.dtype)
    return out


def run(path: str, methods: list[str], keep: list[str] | None, device: str) -> list[dict[str, Any]]:
    from safetensors import safe_open

    rows = []
    with safe_open(path, framework="pt") as f:
        names = sorted(k[: -len(".weight")] for k in f.keys() if k.endswith(".weight"))
        for n in names:
            W = f.get_tensor(f"{n}.weight").to(device)  # (M, K)
            H = {k[len(n) + 1:]: _unpack(f.get_tensor(k)).to(device) for k in f.keys() if k.startswith(f"{n}.")
                 and "@" in k}
            for v, Hc in variants(H).items():
                if keep and v not in keep:
                    continue
                for m in methods:
                    method, opts = METHODS[m]
                    t0 = time.perf_counter()
                    res = prune_weight(W, Hc, "2:4", method, **opts)
                    row = {"layer": n, "variant": v, "method": m, "time_s": time.perf_counter() - t0,
                           "calib": relative_error(W, res.weight, Hc),
                           **{j: relative_error(W, res.weight, H[j]) for j in (*JUDGES, "heldout@8192")}}
                    rows.append(row)
                    print(f"{n} {v} {m}: calib {row['calib']:.4f} domains {row[JUDGES[0]]:.4f} "
                          f"({row['time_s']:.1f}s)", flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    by = {(r["layer"], r["variant"], r["method"]): r for r in rows}
    layers = sorted({r["layer"] for r in rows})
    vs = list(dict.fromkeys(r["variant"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    base = "calib@8192" if all((l, "calib@8192", "sparsegpt") in by for l in layers) else None
    med = lambda m, v, ref, judge: statistics.median(  # noqa: E731
        by[(l, v, m)][judge] / by[(l, ref, "sparsegpt")][judge] - 1 for l in layers)
    ref = base or "(no calib@8192)"
    lines = [f"median over {len(layers)} layers of the loss through each judge / SparseGPT's − 1, SparseGPT on the "
             f"same calibration and on {ref}",
             "| variant | method | " + " | ".join(f"{j}: same | {j}: {ref}" for j in JUDGES) + " |",
             "|---|---|" + "---|---|" * len(JUDGES)]
    for v in vs:
        for m in methods:
            cells = [f"{med(m, v, v, j):+.1%} | " + (f"{med(m, v, base, j):+.1%}" if base else "–") for j in JUDGES]
            lines.append(f"| {v} | {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("file", nargs="?", help="a file written by --save")
    p.add_argument("--save", default=None, metavar="FILE", help="collect the Hessians into FILE")
    p.add_argument("--model", default="minilm", choices=sorted(LAYERS))
    p.add_argument("--sizes", default="8192,16384,32768,65536", help="calibration token counts (prefixes)")
    p.add_argument("--self-sizes", default="", help="--save, causal LMs: token counts of the model's own text")
    p.add_argument("--random", type=int, default=0, help="--save: tokens of uniformly random ids (0: none)")
    p.add_argument("--methods", default="sparsegpt,admm", help=f"comma-separated of {list(METHODS)}")
    p.add_argument("--variants", default="all", help="comma-separated variant names, or 'all'")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--table", default=None, metavar="JSON", help="print the table of saved rows and stop")
    args = p.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return
    if args.save:
        ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
        save(args.save, args.model, ints(args.sizes), ints(args.self_sizes), args.random)
        return
    if not args.file:
        p.error("give a file written by --save, or --save FILE")
    rows = run(args.file, args.methods.split(","), None if args.variants == "all" else args.variants.split(","),
               args.device)
    out = Path(os.environ.get("OUT") or "out/heldout_calibration")
    out.mkdir(parents=True, exist_ok=True)
    (out / "heldout_calibration.json").write_text(json.dumps(rows, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
