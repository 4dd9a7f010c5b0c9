"""The command line (``sparsekit``, ``python -m sparsekit``): help texts, ``env``, argument errors, what a run
refuses and writes; and the promise that importing sparsekit never initialises CUDA."""

from __future__ import annotations

import importlib.metadata
import os
import stat
import subprocess
import sys

import pytest

from sparsekit.cli import COMMANDS, build_parser, main
from sparsekit.pipeline import REPORT_FILE, LayerReport, ModelReport


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_every_command_is_registered_and_has_help(capsys) -> None:
    text = _help(capsys)
    for cmd in ("prune", "eval", "export", "bench", "env"):
        assert cmd in text
    assert len(COMMANDS) == 4  # prune, eval, export, bench; env lives in cli/__init__
    assert "--overwrite" in _help(capsys, "prune")
    assert "MODEL_DIR" in _help(capsys, "eval")
    assert "--format" in _help(capsys, "export")


def test_bench_help_names_the_reference_tables(capsys) -> None:
    text = " ".join(_help(capsys, "bench").split())
    assert "the seed's" not in text
    assert "benchmark-results.rst" in text and "4:8" in text and "16-column, 8-row coupled" in text


def test_env_prints_versions(capsys) -> None:
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    lines = {ln.split()[0]: ln.split(None, 1)[1] for ln in out.splitlines() if ln.strip()}
    import torch

    assert lines["torch"] == torch.__version__
    for dist in ("transformers", "matplotlib"):
        try:
            want = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            want = "not installed (pip install 'sparsekit[hf]')"
        assert lines[dist] == want


@pytest.mark.parametrize(
    "argv, message",
    [
        (["prune", "--tokens", "many"], "invalid int value"),
        (["prune", "--sequential", "sideways"], "invalid choice"),
        (["frobnicate"], "invalid choice"),
        (["bench", "--format", "html"], "invalid choice"),
    ],
)
def test_argument_errors_exit_2_with_a_message(capsys, argv, message) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_typed_errors_print_error_and_return_2(capsys, tmp_path) -> None:
    assert main(["prune", "--pattern", "7:3", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "7:3" in err
    assert not (tmp_path / "o").exists()


def test_prune_refuses_to_overwrite_a_finished_job(capsys, tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / REPORT_FILE).write_text("{}")
    # refused before any model is loaded (the model path does not even exist)
    assert main(["prune", "--model", str(tmp_path / "nope"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and str(out) in err
    assert (out / REPORT_FILE).read_text() == "{}"
    # with --overwrite the run goes on (and fails later, on the missing model)
    assert main(["prune", "--model", str(tmp_path / "nope"), "--out", str(out), "--overwrite"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_summary_prints_losses_as_percent() -> None:
    rep = ModelReport(model="M", blocks_path="layers", num_blocks=1, config={}, calibration={})
    rep.layers = [LayerReport("layers.0.q", 0, (8, 8), "2:4", "sparsegpt", "pruned", loss=0.0984),
                  LayerReport("layers.0.k", 0, (8, 8), "2:4", "sparsegpt", "pruned", loss=0.1016)]
    text = rep.format_table()
    assert "9.84%" in text and "10.16%" in text and "mean loss 10.0%" in text
    assert rep.mean_loss == pytest.approx(0.1)


def test_saved_weights_are_world_readable(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    from sparsekit.pipeline import save_pruned

    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2)
    out = save_pruned(transformers.LlamaForCausalLM(cfg), tmp_path / "m", ModelReport("M", "layers", 1, {}, {}))
    umask = os.umask(0o022)
    os.umask(umask)
    weights = list(out.glob("*.safetensors"))
    assert weights
    for f in [*weights, out / REPORT_FILE]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f


def test_python_dash_m_sparsekit_runs_the_cli() -> None:
    r = subprocess.run([sys.executable, "-m", "sparsekit", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "usage: " in r.stdout and "prune" in r.stdout


def test_parser_builds_without_importing_heavy_packages() -> None:
    """Building the parser (every subcommand) needs neither transformers nor matplotlib."""
    code = ("import sys; from sparsekit.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('transformers', 'matplotlib') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
    assert build_parser().prog  # and here, in-process


_NO_CUDA = r"""
import importlib, pkgutil, sys
import torch

def refuse(*a, **k):
    raise AssertionError("CUDA initialised at import")

torch.cuda._lazy_init = refuse
import sparsekit
names = []
for m in pkgutil.walk_packages(sparsekit.__path__, "sparsekit."):
    if m.name == "sparsekit.__main__":
        continue  # running it is the CLI, not an import
    importlib.import_module(m.name)
    names.append(m.name)
assert not torch.cuda.is_initialized()
print(len(names))
"""


def test_importing_sparsekit_and_every_submodule_never_initialises_cuda() -> None:
    r = subprocess.run([sys.executable, "-c", _NO_CUDA], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.strip()) >= 30  # every module was imported (pipeline/, cli/, pruners/, kernels/, data/)


#: layers of the package, top (cli) to bottom (errors); a module imports only its own layer or lower ones
_LAYERS = {"cli": 5, "__main__": 5, "pipeline": 4, "bench": 4, "evaluate": 4, "data": 4, "compact": 4, "sparsekit": 4, "api": 3, "regularize": 3,
           "pruners": 2, "refine": 2, "parallel": 2, "patterns": 1, "hessian": 1, "metrics": 1, "memory": 1, "kernels": 1,
           "coupling": 1,
           "errors": 0}


def _import_graph() -> dict[str, set[str]]:
    """Top-level unit (``pipeline``, ``api``, ...; ``sparsekit`` for the package's ``__init__``) -> units it imports."""
    import ast
    from pathlib import Path

    import sparsekit

    root = Path(sparsekit.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).with_suffix("").parts
        unit = "sparsekit" if rel == ("__init__",) else rel[0]
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                parts = name.split(".")
                if parts[0] == "sparsekit":
                    target = parts[1] if len(parts) > 1 else "sparsekit"
                    if target != unit:
                        graph.setdefault(unit, set()).add(target)
    return graph


def test_imports_point_down_and_have_no_cycle() -> None:
    graph = _import_graph()
    assert set(graph) | {t for ts in graph.values() for t in ts} <= set(_LAYERS)
    upward = [(a, b) for a, bs in graph.items() for b in bs if _LAYERS[b] > _LAYERS[a]]
    assert not upward
    seen: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(u: str, path: list[str]) -> None:
        assert seen.get(u) != 1, f"import cycle: {' -> '.join(path + [u])}"
        if seen.get(u) == 2:
            return
        seen[u] = 1
        for v in sorted(graph.get(u, ())):
            visit(v, path + [u])
        seen[u] = 2

    for u in sorted(graph):
        visit(u, [])
    assert "pipeline" not in graph.get("evaluate", set())  # the old evaluate <-> pipeline cycle
