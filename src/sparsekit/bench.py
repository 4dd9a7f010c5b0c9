"""The reference benchmark tables (the seed's ``benchmark-results.rst``: OBS variants, SparseGPT and True OBS on

Why one file over 500 lines: the variant registry, the run, the tables (RST/Markdown/text), the JSON schema
and the plots all speak :class:`BenchRow`; each part is short. The command is :mod:`sparsekit.cli.bench`.
Qwen3-4B layer 0) recomputed on any layers: ``sparsekit bench``.

For every layer × pattern × method variant, :func:`run_bench` calls :func:`sparsekit.prune_weight` and records
the seed's columns — the relative output error ``‖X(W' − W)ᵀ‖_F / ‖XWᵀ‖_F`` ("Norm. Loss", through ``H``),
sparsity, time (median of ``repeats`` after ``warmup`` runs, CUDA synchronised by ``prune_weight``) and
"vs SparseGPT" ``= (loss_SparseGPT − loss) / loss_SparseGPT`` (positive: better than SparseGPT, as in the seed).

Method variants are a registry of ``(key, label, method, options)`` (:data:`VARIANTS`): adding one is one line.
Variants whose method is not registered or whose module does not exist yet are skipped with a note; a pattern
that does not tile a layer gives one "skipped" line, never a crash. Results serialise to a stable JSON schema
(:data:`SCHEMA_VERSION`, :func:`write_json` / :func:`read_json`), tables print as RST list-tables (the seed's
format), Markdown or plain text, and :func:`plot_pattern` draws loss vs time per pattern.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from sparsekit.hessian import DEFAULT_DAMP
from sparsekit.errors import InputError, PatternError, SparsekitError

log = logging.getLogger(__name__)

__all__ = [
    "SCHEMA_VERSION",
    "SEED_PATTERNS",
    "REFERENCE_NAMES",
    "pattern_title",
    "Variant",
    "VARIANTS",
    "register_variant",
    "parse_variant",
    "variant_status",
    "BenchRow",
    "run_bench",
    "bench_layers",
    "auto_label",
    "aggregate",
    "format_tables",
    "format_summary",
    "write_json",
    "read_json",
    "plot_pattern",
]

#: bump on any incompatible change of the JSON layout; :func:`read_json` refuses newer files
SCHEMA_VERSION = 1
#: the four patterns of the reference tables (the seed's ``benchmark-results.rst``: Qwen3-4B layer 0, 2560×9728,
#: measured on a GPU), in their order
SEED_PATTERNS = ("2:4", "coupled-2:4", "2:4-pairs", "rowpair-16")
#: the reference tables' own names of our presets, where they differ, so a reader can match the tables
REFERENCE_NAMES = {"coupled-2:4": "Coupled 2:4", "2:4-pairs": "4:8", "rowpair-16": "16-column, 8-row coupled"}
#: a variant counts as "matching SparseGPT" in the summary's fast row if its loss is within this factor
FAST_TOLERANCE = 1.01


@dataclass(frozen=True)
class Variant:
    """One row of a table: ``prune_weight(W, H, pattern, method, **options)`` shown as ``label``."""

    key: str  # CLI name, e.g. "obs-interleaved=64"
    label: str  # table label, e.g. "OBS interleaved=64"
    method: str  # a name in sparsekit.pruners.METHODS
    options: tuple[tuple[str, Any], ...] = ()  # keyword options, as sorted items (hashable unless a value is not)

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.options)


def _v(key: str, label: str, method: str, **options: Any) -> Variant:
    return Variant(key, label, method, tuple(sorted(options.items())))


#: the seed's variants, in the seed's table order (weakest first); add new methods here, one line each
VARIANTS: dict[str, Variant] = {
    v.key: v
    for v in [
        _v("magnitude", "Magnitude", "magnitude"),
        _v("wanda", "Wanda", "wanda"),
        _v("obs-local", "OBS local", "obs-local"),
        _v("obs-full", "OBS full (frozen C)", "obs-full"),
        _v("obs-split=8", "OBS split=8", "obs-split", n_splits=8),
        _v("obs-interleaved=8", "OBS interleaved=8", "obs-interleaved", n_splits=8),
        _v("obs-interleaved=16", "OBS interleaved=16", "obs-interleaved", n_splits=16),
        _v("obs-interleaved=64", "OBS interleaved=64", "obs-interleaved", n_splits=64),
        _v("sparsegpt", "SparseGPT", "sparsegpt"),
        _v("obs-ord", "OBS-ord ng=256", "obs-ord", ng=256),
        _v("admm", "ADMM", "admm"),
        _v("true-obs-l2r", "True OBS ng=256 L2R", "true-obs", ng=256, order="left_to_right"),
        _v("true-obs", "True OBS ng=256 largest-first", "true-obs", ng=256, order="largest_first"),
        # beyond the seed (issue 8): refit / swap refinement of any method, ADMM warm-started from True OBS
        _v("sparsegpt+refit", "SparseGPT + refit", "sparsegpt", refit=True),
        _v("true-obs-16", "True OBS ng=16 largest-first", "true-obs", ng=16, order="largest_first"),
        _v("true-obs+refit", "True OBS ng=16 + refit", "true-obs", ng=16, order="largest_first", refit=True),
        _v("true-obs+swap", "True OBS ng=16 + swap", "true-obs", ng=16, order="largest_first", refine="swap"),
        _v("admm-true-obs", "ADMM (True OBS init)", "admm", init="true-obs",
           init_options={"ng": 16, "order": "largest_first"}),
        _v("admm-true-obs+swap", "ADMM (True OBS init) + swap", "admm", init="true-obs",
           init_options={"ng": 16, "order": "largest_first"}, refine="swap"),
    ]
}
#: options of :func:`sparsekit.prune_weight` itself that a variant may set for any method
REFINE_OPTIONS = ("refine", "refit", "max_sweeps")
#: label of the baseline every table compares against
BASELINE = "SparseGPT"


def register_variant(key: str, label: str, method: str, **options: Any) -> Variant:
    """Add (or replace) a variant in :data:`VARIANTS` and return it."""
    VARIANTS[key] = _v(key, label, method, **options)
    return VARIANTS[key]


def _parse_value(s: str) -> Any:
    for conv in (int, float):
        try:
            return conv(s)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(s.lower(), s)


_ORDER = {"left_to_right": "L2R", "largest_first": "largest-first"}


def auto_label(method: str, options: dict[str, Any]) -> str:
    """The seed's style: ``"True OBS ng=16 largest-first"``, ``"OBS interleaved=64"``, ``"OBS-ord ng=256"``."""
    from sparsekit.pruners import METHODS

    parts = [METHODS[method].label if method in METHODS else method]
    for k, val in options.items():
        if k == "n_splits" and method in ("obs-interleaved", "obs-split"):
            parts[0] += f"={val}"
        elif k == "order" and val in _ORDER:
            parts.append(_ORDER[val])
        else:
            parts.append(f"{k}={val}")
    return " ".join(parts)


