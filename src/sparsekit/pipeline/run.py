"""Whole-model one-shot pruning with sequential calibration: ``prune_model_(model, config, calibration)``.

The algorithm is SparseGPT's ``llama.py`` (Frantar & Alistarh 2023), made generic over Hugging Face models:

1. Find the list of blocks: the largest ``nn.ModuleList`` whose children all have one type
   (``model.model.layers`` for Llama/Qwen3, ``model.encoder.layer`` for BERT).
2. Capture the inputs of block 0 on the calibration tokens: a forward pre-hook on block 0 stores its positional
   and keyword arguments (hidden states, attention mask, position embeddings/ids, ...) and stops the forward by
   raising. Only the modules outside the blocks (embeddings, rotary tables) run on the device for this.
3. For each block, alone on the device:

   - run it on all calibration batches with forward hooks that accumulate ``H = XᵀX / N`` per linear
     (one accumulator per distinct input tensor: ``q/k/v`` share one, ``gate/up`` share one);
   - prune each linear with :func:`sparsekit.prune_weight` (H freed right after);
   - recompute the block's outputs with the pruned weights: they are the next block's inputs.

Order inside a block (``PruneConfig.sequential``): ``"layer"`` (the default, SparseGPT's ``--true-sequential``)
groups the linears into stages in execution order (a stage = linears fed the same input tensor) and recomputes
the inputs of each stage with the earlier stages already pruned, so every linear is calibrated on the inputs it
will see after pruning (Llama: ``q/k/v`` → ``o`` → ``gate/up`` → ``down``; a pass over the block per stage).
``"block"`` (SparseGPT's default) computes every H of a block from one pass of the dense block: fewer passes,
slightly stale inputs for the later linears.

Checkpoints (``checkpoint_dir``): after each block, the pruned weights of its linears and its per-layer report
(``block_NNNN.pt``), then its output activations (``acts_NNNN.pt``), then ``progress.json`` — the commit point —
each written to a temporary file and renamed with ``os.replace``. ``resume=True`` reloads the finished blocks and
the last block's outputs and continues: the result is bit-identical to an uninterrupted run.

A lazily loaded model (:func:`sparsekit.data.load_model_lazy`, :mod:`sparsekit.pipeline.lazy`) keeps its blocks on
disk: each block is read from the safetensors shards when the loop reaches it, and written to the model's work
folder and freed once it is pruned (and checkpointed); :func:`save_pruned` then writes one file per block.

The command ``sparsekit prune`` lives in :mod:`sparsekit.cli.prune`.
"""


from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from sparsekit.api import PruneResult, prune_weight
from sparsekit.errors import InputError, ResourceError
from sparsekit.hessian import HessianAccumulator
from sparsekit.pipeline.budget import (
    H_ENTRY_BYTES,
    layer_max_memory,
    module_bytes,
    pipeline_resource_error,
    plan_memory,
    tensor_bytes,
)
from sparsekit.pipeline.blocks import (
    BatchInputs,
    HessianHooks,
    LayerPlan,
    StopForward,
    capture_inputs,
    module_device,
    plan_layers,
    probe_inputs,
    run_block,
)
from sparsekit.pipeline.checkpoint import Checkpointer, check_writable, fingerprint, rollback_on_error
from sparsekit.pipeline.config import PruneConfig, pattern_name
from sparsekit.pipeline.dequantized import as_plain_model
from sparsekit.pipeline.inputs import check_calibration
from sparsekit.pipeline.distributed import Group, join
from sparsekit.pipeline.reuse import ChildOutputCache, unwrap
from sparsekit.pipeline.heldout import HeldOut, split_calibration
from sparsekit.pipeline.lazy import LazyWeights
from sparsekit.pipeline.report import REPORT_FILE, LayerReport, ModelReport, Progress, ProgressFn

log = logging.getLogger(__name__)

__all__ = ["prune_model_", "save_pruned"]

def _stages(
    plans: list[LayerPlan], order: list[str], inputs: dict[str, list[Tensor]], sequential: str
) -> list[list[list[LayerPlan]]]:
    """Group the block's linears: ``stages[s][g]`` is a group of linears sharing one input tensor (one H).

    ``order`` is the execution order seen in the probe pass, ``inputs[name]`` the input tensors each linear got.
    Linears called once and fed the same tensor object share a group; a linear called several times (or never)
    is its own group. With ``sequential="layer"`` each group is a stage (in execution order); with ``"block"``
    one stage holds every group.
    """
    by_name = {p.name: p for p in plans}
    groups: list[list[LayerPlan]] = []
    owner: dict[int, int] = {}  # id(input tensor) -> group index
    for name in order:
        plan = by_name[name]
        xs = inputs[name]
        if len(xs) == 1 and id(xs[0]) in owner:
            groups[owner[id(xs[0])]].append(plan)
            continue
        groups.append([plan])
        if len(xs) == 1:
            owner[id(xs[0])] = len(groups) - 1
    for p in plans:  # never called in the forward: its own group (it will see no tokens)
        if p.name not in inputs:
            groups.append([p])
    if sequential == "block":
        return [groups]
    return [[g] for g in groups]


