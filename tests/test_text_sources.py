"""The Debian text sources, the calibration recipe and the held-out domains (sparsekit.data.text; issue 16).

Readers are tested on stand-in files under a temporary ``SPARSEKIT_TEXT_ROOT`` (no packages needed); the real
sources are tested where their packages are installed (see the module docstring of sparsekit.data.text).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sparsekit.data import text as T
from sparsekit.errors import InputError, MissingTextError

REPO = Path(__file__).resolve().parents[1]
NAMED = [s for s in T.SOURCES if s != "mixed"]


def _h(docs):
    return {hashlib.sha256(d.encode()).hexdigest() for d in docs}


@pytest.fixture
def root(tmp_path, monkeypatch):
    """An empty text root; the document caches are cleared before and after."""
    monkeypatch.setenv(T.TEXT_ROOT_ENV, str(tmp_path))
    T._file_docs.cache_clear()
    yield tmp_path
    T._file_docs.cache_clear()


def test_troff_to_text():
    page = "\n".join([
        '.\\" a comment line',
        '.TH FOO 7 2024-01-01 "Linux" "Manual"',
        ".SH NAME",
        "foo \\- frobnicate the \\fIbar\\fP device",
        ".SH DESCRIPTION",
        "The",
        ".B foo",
        "interface reads",
        ".BR bar (4)",
        "and writes \\(lqquoted\\(rq text \\(em fast.  \\\" trailing comment",
        ".PP",
        'Second paragraph with \\*(lqstrings\\*(rq, \\s-1SMALL\\s0 and a \\e backslash\\&.',
        ".TP",
        ".I option",
        "Explains the option.",
        ".IP \\(bu 2",
        "A bullet item.",
        ".de XX",
        "this macro body is dropped",
        "..",
        ".TS",
        "l l.",
        "table\tcell",
        ".TE",
        ".nf",
        "line one",
        "  line two",
        ".fi",
        ".SS Subsection",
        "End.",
    ])
    assert T.troff_to_text(page) == "\n\n".join([
        "NAME",
        "foo - frobnicate the bar device",
        "DESCRIPTION",
        "The foo interface reads bar(4) and writes \u201cquoted\u201d text \u2014 fast.",
        "Second paragraph with \u201cstrings\u201d, SMALL and a \\ backslash.",
        "option Explains the option.",
        "\u2022 A bullet item.",
        "line one\nline two",
        "Subsection",
        "End.",
    ])


def _b64(n: int) -> str:
    digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    out = ""
    while True:
        out = digits[n % 64] + out
        n //= 64
        if not n:
            return out


def _write_dict(folder: Path, name: str, entries: list[tuple[str, str]]) -> None:
    """A dictd dictionary: gzip'd body and an index of base-64 offsets and lengths (bytes)."""
    body, index = b"", []
    for head, text in entries:
        data = text.encode()
        index.append(f"{head}\t{_b64(len(body))}\t{_b64(len(data))}")
        body += data
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(folder / f"{name}.dict.dz", "wb") as f:
        f.write(body)
    (folder / f"{name}.index").write_text("\n".join(sorted(index)) + "\n")


def test_dict_reader_drops_the_header_entries(root):
    assert T._dict_number("B") == 1 and T._dict_number("BA") == 64 and T._dict_number("5I") == 57 * 64 + 8
    words = [(f"word{i}", f"word{i}\n   The {i}th entry, with several words of definition text here.\n\n")
             for i in range(300)]
    entries = [("00-database-info", "HEADER licence text that must not appear anywhere\n\n"), *words[:150],
               ("00-database-url", "http://HEADER.example/\n\n"), *words[150:]]
    _write_dict(root / "usr/share/dictd", "jargon", entries)
    docs = T.load_texts("jargon", "all")
    joined = "\n\n".join(docs)
    assert "HEADER" not in joined
    assert all(f"The {i}th entry" in joined for i in range(300))
    assert len(docs) > 10 and all(len(d) < 2 * T.CHUNK_CHARS for d in docs)