def parse_variant(spec: str) -> Variant:
    """A registered key (``"obs-interleaved=64"``) or ``"method[:opt=value,...]"`` (``"true-obs:ng=16"``).

    Options of an ad-hoc spec are parsed as int, float, bool or string; its label is
    ``"method opt=value ..."`` unless it equals a registered variant, whose label is reused.
    """
    if spec in VARIANTS:
        return VARIANTS[spec]
    method, _, rest = spec.partition(":")
    opts: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        k, eq, val = item.partition("=")
        if not eq or not k.strip():
            raise InputError(f"method spec {spec!r}: options must look like 'name=value', got {item!r}.")
        opts[k.strip()] = _parse_value(val.strip())
    from sparsekit.pruners import METHODS

    if method not in METHODS:
        raise InputError(
            f"unknown method {spec!r}; use a variant ({', '.join(VARIANTS)}) or 'method:opt=value' with a method "
            f"of {', '.join(METHODS)}."
        )
    v = _v(spec, auto_label(method, opts), method, **opts)
    same = [r for r in VARIANTS.values() if (r.method, r.options) == (v.method, v.options)]
    return dataclasses.replace(v, label=same[0].label) if same else v


def variant_status(variant: Variant) -> str | None:
    """``None`` if the variant can run here, else why not (method unregistered, module missing, bad option)."""
    from sparsekit.pruners import METHODS, get_pruner
    from sparsekit.pruners._common import unknown_options

    if variant.method not in METHODS:
        return f"method {variant.method!r} is not registered in sparsekit.pruners.METHODS"
    module = METHODS[variant.method].module
    if importlib.util.find_spec(f"sparsekit.pruners.{module}") is None:
        return f"not available yet (sparsekit/pruners/{module}.py does not exist)"
    try:
        fn = get_pruner(variant.method)
    except (ImportError, AttributeError) as e:
        return f"cannot import {METHODS[variant.method].target}: {type(e).__name__}: {e}"
    unknown, accepted = unknown_options(fn, {k: v for k, v in variant.kwargs.items() if k not in REFINE_OPTIONS})
    accepted += REFINE_OPTIONS
    if unknown:
        return f"{variant.method} does not take {', '.join(unknown)} (it takes {', '.join(accepted)})"
    return None


