"""The sparse24 kernels' compiler report without a GPU: cross-compile each distinct decode kernel for sm_90.

    PYTHONPATH=src python benchmarks/sparse24_sass.py [--kinds stream,stream_dot,gather,dot] [--arch 90]

Triton compiles for a named target on the CPU (its wheel carries ptxas and cuobjdump). Per kernel (bf16, no bias,
pointer and stride arguments specialised as multiples of 16, as for the Llama shapes): registers, stack, shared
memory, the layout conversions left in the TTGIR, cp.async copies, and the instructions of the main loop (SASS
between a backward branch and its target) per (row, word) element — one int64 word of values + its position
byte, 9 weight bytes — i.e. the issue cost of streaming the weight. Prints one table; writes nothing.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sparsekit.kernels import sparse24

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_kernel(cfg: sparse24.Config, arch: int):
    """``(compiled kernel, SASS text)`` of ``cfg``'s kernel for ``sm_<arch>``."""
    stream = cfg.kind.startswith("stream")
    fn = {"stream": sparse24._stream_kernel, "stream_dot": sparse24._stream_dot_kernel}.get(cfg.kind,
                                                                                           sparse24._sparse24_kernel)
    types = dict(X="*i64" if cfg.kind == "stream" else "*bf16", V="*i64" if stream else "*i32", P="*u8",
                 Bias="*bf16", Y="*bf16", M="i32", K="i32", K8="i32", N="i32", stride_x="i32", stride_v="i32",
                 stride_p="i32", stride_y="i32")
    consts = dict(BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, BLOCK_N=cfg.block_n, SPLIT_K=cfg.split_k, HAS_BIAS=False)
    consts.update(NUM_STAGES=cfg.num_stages) if stream else consts.update(USE_DOT=cfg.kind == "dot")
    signature = {a: "constexpr" if a in consts else types[a] for a in fn.arg_names}
    divisible = [a for a in fn.arg_names if a in types and a != "N"]
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in divisible}
    kernel = triton.compile(ASTSource(fn, signature, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "--dump-sass", f.name], capture_output=True,
                              text=True, check=True).stdout
        res = subprocess.run([os.path.join(BIN, "cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    return kernel, sass, res


def loop_instructions(sass: str) -> tuple[int, collections.Counter]:
    """Instructions (and their opcodes) of the largest loop: a branch back to a lower address closes one."""
    ins = [(int(m.group(1), 16), m.group(2).strip()) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    best: list[str] = []
    for addr, text in ins:
        m = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))", text)
        if m and m.group(1) and int(m.group(1), 16) < addr:
            body = [t for a, t in ins if int(m.group(1), 16) <= a <= addr]
            best = max(best, body, key=len)
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in best)
    return len(best), ops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kinds", default="stream,stream_dot,gather,dot")
    ap.add_argument("--arch", type=int, default=90)
    args = ap.parse_args()
    kinds = args.kinds.split(",")
    seen = sorted({dataclasses.replace(c, per_sm=0) for c in sparse24.DECODE_CONFIGS if c.kind in kinds},
                  key=lambda c: (kinds.index(c.kind), c.block_n, c.block_m, c.block_k, c.split_k))
    print("| kind | block m×k | n | split | warps | stages | regs | stack | smem KB | cvt in TTGIR | cp.async "
          "| loop instr | per element | top opcodes |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for cfg in seen:
        kernel, sass, res = compile_kernel(cfg, args.arch)
        regs, stack = (int(v) for v in re.search(r"REG:(\d+) STACK:(\d+)", res).groups())
        n, ops = loop_instructions(sass)
        elems = cfg.block_m * cfg.block_k / 8 / (32 * cfg.num_warps)  # (row, word) elements per thread per tile
        print(f"| {cfg.kind} | {cfg.block_m}×{cfg.block_k} | {cfg.block_n} | {cfg.split_k} | {cfg.num_warps} | "
              f"{cfg.num_stages} | {regs} | {stack} | {kernel.metadata.shared / 1024:.0f} | "
              f"{kernel.asm['ttgir'].count('convert_layout')} | {kernel.asm['ptx'].count('cp.async.ca') + kernel.asm['ptx'].count('cp.async.cg')} | {n} | "
              f"{n / elems:.0f} | {', '.join(f'{k} {v}' for k, v in ops.most_common(5))} |", flush=True)


if __name__ == "__main__":
    main()
