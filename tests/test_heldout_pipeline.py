"""The held-out calibration slice in the pipeline (issue 16): its Hessian, its isolation, the recorded choice."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

import sparsekit.pipeline.heldout as heldout_mod  # noqa: E402
from sparsekit import prune_weight  # noqa: E402
from sparsekit.errors import InputError  # noqa: E402
from sparsekit.hessian import HessianAccumulator  # noqa: E402
from sparsekit.pipeline.blocks import HessianHooks  # noqa: E402
from sparsekit.pipeline import PruneConfig, prune_model_  # noqa: E402
from tests.test_pipeline import block_linears, calib, close, reference_hessians, tiny_model  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = ((0.001, "mean"), (0.1, "mean"), (0.3, "diag"))


def _spy(monkeypatch):
    """Record (layer weight before pruning, H_calib, H_heldout) of every choose_regularisation call."""
    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    real = heldout_mod.choose_regularisation

    def spy(weight, h_calib, h_heldout, *a, **kw):
        calls.append((weight.clone(), h_calib.clone(), h_heldout.clone()))
        return real(weight, h_calib, h_heldout, *a, **kw)

    monkeypatch.setattr(heldout_mod, "choose_regularisation", spy)
    return calls


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_heldout_hessian_is_that_of_the_heldout_tokens(kind, monkeypatch) -> None:
    """Every layer's H_heldout equals XᵀX/N (float64) of the held-out sequences' inputs in the final pruned model,
    and its H_calib that of the other sequences only: the held-out tokens never enter a calibration Hessian."""
    model = tiny_model(kind, layers=2)
    ids = calib(8, 16)
    calls = _spy(monkeypatch)
    report = prune_model_(model, PruneConfig(method="sparsegpt", reg_grid=GRID, heldout_fraction=0.25,
                                             batch_size=3), ids)
    names = list(block_linears(model))
    by_name = {}
    groups = [r.name for r in report.pruned]
    assert len(calls) == len(groups) == len(names)
    for n, c in zip(groups, calls):
        by_name[n] = c
    ref_held = reference_hessians(model, ids[6:], names)
    ref_calib = reference_hessians(model, ids[:6], names)
    ref_all = reference_hessians(model, ids, names)
    for n in names:
        _, hc, hh = by_name[n]
        assert close(hh, ref_held[n]), n
        assert close(hc, ref_calib[n]), n
        assert not close(hc, ref_all[n]), n  # the held-out tokens would change H_calib
    assert report.calibration["num_tokens"] == 6 * 16
    assert report.calibration["heldout_tokens"] == 2 * 16


def test_choice_is_recorded_and_applied(monkeypatch) -> None:
    """Each layer's weight is the chosen grid point's result (brute force over the grid on the same H's), and
    the layer report and the summary say which point it was."""
    model = tiny_model("llama", layers=2)
    ids = calib(8, 16)
    calls = _spy(monkeypatch)
    cfg = PruneConfig(method="sparsegpt", reg_grid=GRID, reg_shrinks=(0.0, 0.5), heldout_fraction=0.25)
    report = prune_model_(model, cfg, ids)
    mods = dict(model.named_modules())
    seen = set()
    for r, (w, hc, hh) in zip(report.pruned, calls):
        reg = r.stats["regularisation"]
        losses = {}
        for damp, mode in GRID:
            res = prune_weight(w, hc, "2:4", "sparsegpt", damp=damp, damp_mode=mode)
            for a in (0.0, 0.5):
                ws = res.weight if a == 0 else torch.lerp(res.weight, torch.where(res.mask, w, 0.0), a)
                d = (ws - w).double()
                losses[(damp, mode, a)] = float(((d @ hh.double() * d).sum()
                                                 / ((w.double() @ hh.double()) * w.double()).sum()).sqrt())
        best = min(losses, key=losses.get)
        assert (reg["damp"], reg["damp_mode"], reg["shrink"]) == best, r.name
        assert reg["heldout_loss"] == pytest.approx(losses[best], rel=1e-4)
        res = prune_weight(w, hc, "2:4", "sparsegpt", damp=best[0], damp_mode=best[1])
        want = res.weight if best[2] == 0 else torch.lerp(res.weight, torch.where(res.mask, w, 0.0), best[2])
        torch.testing.assert_close(mods[r.name].weight.data, want)
        seen.add(best)
    assert sum(report.extra["regularisation"]["chosen"].values()) == len(report.pruned)
    assert report.extra["regularisation"]["heldout_tokens"] == 32
    assert len(seen) > 1  # the check is not vacuous: the choice differs between layers


def test_model_scope_reuses_the_first_block_choice(monkeypatch) -> None:
    model = tiny_model("llama", layers=3)
    calls = _spy(monkeypatch)
    report = prune_model_(model, PruneConfig(method="sparsegpt", reg_grid=GRID, reg_scope="model",
                                             heldout_fraction=0.25), calib(8, 16))
    per_block = len(report.pruned) // 3
    assert len(calls) == per_block  # chosen in block 0 only
    first = {r.name.split(".", 3)[3]: r.stats["regularisation"] for r in report.pruned[:per_block]}
    for r in report.pruned[per_block:]:
        reg = r.stats["regularisation"]
        assert reg["reused"] and reg["heldout_loss"] is not None
        src = first[r.name.split(".", 3)[3]]
        assert (reg["damp"], reg["damp_mode"], reg["shrink"]) == (src["damp"], src["damp_mode"], src["shrink"])


def _masked_hessians(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, names: list[str]) -> dict:
    """``XᵀX / N`` (float64) over the real tokens (``mask`` 1) of the inputs each named linear gets in one forward."""
    mods = dict(model.named_modules())
    xs: dict[str, torch.Tensor] = {}
    hooks = [mods[n].register_forward_hook(lambda m, a, o, n=n: xs.__setitem__(n, a[0].detach())) for n in names]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    out = {}
    for n in names:
        x = xs[n][mask.bool()].double()  # (N, K) the real tokens
        out[n] = x.T @ x / x.shape[0]
    return out


def test_merged_hessian_is_that_of_every_token() -> None:
    """float64 oracle: the calibration and held-out accumulators, filled through HessianHooks with padding masks
    and merged, hold ``XᵀX / N`` of every real token, i.e. ``(N_c H_c + N_h H_h) / (N_c + N_h)``."""
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(6, 3).double()
    batches = [(torch.randn(2, 5, 6, generator=g, dtype=torch.float64), torch.rand(2, 5, generator=g) > 0.3)
               for _ in range(4)]

    def fill(part):
        acc = HessianAccumulator(6, torch.float64)
        with HessianHooks([(lin, acc)]) as hooks:
            for x, m in part:
                hooks.batch(m)
                lin(x)
        return acc

    calib_acc, held_acc = fill(batches[:3]), fill(batches[3:])
    n_c, n_h, h_c, h_h = calib_acc.num_tokens, held_acc.num_tokens, calib_acc.hessian, held_acc.hessian
    calib_acc.merge(held_acc)
    x = torch.cat([x[m] for x, m in batches])  # (N, 6) the real tokens
    assert calib_acc.num_tokens == n_c + n_h == x.shape[0] < 4 * 2 * 5
    torch.testing.assert_close(calib_acc.hessian, x.T @ x / x.shape[0], rtol=1e-13, atol=0)
    torch.testing.assert_close(calib_acc.hessian, (n_c * h_c + n_h * h_h) / (n_c + n_h), rtol=1e-13, atol=0)
    with pytest.raises(InputError, match="6 features"):
        calib_acc.merge(HessianAccumulator(5, torch.float64))
    with pytest.raises(InputError, match="dtype"):
        calib_acc.merge(HessianAccumulator(6, torch.float32))


def test_heldout_calibrates_after_the_choosing_block() -> None:
    """heldout_calibrates (model scope): block 0 is pruned as without it (on H_calib, at its choice); every later
    linear on the Hessian of every real token, calibration and held-out (float64 oracle through the final model,
    padded tokens dropped), at block 0's choice: bit for bit prune_weight on that H at the chosen damping."""
    ids = calib(8, 16)
    mask = torch.ones_like(ids)
    mask[2, -5:] = mask[7, -6:] = 0  # a calibration and a held-out sequence padded
    cfg = PruneConfig(method="sparsegpt", reg_grid=GRID, reg_scope="model", heldout_fraction=0.25, batch_size=3)
    off, on, dense = (tiny_model("llama", layers=3) for _ in range(3))
    prune_model_(off, cfg, ids, attention_mask=mask)
    seen: dict[str, torch.Tensor] = {}

    def grab(ev):
        if ev.event == "layer_start":
            seen[ev.layer] = ev.hessian.clone()

    report = prune_model_(on, dataclasses.replace(cfg, heldout_calibrates=True), ids, grab, attention_mask=mask)
    mods_on, mods_off, mods_dense = (dict(m.named_modules()) for m in (on, off, dense))
    later = [r.name for r in report.pruned if r.block > 0]
    ref_all = _masked_hessians(on, ids, mask, later)
    ref_calib = _masked_hessians(on, ids[:6], mask[:6], later)
    n_c, n_all = int(mask[:6].sum()), int(mask.sum())
    assert report.extra["regularisation"]["heldout_calibrates"]
    changed = 0
    for r in report.pruned:
        reg = r.stats["regularisation"]
        w = mods_on[r.name].weight.data
        if r.block == 0:
            assert torch.equal(w, mods_off[r.name].weight.data), r.name
            assert (reg["hessian"], reg["reused"], r.tokens) == ("calibration", False, n_c), r.name
            continue
        assert (reg["hessian"], reg["reused"], r.tokens) == ("calibration+heldout", True, n_all), r.name
        assert close(seen[r.name], ref_all[r.name]), r.name
        assert not close(seen[r.name], ref_calib[r.name]), r.name  # the held-out tokens are in it
        want = prune_weight(mods_dense[r.name].weight.data.clone(), seen[r.name], "2:4", "sparsegpt",
                            damp=reg["damp"], damp_mode=reg["damp_mode"])
        assert torch.equal(w, want.weight), r.name
        changed += not torch.equal(w, mods_off[r.name].weight.data)
    assert changed == len(later)  # the option changes every later linear


def test_bad_settings_are_typed_errors() -> None:
    with pytest.raises(InputError, match="heldout_fraction"):
        PruneConfig(reg_grid=GRID, heldout_fraction=1.0)
    with pytest.raises(InputError, match="damp_mode"):
        PruneConfig(reg_grid=((0.01, "max"),))
    with pytest.raises(InputError, match="reg_scope"):
        PruneConfig(reg_grid=GRID, reg_scope="block")
    with pytest.raises(InputError, match="heldout_calibrates needs"):
        PruneConfig(heldout_calibrates=True, reg_scope="model")  # no grid
    with pytest.raises(InputError, match="heldout_calibrates needs"):
        PruneConfig(reg_grid=GRID, heldout_calibrates=True)  # scope "layer"
    with pytest.raises(InputError, match="True or False"):
        PruneConfig(reg_grid=GRID, reg_scope="model", heldout_calibrates="yes")
    model = tiny_model("llama", layers=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InputError, match="held out"):
        prune_model_(model, PruneConfig(method="sparsegpt", reg_grid=GRID), calib(1, 16))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_resume_with_heldout_is_identical(tmp_path) -> None:
    """A job interrupted after block 0 and resumed gives the same weights and choices as one uninterrupted."""
    cfg = PruneConfig(method="sparsegpt", reg_grid=GRID, reg_scope="model", heldout_fraction=0.25)
    ids = calib(8, 16)
    ref = tiny_model("llama", layers=3)
    ref_report = prune_model_(ref, cfg, ids)

    def stop(ev):
        if ev.event == "block_done" and ev.block == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prune_model_(tiny_model("llama", layers=3), cfg, ids, stop, checkpoint_dir=tmp_path)
    fresh = tiny_model("llama", layers=3)
    report = prune_model_(fresh, cfg, ids, checkpoint_dir=tmp_path, resume=True)
    for a, b in zip(ref.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    assert [r.stats["regularisation"] for r in report.pruned] == [r.stats["regularisation"] for r in ref_report.pruned]


def test_cli_regularisation_flags() -> None:
    from sparsekit.cli import build_parser
    from sparsekit.cli.prune import calibration_size, config_from_args
    from sparsekit.regularize import DEFAULT_GRID

    parse = build_parser().parse_args
    cfg = config_from_args(parse(["prune"]))  # on by default: it measured better (GENERALISATION_issue16.md)
    assert (cfg.reg_grid, cfg.reg_scope) == (DEFAULT_GRID, "model")
    assert config_from_args(parse(["prune", "--reg-grid", "none"])).reg_grid == ()
    cfg = config_from_args(parse(["prune", "--reg-grid", "0.01:mean,0.2:diag,0.05", "--reg-shrinks", "0,0.25",
                                  "--reg-scope", "model", "--heldout-fraction", "0.25"]))
    assert cfg.reg_grid == ((0.01, "mean"), (0.2, "diag"), (0.05, "mean"))
    assert (cfg.reg_shrinks, cfg.reg_scope, cfg.heldout_fraction) == ((0.0, 0.25), "model", 0.25)
    assert config_from_args(parse(["prune", "--reg-grid", "default"])).reg_grid == DEFAULT_GRID
    assert not config_from_args(parse(["prune"])).heldout_calibrates  # off until measured on a GPU
    assert config_from_args(parse(["prune", "--heldout-calibrates"])).heldout_calibrates
    assert not config_from_args(parse(["prune", "--no-heldout-calibrates"])).heldout_calibrates
    with pytest.raises(InputError, match="--reg-grid"):
        config_from_args(parse(["prune", "--reg-grid", "none", "--heldout-calibrates"]))
    with pytest.raises(InputError, match="reg_scope='model'"):
        config_from_args(parse(["prune", "--reg-scope", "layer", "--heldout-calibrates"]))
    with pytest.raises(InputError, match="DAMP"):
        config_from_args(parse(["prune", "--reg-grid", "x:mean"]))
    assert calibration_size(True, "cuda", 8192) == (128 * 2048, 2048)
    assert calibration_size(True, "cuda:1", 1024) == (128 * 2048, 1024)
    assert calibration_size(True, None, 8192) == (16384, 512)
    assert calibration_size(False, "cpu", 512) == (65536, 128)  # 8x the old 8192: GENERALISATION_issue16.md


def test_verdict_gap_ratio_and_domains(monkeypatch) -> None:
    """With a 'sparsegpt' baseline the verdict has (1 − cos)/(1 − cos_sparsegpt) per text and its mean; with a
    calibration source the texts are its held-out domains, those of the calibration marked."""
    import sparsekit.data.text as text
    from sparsekit.data.text import Domain
    from sparsekit.evaluate import evaluate
    from tests.test_evaluate import TEXTS, CharTokenizer, bert

    domains = [Domain("stdlib", "x", True, "heldout"), Domain("fortunes", "y", False, "all")]
    monkeypatch.setattr(text, "heldout_domains", lambda calibration: domains)
    monkeypatch.setattr(text, "domain_texts", lambda ds: {"stdlib": TEXTS, "fortunes": TEXTS[::-1]})
    tok = CharTokenizer()
    ids = torch.tensor([tok(t)["input_ids"][:32] for t in TEXTS * 4])
    dense, ours, sgpt = bert(), bert(), bert()
    prune_model_(ours, PruneConfig(method="true-obs"), ids)
    prune_model_(sgpt, PruneConfig(method="sparsegpt"), ids)
    v = evaluate(ours, dense, tok, baselines={"sparsegpt": sgpt}, calibration="mixed")
    assert [(r["text"], r["in_calibration"]) for r in v.rows] == [("stdlib", True), ("fortunes", False)]
    ratios = [(1 - r["values"]["pruned"]) / (1 - r["values"]["sparsegpt"]) for r in v.rows]
    assert v.summary["mean_ratio"]["pruned"] == pytest.approx(sum(ratios) / 2)
    assert v.summary["mean_ratio"]["sparsegpt"] == pytest.approx(1.0)
    assert "gap ratio" in v.format() and "*stdlib" in v.format()