@dataclass
class BenchRow:
    """One ``(layer, pattern, variant)`` result. ``status``: ``"ok"``, ``"skipped"`` or ``"error"``."""

    layer: str
    pattern: str
    key: str
    label: str
    method: str
    options: dict[str, Any]
    M: int  # rows pruned (after --rows)
    K: int
    num_tokens: int
    full_M: int | None = None  # the layer's rows before --rows
    status: str = "ok"
    note: str = ""
    loss: float | None = None
    sparsity: float | None = None
    time_s: float | None = None  # median over repeats
    times_s: list[float] = field(default_factory=list)
    damp: float | None = None
    vs_sparsegpt: float | None = None  # (loss_SparseGPT − loss) / loss_SparseGPT on the same layer and pattern

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BenchRow":
        fields = dataclasses.fields(cls)
        names = {f.name for f in fields}
        required = {f.name for f in fields if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING}
        missing = required - set(d)
        if missing:
            raise InputError(f"benchmark row lacks {sorted(missing)}; is this a sparsekit bench JSON file?")
        return cls(**{k: v for k, v in d.items() if k in names})


def _jsonable(x: Any) -> Any:
    if isinstance(x, torch.dtype):
        return str(x)
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def run_bench(
    layers: Sequence[Any],
    patterns: Sequence[str] = SEED_PATTERNS,
    methods: Sequence[str | Variant] | None = None,
    device: torch.device | str = "cpu",
    rows: int | None = None,
    repeats: int = 1,
    progress: Callable[[int, int, str], None] | None = None,
    *,
    warmup: int = 0,
    damp: float = DEFAULT_DAMP,
    strict: bool = False,
) -> list[BenchRow]:
    """Prune every layer to every pattern with every variant; one :class:`BenchRow` each.

    Args:
        layers: objects with ``name``, ``weight (M, K)``, ``hessian (K, K)``, ``num_tokens``
            (:class:`sparsekit.data.layers.RealLayer`).
        patterns: pattern names (default the seed's four).
        methods: variant keys / specs (:func:`parse_variant`) or :class:`Variant` (default: all of :data:`VARIANTS`).
        device: where to prune (W and H are moved there, float32).
        rows: prune only the first ``rows`` rows (the seed's "first 32 rows only" tables; rowpair-16 needs a
            multiple of 16, else that pattern is skipped with a note).
        repeats, warmup: timed runs (median reported) and untimed runs before them.
        progress: called with ``(done, total, description)`` after each run.
        damp: passed to every method.
        strict: re-raise a method's exception instead of recording an ``"error"`` row.
    """
    if repeats < 1 or warmup < 0:
        raise InputError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}.")
    if rows is not None and rows < 1:
        raise InputError(f"rows must be >= 1, got {rows}.")
    from sparsekit import prune_weight
    from sparsekit.patterns import get_pattern

    device = torch.device(device)
    variants = [m if isinstance(m, Variant) else parse_variant(m) for m in (methods or list(VARIANTS))]
    status = {v.key: variant_status(v) for v in variants}
    for v in variants:
        if status[v.key]:
            log.info("skipping %s: %s", v.label, status[v.key])
    pat_objs = {get_pattern(p).name if not isinstance(p, str) else p: p for p in patterns}  # fail fast on bad names
    for p in patterns:
        get_pattern(p)
    pats = list(pat_objs)
    total = len(layers) * len(pats) * len(variants)
    done = 0
    out: list[BenchRow] = []
    for lay in layers:
        W = lay.weight[:rows] if rows is not None else lay.weight
        W = W.to(device=device, dtype=torch.float32)  # (M, K)
        H = lay.hessian.to(device=device, dtype=torch.float32)  # (K, K)
        M, K = W.shape
        for pat in pats:
            base = dict(layer=lay.name, pattern=pat, M=M, K=K, num_tokens=int(getattr(lay, "num_tokens", 0)),
                        full_M=int(lay.weight.shape[0]))
            try:
                get_pattern(pat_objs[pat]).resolve(M, K, device="cpu")
                tile_err = None
            except PatternError as e:
                tile_err = f"pattern {pat!r} does not tile {lay.name} ({M}×{K}): {e}"
            for v in variants:
                row = BenchRow(key=v.key, label=v.label, method=v.method, options=_jsonable(v.kwargs), **base)
                done += 1
                if tile_err or status[v.key]:
                    row.status, row.note = "skipped", tile_err or status[v.key]
                else:
                    try:
                        for i in range(warmup + repeats):
                            r = prune_weight(W, H, pat_objs[pat], v.method, damp=damp, **v.kwargs)
                            if i == warmup:
                                row.loss, row.sparsity, row.damp = r.loss, r.sparsity, r.damp
                            if i >= warmup:
                                row.times_s.append(r.time_s)
                            del r
                        row.time_s = statistics.median(row.times_s)
                    except PatternError as e:
                        row.loss = row.sparsity = row.damp = row.time_s = None
                        row.times_s = []
                        row.status, row.note = "skipped", f"{v.label} does not support {pat!r} here: {e}"
                    except Exception as e:  # one failing method must not lose an hour of results
                        if strict:
                            raise
                        row.loss = row.sparsity = row.damp = row.time_s = None
                        row.times_s = []
                        row.status, row.note = "error", f"{type(e).__name__}: {e}"
                        log.warning("%s on %s at %s failed: %s", v.label, lay.name, pat, row.note,
                                    exc_info=not isinstance(e, SparsekitError))
                        if isinstance(e, torch.OutOfMemoryError) and device.type == "cuda":
                            torch.cuda.empty_cache()
                out.append(row)
                if progress is not None:
                    progress(done, total, f"{lay.name} {pat} {v.label}")
            if tile_err:
                log.warning("%s", tile_err)
        del W, H
    _fill_vs_sparsegpt(out)
    return out


