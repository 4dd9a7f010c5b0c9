"""Where ``prune_model_``'s time goes outside ``prune_weight`` (issue 14): a random Llama built from a config.

    PYTHONPATH=src python3 benchmarks/pipeline_overhead.py [--hidden 256] [--ffn 688] [--blocks 4]
        [--samples 32] [--seq-len 256] [--method sparsegpt] [--device cpu] [--profile] [--save PATH]

Prints the pipeline's time, the time inside ``prune_weight`` (the layers' reported times) and the rest
(calibration forwards, Hessian accumulation, moves), and with ``--profile`` the top functions by cumulative time.
``--save PATH`` stores the pruned weights (``torch.save``) to compare two versions of the pipeline bit for bit.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch
import transformers

from sparsekit.pipeline import PruneConfig, prune_model_


def build(hidden: int, ffn: int, blocks: int, vocab: int, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=blocks,
                                   num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128),
                                   vocab_size=vocab, max_position_embeddings=4096)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=688)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--method", default="sparsegpt")
    ap.add_argument("--sequential", default="layer")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-memory", default=None)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--save", default=None)
    a = ap.parse_args()
    vocab = 512
    model = build(a.hidden, a.ffn, a.blocks, vocab, getattr(torch, a.dtype))
    calib = torch.randint(0, vocab, (a.samples, a.seq_len), generator=torch.Generator().manual_seed(0))
    kw = {} if a.max_memory is None else {"max_memory": a.max_memory}
    cfg = PruneConfig(method=a.method, options={}, device=a.device, sequential=a.sequential, **kw)
    prof = cProfile.Profile() if a.profile else None
    t0, c0 = time.perf_counter(), time.process_time()
    if prof:
        prof.enable()
    rep = prune_model_(model, cfg, calib)
    if prof:
        prof.disable()
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    inside = sum(r.time_s or 0.0 for r in rep.layers)
    print(f"{a.method} {a.blocks} blocks d={a.hidden} ffn={a.ffn} {a.samples}x{a.seq_len} tokens on {a.device}: "
          f"total {total:.2f} s, prune_weight {inside:.2f} s ({inside / total:.0%}), outside {total - inside:.2f} s "
          f"({(total - inside) / total:.0%}); process CPU time {cpu:.2f} s")
    if prof:
        st = pstats.Stats(prof)
        counts = {f[2]: v[1] for f, v in st.stats.items()  # type: ignore[attr-defined]
                  if f[2] in ("run_block", "add") or f[2].endswith(("_nn.linear>", "scaled_dot_product_attention>"))}
        print("calls:", counts)
        st.sort_stats("cumulative").print_stats(25)
    if a.save:
        torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, a.save)


if __name__ == "__main__":
    main()