def prune_model_(
    model: nn.Module,
    config: PruneConfig | None = None,
    calibration: Tensor | None = None,
    progress_fn: ProgressFn | None = None,
    *,
    attention_mask: Tensor | None = None,
    checkpoint_dir: "str | os.PathLike[str] | None" = None,
    resume: bool = False,
) -> ModelReport:
    """Prune every linear of the model's blocks in place, block by block, with sequential calibration.

    Args:
        model: a Hugging Face causal LM or encoder (anything whose forward takes ``input_ids`` and runs a list of
            blocks); it stays where it is, except one block at a time on ``config.device``.
        config: patterns, methods, rules (:class:`PruneConfig`; default 2:4 with ``DEFAULT_METHOD``).
        calibration: ``(n_seq, seq_len)`` long token ids.
        progress_fn: receives :class:`Progress` events; an exception from it aborts (finished blocks stay saved).
        attention_mask: optional ``(n_seq, seq_len)`` 0/1 mask; padded tokens do not enter any H.
        checkpoint_dir: write per-block checkpoints there (atomic); required for ``resume``.
        resume: continue from the checkpoint in ``checkpoint_dir`` if there is one made with the same model,
            config and calibration (else :class:`InputError`); without ``resume`` an old checkpoint is discarded.

    Returns:
        a :class:`ModelReport` (per-layer loss, time, damping, tokens; JSON-serialisable).
    """
    config = config or PruneConfig()
    if calibration is None or not isinstance(calibration, Tensor):
        raise InputError("calibration must be a LongTensor of token ids (n_seq, seq_len).")
    if calibration.dim() != 2 or calibration.dtype not in (torch.long, torch.int, torch.int32) or calibration.numel() == 0:
        raise InputError(
            f"calibration must be a non-empty (n_seq, seq_len) integer tensor of token ids, got "
            f"{tuple(calibration.shape)} {calibration.dtype}."
        )
    calibration = calibration.long()
    if attention_mask is not None and attention_mask.shape != calibration.shape:
        raise InputError(f"attention_mask {tuple(attention_mask.shape)} must match calibration {tuple(calibration.shape)}.")
    if resume and checkpoint_dir is None:
        raise InputError("resume=True needs checkpoint_dir.")
    emb = getattr(model, "get_input_embeddings", lambda: None)()
    if emb is not None and int(calibration.max()) >= emb.num_embeddings:
        raise InputError(f"calibration has token id {int(calibration.max())} >= vocabulary size {emb.num_embeddings}.")
    check_calibration(model, calibration, attention_mask)
    if checkpoint_dir is not None:
        check_writable(checkpoint_dir, "checkpoint_dir")

    t_start = time.perf_counter()
    path, blocks, plans = plan_layers(model, config)
    if config.reg_grid:  # the held-out slice never enters a calibration Hessian
        calibration, attention_mask, held_ids, held_mask = split_calibration(calibration, attention_mask,
                                                                             config.heldout_fraction)
    held: HeldOut | None = None
    n_blocks = len(blocks)
    n_run = n_blocks if config.max_blocks is None else min(n_blocks, config.max_blocks)  # blocks to prune
    device = torch.device(config.device) if config.device else module_device(model)
    offload, memory = plan_memory(model, blocks, [p.module for bp in plans for p in bp if not p.skipped], calibration,
                                  config, device, config.offload_activations)
    act_device = torch.device("cpu") if offload else device
    group = join(config, device, calibration.shape[0])  # None without a torch.distributed process group
    writes = group is None or group.is_writer
    if not writes:
        progress_fn = None  # rank 0 reports
    lazy = LazyWeights.of(model)  # None: the whole model is in memory
    if lazy is not None:
        lazy.writer = writes

    def materialised(i: int, changed: bool = True) -> Any:
        """Block ``i`` of a lazily loaded model read onto the device for the body (then written and freed)."""
        return lazy.block(i, device, changed) if lazy is not None else contextlib.nullcontext()

    def finished(i: int) -> Any:
        """Finished block ``i`` on a resume, read only. A lazily loaded model's: from the work folder (the writer
        wrote it there when restoring it) or, on a rank that writes none, from the shards with its checkpointed
        weights."""
        if lazy is None:
            return contextlib.nullcontext()
        weights = None if lazy.writer else {f"{n}.weight": w for n, w in ckpt.load_block(i).items()}
        return lazy.block(i, device, False, weights)
    num_tokens = int(attention_mask.sum()) if attention_mask is not None else calibration.numel()
    report = ModelReport(
        model=type(model).__name__,
        blocks_path=path,
        num_blocks=n_blocks,
        config=config.to_dict(),
        calibration={"num_sequences": calibration.shape[0], "seq_len": calibration.shape[1], "num_tokens": num_tokens},
    )
    report.extra["memory"] = memory

    def emit(event: str, block: int, **kw: Any) -> None:
        if progress_fn is not None:
            progress_fn(Progress(event, block, n_run, **kw))

    ckpt = None
    start_block = 0
    hidden: list[Tensor] | None = None
    if checkpoint_dir is not None:
        ckpt = Checkpointer(checkpoint_dir, fingerprint(model, config, calibration, attention_mask, plans))
        state = ckpt.state() if resume and ckpt.exists() else None
        if group is not None:
            group.barrier()  # every rank has read the state before rank 0 may clear it
        if state is not None:
            last, acts = ckpt.restore(model, state, n_run)
            report.layers = [LayerReport.from_dict(r) for r in state["layers"]]
            hidden = [h.to(act_device) for h in acts] if acts is not None else []
            hidden = hidden if group is None else group.local(hidden)
            start_block = report.resumed_blocks = last + 1
            log.info("resuming from %s after block %d of %d", checkpoint_dir, last, n_run)
        elif ckpt.exists():
            log.warning("discarding the old checkpoint in %s (pass resume=True to continue it)", checkpoint_dir)
            if writes:
                ckpt.clear()
        elif resume:
            log.warning("no checkpoint in %s; starting from the first block", checkpoint_dir)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            emit("start", start_block)
            if start_block < n_run:
                ids, mask = (calibration, attention_mask) if group is None else group.local_calibration(
                    calibration, attention_mask, config.batch_size)
                fresh, batches = capture_inputs(model, blocks, ids, mask, config.batch_size, device, act_device)
                hidden = fresh if hidden is None or start_block == 0 else hidden
                if len(hidden) != len(batches):
                    raise InputError("checkpointed activations do not match the calibration batches; delete the checkpoint.")
                if config.reg_grid:
                    held = HeldOut.capture(model, blocks, path, config, held_ids, held_mask, device, act_device,
                                           group)
                    held.resume(blocks, start_block, report.layers, device, act_device, finished)
            for i in range(start_block, n_run):
                with materialised(i), rollback_on_error(plans[i]) if ckpt is not None else contextlib.nullcontext():
                    hidden = _prune_block(
                        i, blocks[i], plans[i], hidden, batches, config, device, act_device, report, emit, group, held
                    )
                    if ckpt is not None:
                        acts = hidden if group is None else group.gather(hidden)
                        if writes:
                            weights = {p.name: p.module.weight.detach().cpu().clone() for p in plans[i] if not p.skipped}
                            ckpt.save(i, weights, acts, report.layers, {"num_blocks": n_blocks})
                        if group is not None:
                            group.barrier()  # the block is committed before any rank goes on
                emit("block_done", i, num_layers=len(plans[i]))
            emit("done", n_run)
    finally:
        model.train(was_training)
    if held is not None:
        report.calibration.update(heldout_sequences=held_ids.shape[0], heldout_tokens=held.num_tokens)
        report.extra["regularisation"] = held.summary(report.layers)
    report.time_s = time.perf_counter() - t_start
    return report


