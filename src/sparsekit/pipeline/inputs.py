"""Checks of the calibration batch that :func:`sparsekit.pipeline.prune_model_` runs before any work (issue 15):
each bad input is an :class:`~sparsekit.errors.InputError` naming the fix, not a raw error from deep inside the
model's forward or a run that "succeeds" without pruning anything."""

from __future__ import annotations

from torch import Tensor, nn

from sparsekit.errors import InputError

__all__ = ["check_calibration", "max_positions"]


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence a model with a learned position table takes (BERT: 512), ``None`` for models
    without one (rotary embeddings extrapolate: Llama, Qwen3)."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Embedding) and name.rsplit(".", 1)[-1] == "position_embeddings":
            return mod.num_embeddings
    return None


def check_calibration(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None) -> None:
    """Token ids must be >= 0; sequences must fit the model's position table; an attention mask must keep some
    tokens (``input_ids``: ``(n_seq, seq_len)`` long, ``attention_mask``: same shape or ``None``)."""
    if int(input_ids.min()) < 0:
        raise InputError(f"calibration has a negative token id ({int(input_ids.min())}); token ids are >= 0.")
    limit = max_positions(model)
    if limit is not None and input_ids.shape[1] > limit:
        raise InputError(
            f"calibration sequences of {input_ids.shape[1]} tokens exceed the model's {limit} positions; use "
            f"sequences of at most {limit} tokens (--seq-len {limit})."
        )
    if attention_mask is not None:
        bad = ((attention_mask != 0) & (attention_mask != 1)).any()
        if bool(bad):
            raise InputError("attention_mask must hold only 0 (padding) and 1 (token).")
        if not bool(attention_mask.any()):
            raise InputError(
                "attention_mask is all zeros: no calibration token would reach any layer, and nothing would be "
                "pruned; pass a mask with 1 at the real tokens."
            )