def _fill_vs_sparsegpt(rows: list[BenchRow]) -> None:
    ref = {(r.layer, r.pattern): r.loss for r in rows if r.method == "sparsegpt" and not r.options
           and r.status == "ok"}
    for r in rows:
        b = ref.get((r.layer, r.pattern))
        r.vs_sparsegpt = (b - r.loss) / b if (b and r.loss is not None) else None


# ---- aggregation and tables ------------------------------------------------------------------------------
@dataclass
class Agg:
    """A variant on one pattern over all layers: mean loss, total time (one layer: its values)."""

    label: str
    key: str
    status: str
    note: str
    loss: float | None
    sparsity: float | None
    time_s: float | None
    vs_sparsegpt: float | None
    layers: int


def aggregate(rows: Sequence[BenchRow], pattern: str) -> tuple[list[Agg], list[str]]:
    """Per variant on ``pattern``: mean loss and sparsity over the layers, total time, "vs SparseGPT" of the means.

    Layers the pattern does not tile are left out (their notes are returned). A variant skipped or failing on
    every remaining layer keeps its status; failing on some gives ``"partial"`` and aggregates none.
    """
    prs = [r for r in rows if r.pattern == pattern]
    untiled = sorted({r.layer for r in prs if r.status == "skipped" and "does not tile" in r.note})
    notes = [next(r.note for r in prs if r.layer == l and "does not tile" in r.note) for l in untiled]
    prs = [r for r in prs if r.layer not in untiled]
    aggs = []
    for key in dict.fromkeys(r.key for r in prs):
        vr = [r for r in prs if r.key == key]
        ok = [r for r in vr if r.status == "ok"]
        if len(ok) == len(vr) and ok:
            aggs.append(Agg(vr[0].label, key, "ok", "", statistics.fmean(r.loss for r in ok),
                            statistics.fmean(r.sparsity for r in ok), sum(r.time_s for r in ok), None, len(ok)))
        else:
            bad = [r for r in vr if r.status != "ok"]
            st = bad[0].status if not ok else "partial"
            note = bad[0].note if not ok else f"failed on {len(bad)} of {len(vr)} layers: {bad[0].note}"
            aggs.append(Agg(vr[0].label, key, st, note, None, None, None, None, len(ok)))
    base = next((a for a in aggs if a.label == BASELINE and a.loss), None)
    for a in aggs:
        if base is not None and a.loss is not None:
            a.vs_sparsegpt = (base.loss - a.loss) / base.loss
    return aggs, notes