@contextlib.contextmanager
def _block_on(block: nn.Module, device: torch.device) -> Iterator[None]:
    """One block on ``device`` at a time, moved back (and unwrapped) even when a layer fails."""
    home = module_device(block)
    block.to(device)
    try:
        yield
    finally:
        unwrap(block)
        block.to(home)


def _prune_block(
    i: int,
    block: nn.Module,
    plans: list[LayerPlan],
    hidden: list[Tensor],
    batches: list[BatchInputs],
    config: PruneConfig,
    device: torch.device,
    act_device: torch.device,
    report: ModelReport,
    emit: Callable[..., None],
    group: Group | None = None,
    held: HeldOut | None = None,
) -> list[Tensor]:
    """Calibrate, prune and run one block; returns its outputs on the calibration batches (the next inputs),
    written over ``hidden`` batch by batch."""
    emit("block_start", i, num_layers=len(plans))
    with _block_on(block, device):
        n_layers = len(plans)
        index = {p.name: k for k, p in enumerate(plans)}
        active = [p for p in plans if not p.skipped]
        for p in plans:
            if p.skipped:
                M, K = p.module.weight.shape
                r = LayerReport(p.name, i, (M, K), pattern_name(p.pattern), p.method, "skipped", note=p.skip_reason or "rule")
                report.layers.append(r)
                emit("layer_done", i, layer=p.name, layer_index=index[p.name], num_layers=n_layers, report=r)
        # Probe pass on the first batch: execution order and which linears share an input tensor.
        order, seen = probe_inputs(
            {p.name: p.module for p in active},
            lambda: run_block(block, hidden[0], batches[0].block(i), device) if active else None,
        )
        stages = _stages(active, order, seen, config.sequential)
        calls = {name: len(xs) for name, xs in seen.items()}  # calls per forward of each linear
        # layer-sequential: finished children's outputs are reused by the later passes (kept on the device: not
        # when the activations are offloaded, i.e. when memory is short)
        # (not with a held-out slice: its forwards through the block must not see the calibration batches' outputs)
        reuse = (ChildOutputCache(block, active, order, calls, hidden[0].shape[-1]).install()
                 if config.sequential == "layer" and act_device == device and held is None else None)

        for s, stage in enumerate(stages):
            accs: list[HessianAccumulator | None] = [
                HessianAccumulator(linears[0].module.in_features, torch.float32, device) for linears in stage
            ]
            # Stop each forward once every group of the stage has its inputs (the rest of the block is not needed).
            expected = sum(calls.get(g[0].name, 0) for g in stage)
            if any(calls.get(g[0].name, 0) == 0 for g in stage):
                expected = 0  # some linear is not reached: run whole passes
            sources = accs if group is None else [group.deferred() for _ in accs]  # ranks add theirs in batch order
            with HessianHooks([(g[0].module, src) for g, src in zip(stage, sources)], expected) as hooks:
                for j, (h, inp) in enumerate(zip(hidden, batches)):
                    hooks.batch(inp.token_mask)
                    if reuse is not None:
                        reuse.batch = j
                    if s == 0 and j == 0:  # the probe ran this batch through the same (dense) block: reuse its inputs
                        for g, src in zip(stage, sources):
                            for x in seen.get(g[0].name, ()):
                                hooks.add(src, x)
                        continue
                    try:
                        run_block(block, h, inp.block(i), device)
                    except StopForward:
                        pass
            if group is not None:
                group.reduce_hessians(accs, sources)
            seen.clear()
            held_accs: list[HessianAccumulator | None] = (held.hessians(block, stage, i, device, expected)
                                                          if held is not None else [None] * len(stage))
            for g, linears in enumerate(stage):
                acc, accs[g] = accs[g], None
                hacc, held_accs[g] = held_accs[g], None
                H_held = hacc.hessian if hacc is not None and hacc.num_tokens else None  # (K, K)
                all_tokens = H_held is not None and acc.num_tokens > 0 and held.calibrates(linears)
                if all_tokens:
                    acc.merge(hacc)  # H_all = (N_c H_calib + N_h H_heldout) / (N_c + N_h): every token calibrates
                tokens = acc.num_tokens
                H = acc.hessian if tokens else None  # (K, K)
                del acc, hacc  # free Σxxᵀ now; H goes right after the group
                held_bytes = (module_bytes(block) + tensor_bytes(hidden) + (0 if H is None else H.nbytes)
                              + sum(a.num_features ** 2 * H_ENTRY_BYTES for a in accs if a is not None)
                              + (reuse.nbytes if reuse is not None else 0))
                mem = layer_max_memory(config.max_memory, device, held_bytes)  # each prune_weight call's budget
                try:
                    done = (group.prune(linears, H, config, held, H_held, mem, all_tokens)
                            if group is not None and H is not None else {})
                except ResourceError as e:  # one of the group's linears, on some rank
                    raise pipeline_resource_error(e, "/".join(p.name for p in linears), config.max_memory, device,
                                                  held_bytes) from None
                for p in linears:
                    try:
                        report.layers.append(_prune_layer(p, H, tokens, config, index[p.name], n_layers, emit,
                                                          done.get(p.name), mem, held, H_held, all_tokens))
                    except ResourceError as e:
                        raise pipeline_resource_error(e, p.name, config.max_memory, device, held_bytes) from None
                del H, H_held
            del accs, held_accs
            if reuse is not None:
                reuse.finished([p.name for linears in stage for p in linears])

        for j, inp in enumerate(batches):  # the outputs replace the inputs batch by batch: one set held, not two
            if reuse is not None:
                reuse.batch = j
            hidden[j] = run_block(block, hidden[j], inp.block(i), device).detach().to(act_device)
        if held is not None:
            held.advance(block, i, device, act_device)
        return hidden