def test_fortune_reader_and_missing_packages(root):
    with pytest.raises(MissingTextError, match="apt-get install -y --no-install-recommends fortunes"):
        T.load_texts("fortunes")
    with pytest.raises(MissingTextError, match="dict-gcide"):
        T.load_texts("gcide", "heldout")
    assert issubclass(MissingTextError, InputError)
    assert "fortunes" not in T.available_sources() and not T.text_files()
    folder = root / "usr/share/games/fortunes"
    folder.mkdir(parents=True)
    quotes = [f"Quotation number {i} says something wise about life, work and the rest.\n\t\t-- Author {i}"
              for i in range(200)]
    (folder / "wisdom").write_text("\n%\n".join(quotes[:120]) + "\n%\n")
    (folder / "people").write_text("\n%\n".join(quotes[120:]) + "\n%\n")
    (folder / "wisdom.dat").write_bytes(b"\x00\x01binary")
    (folder / "ascii-art").write_text("\n%\n".join(["  /\\_/\\  ( o.o ) > ^ < a cat picture here now"] * 3))
    docs = T.load_texts("fortunes", "all")
    joined = "\n".join(docs)
    assert all(f"Quotation number {i} says" in joined for i in range(200))
    assert "binary" not in joined and "cat picture" not in joined and "\n%\n" not in joined
    assert "fortunes" in T.available_sources()
    assert sorted(T.text_files(["fortunes"])) == ["usr/share/games/fortunes/people", "usr/share/games/fortunes/wisdom"]


@pytest.mark.parametrize("source", NAMED)
def test_sources_are_deterministic_and_the_split_never_overlaps(source):
    if source not in T.available_sources():
        pytest.skip(f"{source!r} is not installed here ({T.SOURCE_INFO[source].apt})")
    calib, held, everything = (T.load_texts(source, s) for s in ("calib", "heldout", "all"))
    T._file_docs.cache_clear()
    assert T.load_texts(source, "calib") == calib and T.load_texts(source, "heldout") == held  # re-read
    assert not _h(calib) & _h(held)
    assert _h(calib) | _h(held) == _h(everything) and len(_h(everything)) == len(everything)
    assert 0.03 < len(held) / len(everything) < 0.17
    assert all(len(d.split()) >= T.MIN_WORDS for d in held)


def test_interleave_follows_the_weights():
    a, b, c = ["a" * 100] * 200, ["b" * 50] * 400, ["c" * 10] * 50
    mixed = T._interleave([a, b, c], [1.0, 2.0, 1.0])
    assert sorted(mixed) == sorted(a + b + c)
    prefix = mixed[:150]
    chars = {k: sum(len(d) for d in prefix if d[0] == k) for k in "abc"}
    assert abs(chars["b"] / chars["a"] - 2) < 0.1  # weight 2 : 1 in characters
    assert chars["c"] == 500  # c ran out (500 characters) and stopped contributing
    assert T._interleave([a, b]) == T._interleave([a, b], [1.0, 1.0])


def test_domains_and_the_mixed_recipe():
    every = T.heldout_domains(available_only=False)
    assert [d.name for d in every] == NAMED
    out = [d for d in every if not d.in_calibration]
    assert len(out) >= 5 and all(d.split == "all" for d in out)
    assert {d.name for d in out}.isdisjoint(T.MIXED_RECIPE)
    assert all(d.split == "heldout" for d in every if d.in_calibration)
    assert set(T.calibration_sources()) <= set(T.MIXED_RECIPE) & set(T.available_sources())
    only = T.heldout_domains("pydoc", available_only=False)
    assert [d.name for d in only if d.in_calibration] == ["pydoc"]
    mixed = _h(T.load_texts("mixed", "all"))
    for d in T.heldout_domains():
        docs = _h(T.load_texts(d.name, d.split))
        if d.in_calibration:
            assert docs <= mixed and not docs & _h(T.load_texts("mixed", "calib"))
        else:
            assert not docs & mixed, d.name  # a held-out kind never reaches the calibration


def test_mixed_prefix_holds_every_calibration_source_by_weight():
    recipe = T.calibration_sources()
    per = {s: set(T.load_texts(s, "calib")) for s in recipe}
    mixed = T.load_texts("mixed")
    assert set(mixed) == set().union(*per.values())
    prefix = mixed[: 40 * len(recipe)]
    chars = {s: sum(len(d) for d in prefix if d in per[s]) for s in recipe}
    unit = sum(chars.values()) / sum(recipe.values())
    for s, w in recipe.items():
        assert 0.7 < chars[s] / (w * unit) < 1.3, (s, chars)


@pytest.mark.skipif(shutil.which("bash") is None or not T.text_files(), reason="needs the Debian text packages")
def test_copy_texts_gives_the_same_documents_under_the_text_root(tmp_path, monkeypatch):
    dest = tmp_path / "texts"
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(["bash", str(REPO / "benchmarks/copy_texts.sh"), str(dest)], check=True, env=env,
                   capture_output=True)
    names = [s for s in T.available_sources() if s in T._FILE_SOURCES]
    here = {s: T.load_texts(s, "all") for s in names}
    monkeypatch.setenv(T.TEXT_ROOT_ENV, str(dest))
    T._file_docs.cache_clear()
    try:
        assert [s for s in T.available_sources() if s in T._FILE_SOURCES] == names
        assert {s: T.load_texts(s, "all") for s in names} == here
    finally:
        T._file_docs.cache_clear()