def _pct(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "—"
    return f"{100 * x:+.1f}%".replace("-", "−") if signed else f"{100 * x:.2f}%"


def _time(t: float | None) -> str:
    if t is None:
        return "—"
    if t < 0.1:
        return f"{t:.3f}s"
    if t < 10:
        return f"{t:.2f}s"
    return f"{t:.1f}s" if t < 100 else f"{t:.0f}s"


def _render(header: list[str], body: list[list[str]], fmt: str, bold: int | None = None,
            widths: Sequence[int] | None = None, left: int = 1) -> str:
    """A table in ``fmt`` (rst list-table, md, aligned text; the first ``left`` text columns flush left)."""
    if fmt == "rst":
        lines = [".. list-table::", "   :header-rows: 1"]
        if widths:
            lines.append("   :widths: " + " ".join(map(str, widths)))
        lines.append("")
        for i, row in enumerate([header] + body):
            cells = [f"**{c}**" if (bold is not None and i - 1 == bold and j < 2 and c != "—") else c
                     for j, c in enumerate(row)]
            lines.append(f"   * - {cells[0]}")
            lines += [f"     - {c}" for c in cells[1:]]
        return "\n".join(lines)
    if fmt == "md":
        cells = [[f"**{c}**" if (bold is not None and i == bold and j < 2 and c != "—") else c
                  for j, c in enumerate(r)] for i, r in enumerate(body)]
        return "\n".join(["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
                         + ["| " + " | ".join(r) + " |" for r in cells])
    if fmt == "text":
        rows = [header] + [[c + (" *" if (bold is not None and i == bold and j == 0) else "") for j, c in
                            enumerate(r)] for i, r in enumerate(body)]
        w = [max(len(r[j]) for r in rows) for j in range(len(header))]
        fmt_row = lambda r: "  ".join(c.ljust(w[j]) if j < left else c.rjust(w[j]) for j, c in enumerate(r))
        return "\n".join([fmt_row(rows[0]), "  ".join("-" * x for x in w)] + [fmt_row(r) for r in rows[1:]])
    raise InputError(f"table format must be rst, md or text, got {fmt!r}.")


def heading(title: str, fmt: str, char: str = "-") -> str:
    """A section title in ``fmt`` (``char`` "-" for sections, "^" for subsections)."""
    if fmt == "rst":
        return f"{title}\n{char * len(title)}"
    if fmt == "md":
        return ("### " if char == "^" else "## ") + title
    return f"{title}\n{char * len(title)}"


def _scope_words(rows: Sequence[BenchRow], pattern: str) -> str:
    prs = [r for r in rows if r.pattern == pattern]
    layers = sorted({r.layer for r in prs})
    Ms = sorted({r.M for r in prs})
    what = f"layer {layers[0]} ({prs[0].M}×{prs[0].K})" if len(layers) == 1 else f"mean over {len(layers)} layers"
    limited = any(r.full_M is not None and r.M < r.full_M for r in prs)
    return what + (f", first {Ms[0]} rows only" if len(Ms) == 1 and limited else ", all rows")


def pattern_table(rows: Sequence[BenchRow], pattern: str, fmt: str = "rst") -> str:
    """The seed's per-pattern table: Method, Norm. Loss, Sparsity, Time, vs SparseGPT; best loss in bold."""
    aggs, notes = aggregate(rows, pattern)
    parts = []
    if aggs:
        ok = [a for a in aggs if a.loss is not None]
        best = min(range(len(aggs)), key=lambda i: aggs[i].loss if aggs[i].loss is not None else math.inf)
        body = [[a.label, _pct(a.loss), _pct(a.sparsity).replace(".00%", ".0%") if a.sparsity is not None else "—",
                 _time(a.time_s), _pct(a.vs_sparsegpt, signed=True)] if a.loss is not None else
                [a.label, a.status, "—", "—", "—"] for a in aggs]
        parts.append(_render(["Method", "Norm. Loss", "Sparsity", "Time", "vs SparseGPT"], body, fmt,
                             bold=best if ok else None, widths=(40, 15, 15, 10, 12)))
        skipped = [a for a in aggs if a.loss is None]
        if skipped:
            parts.append("\n".join(f"- {a.label}: {a.status} — {a.note}" for a in skipped))
    parts += [f"- skipped: {n}" for n in notes]
    return "\n\n".join(parts)


def pattern_title(pattern: str) -> str:
    """``"rowpair-16 (reference tables: 16-column, 8-row coupled)"``; the preset name alone if the tables use it."""
    ref = REFERENCE_NAMES.get(pattern)
    return f"{pattern} (reference tables: {ref})" if ref else pattern


def format_tables(rows: Sequence[BenchRow], fmt: str = "rst", per_layer: bool = False) -> str:
    """One section per pattern (the aggregate table; with ``per_layer`` also one table per layer)."""
    out = []
    for pat in dict.fromkeys(r.pattern for r in rows):
        out.append(heading(f"{pattern_title(pat)} — {_scope_words(rows, pat)}", fmt))
        out.append(pattern_table(rows, pat, fmt))
        if per_layer and len({r.layer for r in rows if r.pattern == pat}) > 1:
            for layer in dict.fromkeys(r.layer for r in rows if r.pattern == pat):
                lr = [r for r in rows if r.pattern == pat and r.layer == layer]
                out.append(heading(f"{pat} — {layer} ({lr[0].M}×{lr[0].K})", fmt, "^"))
                out.append(pattern_table(lr, pat, fmt))
    return "\n\n".join(out)


def format_summary(rows: Sequence[BenchRow], fmt: str = "rst") -> str:
    """The seed's summary: per pattern the best method, and the fastest one within 1% of SparseGPT."""
    body = []
    for pat in dict.fromkeys(r.pattern for r in rows):
        aggs = [a for a in aggregate(rows, pat)[0] if a.loss is not None]
        if not aggs:
            body.append([pat, "skipped", "—", "—", "—"])
            continue
        best = min(aggs, key=lambda a: a.loss)
        body.append([pat, best.label, _pct(best.loss), _pct(best.vs_sparsegpt, signed=True), _time(best.time_s)])
        base = next((a for a in aggs if a.label == BASELINE), None)
        if base is not None:
            fast = [a for a in aggs if a.label != BASELINE and a.loss <= FAST_TOLERANCE * base.loss and a is not best
                    and a.time_s < best.time_s]
            if fast:
                f = min(fast, key=lambda a: a.time_s)
                body.append([f"{pat} fast", f.label, _pct(f.loss), _pct(f.vs_sparsegpt, signed=True), _time(f.time_s)])
    return heading("Summary", fmt) + "\n\n" + _render(
        ["Config", "Best Method", "Norm. Loss", "vs SparseGPT", "Time"], body, fmt, widths=(25, 30, 12, 12, 8), left=2)


# ---- JSON and plots --------------------------------------------------------------------------------------
def environment(device: torch.device | str) -> dict[str, Any]:
    """Device name, torch / python versions, date: the provenance a benchmark table needs."""
    import sparsekit

    device = torch.device(device)
    name = platform.processor() or platform.machine()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    return {"device": str(device), "device_name": name, "torch": torch.__version__,
            "python": platform.python_version(), "sparsekit": sparsekit.__version__,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "threads": torch.get_num_threads()}


def write_json(path: str | Path, rows: Sequence[BenchRow], config: dict[str, Any], device: torch.device | str,
               command: str | None = None) -> dict[str, Any]:
    """Write ``{"schema_version", "environment", "command", "config", "rows": [...]}``; returns the document."""
    doc = {"schema_version": SCHEMA_VERSION, "tool": "sparsekit bench", "environment": environment(device),
           "command": command if command is not None else " ".join(sys.argv),
           "config": _jsonable(config), "rows": [r.to_dict() for r in rows]}
    Path(path).write_text(json.dumps(doc, indent=1, allow_nan=False))
    return doc


def read_json(path: str | Path) -> tuple[dict[str, Any], list[BenchRow]]:
    """Read a file of :func:`write_json`: ``(document without rows, rows)``. Refuses other schema versions."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read benchmark JSON {path}: {e}") from e
    v = doc.get("schema_version") if isinstance(doc, dict) else None
    if v != SCHEMA_VERSION:
        raise InputError(f"{path} has schema_version {v!r}; this sparsekit reads version {SCHEMA_VERSION}.")
    rows = [BenchRow.from_dict(r) for r in doc.get("rows", [])]
    return {k: val for k, val in doc.items() if k != "rows"}, rows


def plot_pattern(rows: Sequence[BenchRow], pattern: str, path: str | Path, title: str | None = None) -> bool:
    """PNG of loss vs time (log x) per variant on ``pattern``, SparseGPT marked; False if nothing to draw."""
    aggs = [a for a in aggregate(rows, pattern)[0] if a.loss is not None]
    if not aggs:
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global backend state
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    markers = "osD^v<>pPXh"
    colors = [c for c in (f"C{i}" for i in range(10)) if c != "C3"]  # C3 (red) is SparseGPT's
    for i, a in enumerate(aggs):
        t = max(a.time_s, 1e-4)
        if a.label == BASELINE:
            ax.scatter([t], [100 * a.loss], marker="*", s=260, color="C3", zorder=4, label=a.label)
            ax.axhline(100 * a.loss, color="C3", lw=0.8, ls="--", zorder=1)
        else:
            ax.scatter([t], [100 * a.loss], marker=markers[i % len(markers)], s=40, zorder=3,
                       color=colors[i % len(colors)], label=a.label)
    ax.set_xscale("log")
    ax.set_xlabel("time (s, log scale)")
    ax.set_ylabel("Norm. Loss (%)")
    ax.set_title(title or f"{pattern} — {_scope_words(rows, pattern)}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(str(path))
    return True


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in s)


def write_outputs(out_dir: str | Path, rows: Sequence[BenchRow], config: dict[str, Any], device: torch.device | str,
                  fmt: str = "rst", command: str | None = None) -> list[Path]:
    """``bench.json``, ``tables.<fmt>`` and one ``loss_vs_time_<pattern>.png`` per pattern under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "bench.json"]
    write_json(files[0], rows, config, device, command)
    ext = {"rst": "rst", "md": "md", "text": "txt"}[fmt]
    (out / f"tables.{ext}").write_text(format_tables(rows, fmt) + "\n\n" + format_summary(rows, fmt) + "\n")
    files.append(out / f"tables.{ext}")
    for pat in dict.fromkeys(r.pattern for r in rows):
        p = out / f"loss_vs_time_{_slug(pat)}.png"
        if plot_pattern(rows, pat, p):
            files.append(p)
    return files


def bench_layers(
    model: str = "minilm",
    layers: str | None = None,
    tokens: int | None = None,
    seq_len: int = 128,
    text: str = "mixed",
    shape: Sequence[int] | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    cache_dir: str | Path | None = "default",
    progress: Callable[[int, int], None] | None = None,
) -> list[Any]:
    """Layers for :func:`run_bench`: ``model`` is ``"minilm"``, ``"smollm2"``, a Hugging Face folder / ``.gguf``
    (H collected on ``tokens`` calibration tokens of ``text``, cached), ``"synthetic"`` (the seed-shape generator,
    ``shape=(M, K)``, default ``tokens`` the seed's 244 449) or a ``.safetensors`` file of ``<name>.weight`` /
    ``<name>.hessian`` pairs. ``layers`` filters names (regex or substring)."""
    from sparsekit.data.layers import load_layers, real_layers
    from sparsekit.data.synthetic import SEED_SHAPE, SEED_TOKENS, seed_shape_layer

    if model == "synthetic":
        M, K = shape or SEED_SHAPE
        return [seed_shape_layer(M, K, tokens=tokens if tokens is not None else SEED_TOKENS, seed=seed,
                                 device=device)]
    if shape:
        raise InputError("shape applies to model 'synthetic' only.")
    if model.endswith(".safetensors"):
        return load_layers(model, layers)
    return real_layers(model, text, tokens if tokens is not None else 8192, seq_len, layers, cache_dir, seed=seed,
                       progress=progress)