def _prune_layer(
    p: LayerPlan,
    H: Tensor | None,
    tokens: int,
    config: PruneConfig,
    index: int,
    n_layers: int,
    emit: Callable[..., None],
    result: PruneResult | None = None,
    max_memory: int | None = None,
    held: HeldOut | None = None,
    H_held: Tensor | None = None,
    all_tokens: bool = False,
) -> LayerReport:
    """Prune one linear (or report ``result``, its pruning done by :mod:`sparsekit.pipeline.distributed`);
    ``all_tokens``: ``H`` is over the calibration and held-out tokens (:meth:`HeldOut.calibrates`)."""
    M, K = p.module.weight.shape
    pat = pattern_name(p.pattern)
    kw = {"layer": p.name, "layer_index": index, "num_layers": n_layers}
    if H is None:
        log.warning("%s received no calibration inputs in the block's forward pass; left dense.", p.name)
        r = LayerReport(p.name, p.block, (M, K), pat, p.method, "skipped", note="no calibration inputs")
        emit("layer_done", p.block, report=r, **kw)
        return r
    emit("layer_start", p.block, hessian=H, **kw)

    def method_progress(msg: str) -> None:
        emit("message", p.block, message=msg, **kw)

    if result is not None:  # pruned by its owner rank (sparsekit.pipeline.distributed)
        res = result
    elif held is not None:  # the regularisation chosen on the held-out slice
        res = held.prune(p, H, H_held, method_progress, max_memory, all_tokens=all_tokens)
    else:
        res = prune_weight(
            p.module.weight.data, H, p.pattern, p.method,
            damp=config.damp, damp_mode=config.damp_mode, inplace=True, progress_fn=method_progress,
            devices=config.prune_devices, max_memory=max_memory, **p.options,
        )
    note = ""
    dead = int((H.diagonal() == 0).sum())
    if tokens < K:
        note = f"rank-deficient H: {tokens} tokens < K={K}, damping {res.damp if res.damp is not None else config.damp:.3g}"
        log.warning(
            "%s: H was accumulated from %d calibration tokens for K=%d inputs, so it is rank-deficient "
            "(rank <= %d); pruned with relative damping %s (%s). Give at least %d tokens for a full-rank H.",
            p.name, tokens, K, tokens, f"{res.damp:.3g}" if res.damp is not None else f"{config.damp:.3g} (unused)",
            config.damp_mode, K,
        )
    elif dead:
        note = f"{dead} dead inputs"
    r = LayerReport(
        p.name, p.block, (M, K), pat, p.method, "pruned", loss=res.loss, time_s=res.time_s, damp=res.damp,
        tokens=tokens, sparsity=res.sparsity, note=note, stats=dict(res.stats),
    )
    log.info("%s %s %s loss %.4f in %.2fs", p.name, p.method, pat, res.loss, res.time_s)
    emit("layer_done", p.block, report=r, **kw)
    return r


def save_pruned(
    model: nn.Module,
    out_dir: "str | os.PathLike[str]",
    report: ModelReport | None = None,
    tokenizer: Any = None,
) -> Path:
    """Write ``model.save_pretrained`` (safetensors), the tokenizer and ``sparsekit_report.json`` to ``out_dir``.

    A lazily loaded model is written shard by shard (:meth:`LazyWeights.save`: one file per block, one for the
    rest, their index) with its config: a folder ``from_pretrained`` loads as it loads the other.
    The weight files get the permissions of any other new file (``0666`` less the umask; safetensors writes them
    ``0600``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lazy = LazyWeights.of(model)
    if lazy is None:
        as_plain_model(model).save_pretrained(out, safe_serialization=True)  # a dequantised GGUF load saves as plain
    else:
        lazy.save(out)
        model.config.architectures = [type(model).__name__]  # what save_pretrained writes with the config
        model.config.save_pretrained(out)
        if model.can_generate() and getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(out)
    mode = 0o666 & ~_umask()
    for f in out.glob("*.safetensors*"):
        f.chmod(mode)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if report is not None:
        report.to_json(out / REPORT_FILE)
    return out


def _umask() -> int:
    """The process umask (read by setting it and restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
