"""A model loaded from a GGUF file and dequantised on load is a plain float model, but transformers still flags
it as quantised and its ``save_pretrained`` refuses ("The model is quantized with gguf and is not serializable",
transformers 5.x). :func:`as_plain_model` clears those flags so that it saves (and reloads) as any other model.
"""

from __future__ import annotations

from torch import nn

from sparsekit.errors import InputError

__all__ = ["as_plain_model"]


def _quant_method(model: nn.Module) -> str | None:
    q = getattr(model, "hf_quantizer", None)
    qc = getattr(q, "quantization_config", None) or getattr(getattr(model, "config", None), "quantization_config", None)
    method = getattr(qc, "quant_method", None) if qc is not None else None
    if isinstance(qc, dict):
        method = qc.get("quant_method")
    return None if method is None else str(getattr(method, "value", method))


def as_plain_model(model: nn.Module) -> nn.Module:
    """Clear the quantisation flags of a dequantised GGUF load in place (no-op for any other model); returns it.

    Raises :class:`InputError` if the model still holds packed GGUF layers (loaded without ``dequantize``): they
    are not ``nn.Linear`` weights and cannot be saved as a plain model.
    """
    if _quant_method(model) != "gguf":
        return model
    packed = [n for n, m in model.named_modules() if type(m).__name__.lower().startswith("gguf")]
    if packed:
        raise InputError(
            f"{packed[0]} still holds packed GGUF weights; load the model dequantised "
            "(from_pretrained(..., quantization_config=GgufConfig(dequantize=True)) or sparsekit.data.models.load_model)."
        )
    model.hf_quantizer = None
    for obj, attr in ((model, "is_quantized"), (model.config, "_is_quantized")):
        if hasattr(obj, attr):
            setattr(obj, attr, False)
    if hasattr(model, "quantization_method"):
        model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model
