"""Run the ranks of a torch.distributed test on localhost, each writing ``rank{r}.pt`` to a folder."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any, Callable

import torch
import torch.multiprocessing as mp


def run_ranks(target: Callable[..., None], world: int, out: Path, *args: Any, cuda: bool = False,
              timeout_s: float = 120) -> list[Any]:
    """Start ``target(rank, world, port, *args, str(out))`` for every rank, wait (a rank still alive after
    ``timeout_s`` is killed), and return what each wrote to ``out / f"rank{r}.pt"`` (``None`` if nothing).

    gloo ranks are forked (the children skip re-importing torch and transformers: seconds each); CUDA needs spawn.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn" if cuda else "fork")
    procs = [ctx.Process(target=target, args=(r, world, port, *args, str(out))) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout_s)
        if p.is_alive():
            p.kill()
    return [torch.load(out / f"rank{r}.pt", weights_only=False) if (out / f"rank{r}.pt").exists() else None
            for r in range(world)]
