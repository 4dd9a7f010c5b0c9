"""Property test of the compact 2:4 packing (hypothesis): pack -> unpack is the identity for every 2:4 weight."""

import pytest
import torch

from sparsekit.compact import check_packed_24, pack_24, unpack_24
from test_compact import random_24

hypothesis = pytest.importorskip("hypothesis")
given, settings, st = hypothesis.given, hypothesis.settings, hypothesis.strategies


@settings(max_examples=25, deadline=None)
@given(M=st.integers(1, 6), groups=st.integers(1, 6), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_pack_unpack_identity(M, groups, seed, dtype):
    W = random_24(M, 8 * groups, dtype, seed)
    values, meta = pack_24(W)
    assert values.dtype == dtype
    assert torch.equal(unpack_24(values, meta), W)
    check_packed_24(values, meta, M, 8 * groups)
