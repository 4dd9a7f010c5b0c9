"""SparseGPT equals the published column loop (float64, no lazy batching)."""

import pytest
import torch

from oracles import sparsegpt_plain, tiny_problem
from sparsekit import prune_weight


@pytest.mark.parametrize("n,m,blocksize", [(2, 4, 128), (2, 4, 12), (3, 8, 16), (1, 3, 7)])
def test_equals_published_loop(n, m, blocksize):
    W, H, _ = tiny_problem(12, 48, seed=7)
    r = prune_weight(W, H, f"{n}:{m}", "sparsegpt", blocksize=blocksize)
    ref = sparsegpt_plain(W, H, n, m)
    assert (torch.linalg.norm(r.weight - ref) / torch.linalg.norm(ref)).item() < 1e-6


def test_lazy_batches_never_cut_a_scope():
    from sparsekit import get_pattern
    from sparsekit.pruners._common import batch_bounds

    lay = get_pattern("coupled-2:4").resolve(4, 64)
    b = batch_bounds(lay, 20)  # 20 is not a multiple of the 16-column period
    assert b[0] == 0 and b[-1] == 64 and all(x % 16 == 0 for x in b)
