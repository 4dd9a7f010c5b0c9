"""Offline calibration and evaluation text (DESIGN.md §7): no dataset hub, only text already on the machine.

Why one file over 500 lines: ten sources share one document model, one hash split (calibration / held-out),
one cache and one tokenisation for calibration; each source's reader is a short function next to the others.

Sources (each a list of *documents*, the unit of the calib/held-out split):

``"stdlib"``
    Docstrings of the Python standard library (modules, classes, functions), read from the ``.py`` sources
    with :mod:`ast` — nothing is imported or executed, so modules with import side effects (``this``,
    ``antigravity``, ``tkinter``, ``idlelib``, ``test.*``) need no special care; those folders are skipped
    anyway. Always present.
``"pydoc"``
    The Python language-reference topics shipped with the standard library (``pydoc_data.topics``: prose
    about the data model, statements, operators), cut into chunks of paragraphs. Always present.
``"docs"``
    Plain-text documentation of Debian packages, if installed (optional)::

        apt-get install --no-install-recommends python3.11-doc debian-handbook

    read from the Sphinx sources of the Python manuals (``/usr/share/doc/python3.*/html/_sources``) and the
    English Debian Administrator's Handbook (``/usr/share/doc/debian-handbook/html/en-US``, tags stripped).
``"manpages"``, ``"debref"``, ``"gcide"``, ``"foldoc"``, ``"jargon"``, ``"devil"``, ``"fortunes"``, ``"licenses"``
    Text of small Debian packages (see :data:`SOURCE_INFO` for the kind of text and the package of each),
    read at run time and never stored in the project::

        apt-get install -y --no-install-recommends manpages debian-reference-en dict-gcide dict-foldoc \
            dict-jargon dict-devil fortunes

    (``licenses`` is ``/usr/share/common-licenses`` of ``base-files``, on every Debian system.) Manual pages
    are converted from troff by :func:`troff_to_text`; dictd dictionaries (``.dict.dz``, gzip-compatible) are
    read whole after their ``00-database-*`` header entries; fortunes are split at their ``%`` lines.
``"mixed"`` (the default)
    The calibration recipe :data:`MIXED_RECIPE`: the available sources among ``stdlib``, ``pydoc``, ``docs``,
    ``manpages``, ``debref``, ``gcide`` interleaved so that every prefix holds characters of each in proportion
    to its weight (until a source runs out): the calibration text dominates what a pruned model fits
    (DESIGN.md §7), so the default must be diverse. ``foldoc``, ``jargon``, ``devil``, ``fortunes`` and
    ``licenses`` are kept out of it: they are the held-out kinds of :func:`heldout_domains`.
a path
    A ``.txt``/``.md``/``.rst`` file, or a folder searched recursively for them.

Determinism and the split: documents are de-duplicated, then ordered by the SHA-1 of their text (a shuffle
that does not depend on the file order), and a document is held out iff ``SHA-1(text) mod 10 == 0``. The split
depends on the document alone, so calibration and held-out sets never overlap, whatever the source mix.

Where the files are: the Debian paths above, under the folder ``$SPARSEKIT_TEXT_ROOT`` (default ``/``), so a
machine without the packages can read a copy (``benchmarks/copy_texts.sh DEST`` copies exactly the files the
sources read, with their paths, into ``DEST``; then ``SPARSEKIT_TEXT_ROOT=DEST``).
"""

from __future__ import annotations

import ast
import glob
import gzip
import hashlib
import html.parser
import json
import logging
import math
import os
import re
import sys
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor

from sparsekit.errors import InputError, MissingTextError

log = logging.getLogger(__name__)

__all__ = [
    "SOURCES",
    "SPLITS",
    "SOURCE_INFO",
    "MIXED_RECIPE",
    "SourceInfo",
    "Domain",
    "text_root",
    "available_sources",
    "calibration_sources",
    "heldout_domains",
    "domain_texts",
    "source_files",
    "text_files",
    "troff_to_text",
    "load_texts",
    "tokenize_for_calibration",
    "text_fingerprint",
    "default_cache_dir",
]

#: named sources; anything else given to :func:`load_texts` is treated as a path
SOURCES = ("stdlib", "pydoc", "docs", "manpages", "debref", "gcide", "foldoc", "jargon", "devil", "fortunes",
           "licenses", "mixed")
#: ``calib`` (9 of 10 documents), ``heldout`` (the other one), ``all``
SPLITS = ("calib", "heldout", "all")
#: one document in this many is held out
HELDOUT_EVERY = 10
#: documents shorter than this many words are dropped (one-line docstrings carry little text)
MIN_WORDS = 8
#: chunk long files into documents of about this many characters (paragraphs are never cut)
CHUNK_CHARS = 2000
#: standard-library folders never read (tests, GUI, deprecated tools, bundled wheels)
_STDLIB_SKIP = {"test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "site-packages",
                "dist-packages", "__pycache__", "pydoc_data", "venv"}
_TEXT_EXT = (".txt", ".md", ".rst")
#: environment variable: a folder holding copies of the Debian files, at their paths (default ``/``)
TEXT_ROOT_ENV = "SPARSEKIT_TEXT_ROOT"


@dataclass(frozen=True)
class SourceInfo:
    """What a named source holds (``kind``) and the Debian package that provides it (``apt``; None: always)."""

    kind: str
    apt: str | None


SOURCE_INFO: dict[str, SourceInfo] = {
    "stdlib": SourceInfo("Python standard-library docstrings", None),
    "pydoc": SourceInfo("Python language reference (pydoc topics)", None),
    "docs": SourceInfo("Python manuals and the Debian Administrator's Handbook", "python3.11-doc debian-handbook"),
    "manpages": SourceInfo("Linux manual pages (system calls, file formats, overviews)", "manpages"),
    "debref": SourceInfo("the Debian Reference (technical manual prose)", "debian-reference-en"),
    "gcide": SourceInfo("general English dictionary definitions (Webster 1913, GCIDE)", "dict-gcide"),
    "foldoc": SourceInfo("encyclopedic computing dictionary (FOLDOC)", "dict-foldoc"),
    "jargon": SourceInfo("hacker slang and folklore (the Jargon File)", "dict-jargon"),
    "devil": SourceInfo("satirical definitions and verse (Bierce, The Devil's Dictionary)", "dict-devil"),
    "fortunes": SourceInfo("quotations, jokes, literature and poems (fortune cookies)", "fortunes"),
    "licenses": SourceInfo("legal text (the common free-software licences)", "base-files"),
}

#: The default calibration (``"mixed"``): source -> weight, the share of characters of each available source in
#: every prefix of the mix. ``gcide`` weighs 2: it is the only general-English source (a pruned model must keep
#: everyday vocabulary); the other kinds weigh 1. Sources not listed here are never calibrated on by default.
MIXED_RECIPE: dict[str, float] = {"stdlib": 1.0, "pydoc": 1.0, "docs": 1.0, "manpages": 1.0, "debref": 1.0,
                                  "gcide": 2.0}


@dataclass(frozen=True)
class Domain:
    """A kind of text to evaluate on: ``load_texts(name, split)``.

    ``in_calibration``: the source is part of the calibration, so only its held-out split (``split="heldout"``)
    is used; otherwise the whole source (``split="all"``) is held out.
    """

    name: str
    kind: str
    in_calibration: bool
    split: str


#: bump when the document extraction changes (invalidates the on-disk text cache)
_TEXT_CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """``$SPARSEKIT_CACHE`` or ``$XDG_CACHE_HOME/sparsekit`` or ``~/.cache/sparsekit`` (not created here)."""
    env = os.environ.get("SPARSEKIT_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sparsekit"


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()


def text_fingerprint(texts: Sequence[str]) -> str:
    """SHA-1 over the documents in order (a cache key for anything computed from ``texts``)."""
    h = hashlib.sha1()
    for t in texts:
        h.update(_sha1(t).encode())
    return h.hexdigest()


def text_root() -> Path:
    """``$SPARSEKIT_TEXT_ROOT`` or ``/``: the Debian text files are read at their paths under this folder."""
    return Path(os.environ.get(TEXT_ROOT_ENV) or "/")


def _rooted(pattern: str) -> list[str]:
    """Sorted regular files (not links) matching ``pattern``, a path relative to :func:`text_root`."""
    return sorted(p for p in glob.glob(str(text_root() / pattern)) if os.path.isfile(p) and not os.path.islink(p))


def _chunk(text: str, target: int = CHUNK_CHARS) -> list[str]:
    """Group blank-line separated paragraphs into documents of at least ``target`` characters."""
    return _group(text.replace("\r\n", "\n").split("\n\n"), target)


def _group(pieces: Iterable[str], target: int = CHUNK_CHARS) -> list[str]:
    """Join consecutive pieces (paragraphs, entries) with blank lines into documents of >= ``target`` chars."""
    out, cur, n = [], [], 0
    for para in pieces:
        para = para.strip("\n")
        if not para.strip():
            continue
        cur.append(para)
        n += len(para)
        if n >= target:
            out.append("\n\n".join(cur))
            cur, n = [], 0
    if cur:
        out.append("\n\n".join(cur))
    return out


def _finalise(docs: Iterable[str]) -> list[str]:
    """Strip, drop short ones, de-duplicate, order by SHA-1 (deterministic shuffle)."""
    seen: dict[str, str] = {}
    for d in docs:
        d = d.strip()
        if len(d.split()) >= MIN_WORDS:
            seen.setdefault(_sha1(d), d)
    return [seen[k] for k in sorted(seen)]


def _in_split(doc: str, split: str) -> bool:
    if split == "all":
        return True
    held = int(_sha1(doc), 16) % HELDOUT_EVERY == 0
    return held if split == "heldout" else not held


# ---- sources ---------------------------------------------------------------------------------------------
def _stdlib_files() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP and not d.startswith("config-"))
        files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    return files


def _docstrings(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError) as e:
        log.debug("skipping %s: %s", path, e)
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return [d for node in ast.walk(tree) if isinstance(node, kinds) and (d := ast.get_docstring(node))]


@lru_cache(maxsize=1)
def _stdlib_docs() -> tuple[str, ...]:
    """All stdlib docstrings, cached in memory and on disk (parsing ~600 files takes seconds)."""
    root = sysconfig.get_paths()["stdlib"]
    key = _sha1(f"{_TEXT_CACHE_VERSION}|{sys.version}|{root}")[:16]
    path = default_cache_dir() / "text" / f"stdlib-docstrings-{key}.json"
    try:
        with open(path, encoding="utf-8") as f:
            docs = json.load(f)
        if isinstance(docs, list) and docs and all(isinstance(d, str) for d in docs):
            return tuple(docs)
        log.warning("ignoring malformed text cache %s", path)
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable text cache %s (%s); re-reading the standard library", path, e)
    docs = _finalise(d for p in _stdlib_files() for d in _docstrings(p))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(docs), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:  # a read-only home is fine: we just re-parse next time
        log.info("could not cache stdlib text at %s: %s", path, e)
    return tuple(docs)


@lru_cache(maxsize=1)
def _pydoc_docs() -> tuple[str, ...]:
    from pydoc_data.topics import topics  # plain data module, no side effects

    return tuple(_finalise(c for name in sorted(topics) for c in _chunk(topics[name])))


class _HTMLText(html.parser.HTMLParser):
    """Visible text of an HTML page (drops script/style/nav), paragraphs separated by blank lines."""

    _BLOCK = {"p", "div", "section", "h1", "h2", "h3", "h4", "li", "pre", "table", "tr", "br", "dt", "dd"}
    _SKIP = {"script", "style", "head", "nav", "header", "footer"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in self._SKIP:
            self._skip += 1
        elif tag in self._BLOCK:
            self.parts.append("\n\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP and self._skip:
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def _read_text_file(path: str) -> str:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        text = f.read()
    if path.endswith((".html", ".htm", ".html.gz")):
        parser = _HTMLText()
        parser.feed(text)
        text = "".join(parser.parts)
        text = "\n\n".join(" ".join(p.split()) for p in text.split("\n\n"))
    return text


def _doc_files() -> list[str]:
    """Text-rich Debian documentation, if installed (see the module docstring for the apt step)."""
    return (_rooted("usr/share/doc/python3*/html/_sources/**/*.txt")
            + _rooted("usr/share/doc/debian-handbook/html/en-US/*.html"))


def _man_files() -> list[str]:
    """The pages of the ``manpages`` package, as its dpkg file list names them (the same set on every machine)."""
    listing = text_root() / "var/lib/dpkg/info/manpages.list"
    try:
        names = listing.read_text(encoding="utf-8").split()
    except OSError:
        return []
    pages = (str(text_root() / n.lstrip("/")) for n in names if re.fullmatch(r"/usr/share/man/man\d/[^/]+\.gz", n))
    return sorted(p for p in pages if os.path.isfile(p) and not os.path.islink(p))


def _dict_files(name: str) -> list[str]:
    """A dictd dictionary: ``NAME.dict.dz`` and its ``NAME.index`` (both needed)."""
    files = _rooted(f"usr/share/dictd/{name}.dict.dz") + _rooted(f"usr/share/dictd/{name}.index")
    return files if len(files) == 2 else []


def _fortune_files() -> list[str]:
    """The English fortune files (no extension; ``ascii-art`` is pictures, not text)."""
    return [p for p in _rooted("usr/share/games/fortunes/*") if "." not in os.path.basename(p)
            and os.path.basename(p) != "ascii-art"]


def _prose_docs(files: Sequence[str]) -> list[str]:
    """Plain text, reStructuredText or HTML pages, cut into paragraph chunks."""
    return [c for p in files for c in _chunk(_read_text_file(p))]


def _man_docs(files: Sequence[str]) -> list[str]:
    docs = []
    for p in files:
        with gzip.open(p, "rt", encoding="utf-8", errors="replace") as f:
            docs += _chunk(troff_to_text(f.read()))
    return docs


_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _dict_number(code: str) -> int:
    """A dictd index number: base 64, most significant digit first."""
    n = 0
    for c in code:
        n = n * 64 + _B64[c]
    return n


def _dict_docs(files: Sequence[str]) -> list[str]:
    """The entries of a dictd dictionary without its ``00-database-*`` header entries, in paragraph chunks."""
    dz, index = files
    with gzip.open(dz, "rb") as f:  # dictzip is gzip-compatible
        data = bytearray(f.read())
    with open(index, encoding="utf-8", errors="replace") as f:
        headers = [line.split("\t") for line in f if line.startswith("00-database") or line.startswith("00database")]
    for _, off, length in sorted(((h[0], _dict_number(h[1]), _dict_number(h[2].strip())) for h in headers
                                  if len(h) == 3), key=lambda h: -h[1]):
        del data[off:off + length]
    return _chunk(data.decode("utf-8", errors="replace"))


def _fortune_docs(files: Sequence[str]) -> list[str]:
    """Fortunes (separated by ``%`` lines) grouped into documents, file by file."""
    docs = []
    for p in files:
        text = _read_text_file(p).replace("\r\n", "\n")
        docs += _group(re.split(r"\n%\n", text))
    return docs


#: file-based sources: name -> (the files it reads, their documents)
_FILE_SOURCES: dict[str, tuple[Callable[[], list[str]], Callable[[Sequence[str]], list[str]]]] = {
    "docs": (lambda: _doc_files(), _prose_docs),
    "manpages": (lambda: _man_files(), _man_docs),
    "debref": (lambda: [p for p in _rooted("usr/share/debian-reference/*.en.html")
                        if os.path.basename(p) != "index.en.html"], _prose_docs),
    "gcide": (lambda: _dict_files("gcide"), _dict_docs),
    "foldoc": (lambda: _dict_files("foldoc"), _dict_docs),
    "jargon": (lambda: _dict_files("jargon"), _dict_docs),
    "devil": (lambda: _dict_files("devil"), _dict_docs),
    "fortunes": (lambda: _fortune_files(), _fortune_docs),
    "licenses": (lambda: _rooted("usr/share/common-licenses/*"), _prose_docs),
}


@lru_cache(maxsize=16)
def _file_docs(files: tuple[str, ...], reader: Callable[[Sequence[str]], list[str]]) -> tuple[str, ...]:
    return tuple(_finalise(reader(files)))


def source_files(name: str) -> list[str]:
    """The files a named file-based source reads on this machine (empty when its package is missing)."""
    return _FILE_SOURCES[name][0]()


def text_files(sources: Sequence[str] | None = None) -> list[str]:
    """Paths, relative to :func:`text_root`, of every file the named sources read here (default: all of them),
    including the ``manpages`` file list: what ``benchmarks/copy_texts.sh`` copies for another machine."""
    root = text_root()
    out = []
    for name in sources if sources is not None else list(_FILE_SOURCES):
        if name not in _FILE_SOURCES:
            continue
        files = source_files(name)
        if name == "manpages" and files:
            files = [str(root / "var/lib/dpkg/info/manpages.list"), *files]
        out += [os.path.relpath(f, root) for f in files]
    return out


def _source_docs(name: str) -> tuple[str, ...]:
    if name == "stdlib":
        return _stdlib_docs()
    if name == "pydoc":
        return _pydoc_docs()
    files, reader = _FILE_SOURCES[name]
    return _file_docs(tuple(files()), reader)


# ---- troff (manual pages) -> plain text ---------------------------------------------------------------------
_TROFF_CHARS = {"em": "\u2014", "en": "\u2013", "aq": "'", "dq": '"', "lq": "\u201c", "rq": "\u201d", "oq": "\u2018",
                "cq": "\u2019", "bu": "\u2022", "co": "\u00a9", "rg": "\u00ae", "hy": "-", "mi": "-", "pl": "+",
                "mu": "\u00d7", "de": "\u00b0", "ti": "~", "ha": "^", "rs": "\\", "sl": "/", "ga": "`", "tm": "\u2122",
                "Tm": "\u2122", "R": "\u00ae", ">=": "\u2265", "<=": "\u2264", "->": "\u2192", "<-": "\u2190"}
_TROFF_ESCAPE = re.compile(
    r"""\\(?:\((?P<two>..)|\[(?P<name>[^\]]*)\]"""       # special characters: \(em \[em]
    r"""|\*(?:\((?P<str2>..)|\[(?P<strn>[^\]]*)\]|(?P<str1>.))"""  # strings: \*(lq \*[R] \*R
    r"""|[fFn](?:\(..|\[[^\]]*\]|.)"""                 # fonts \fB \f(CW, registers \n(xx
    r"""|s[-+]?(?:\(\d\d|\[[^\]]*\]|\d)"""             # sizes \s-1 \s0
    r"""|[hvwlLoDHSxXbCkZNAYmMV]'[^']*'"""            # motions and other escapes with a quoted argument
    r"""|(?P<ch>.))""",
    re.S,
)
_TROFF_ONE = {"-": "-", "e": "\\", "\\": "\\", " ": " ", "~": " ", "0": " ", ".": ".", "'": "'", "`": "`", "t": " "}
_TROFF_ALTERNATING = {"BR", "RB", "IR", "RI", "BI", "IB"}
_TROFF_BREAK = {"PP", "P", "LP", "TP", "TQ", "HP", "IP", "sp", "br", "RS", "RE", "in", "ti", "EX", "EE", "nf", "fi"}


def _troff_escape(m: "re.Match[str]") -> str:
    g = m.groupdict()
    special = g["two"] or g["name"]
    if special is not None:
        return _TROFF_CHARS.get(special, "")
    string = g["str2"] or g["strn"] or g["str1"]
    if string is not None:
        return _TROFF_CHARS.get(string, "")
    ch = g["ch"]
    return "" if ch is None else _TROFF_ONE.get(ch, "")


def troff_to_text(source: str) -> str:
    r"""Plain text of a manual page in troff/man macros: paragraphs separated by blank lines.

    Kept: running text, section headings (``.SH``/``.SS``, as their own paragraphs), the text of font macros
    (``.B``/``.I`` words joined by spaces; ``.BR``-style alternating fonts joined without), ``.IP``/``.TP`` tags,
    no-fill blocks (``.nf``/``.EX``) with their line breaks. Dropped: comments, macro definitions
    (``.de``..``..``), tables (``.TS``..``.TE``), every other request, and font/size/motion escapes; named
    characters become their Unicode character (``\(em`` -> an em dash), unknown ones vanish.
    """
    paras: list[str] = []
    cur: list[str] = []
    nofill = False
    skip_until: str | None = None

    def flush() -> None:
        if cur:
            paras.append(("\n" if nofill else " ").join(cur))
            cur.clear()

    for line in source.replace("\r\n", "\n").split("\n"):
        if skip_until is not None:
            if line.strip().startswith(skip_until):
                skip_until = None
            continue
        line = re.sub(r'\\".*|\\#.*', "", line)  # comments
        m = re.match(r"[.'][ \t]*(\S*)[ \t]*(.*)", line)
        if m is None:
            if line.strip():
                cur.append(line if nofill else line.strip())
            elif not nofill:
                flush()
            continue
        req, rest = m.groups()
        args = [quoted or word for quoted, word in re.findall(r'"([^"]*)"|(\S+)', rest)]
        if req in ("de", "de1", "am", "ig"):
            skip_until = ".."
        elif req == "TS":
            skip_until = ".TE"
        elif req in ("SH", "SS"):
            flush()
            if args:
                paras.append(" ".join(args))
        elif req in ("B", "I", "SM", "SB") and args:
            cur.append(" ".join(args))
        elif req in _TROFF_ALTERNATING:
            cur.append("".join(args))
        elif req in _TROFF_BREAK:
            flush()
            nofill = {"nf": True, "EX": True, "fi": False, "EE": False}.get(req, nofill)
            if req == "IP" and args:
                cur.append(args[0])
    flush()
    out = []
    for p in paras:
        p = _TROFF_ESCAPE.sub(_troff_escape, p)
        p = "\n".join(" ".join(x.split()) for x in p.split("\n")).strip()
        if p:
            out.append(p)
    return "\n\n".join(out)


def _path_docs(path: Path) -> list[str]:
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(_TEXT_EXT))
        if not files:
            raise InputError(f"folder {str(path)!r} has no {'/'.join(_TEXT_EXT)} files; point at your text files.")
    else:
        files = [str(path)]
    docs = []
    for f in files:
        try:
            docs += _chunk(_read_text_file(f))
        except OSError as e:
            raise InputError(f"cannot read text file {f!r}: {e}") from e
    return _finalise(docs)


def available_sources() -> list[str]:
    """The named sources with text on this machine (under :func:`text_root`), in :data:`SOURCES` order."""
    return [s for s in SOURCES[:-1] if (source_files(s) if s in _FILE_SOURCES else _source_docs(s))]


def calibration_sources() -> dict[str, float]:
    """The sources of ``"mixed"`` on this machine with their weights: :data:`MIXED_RECIPE` ∩ available."""
    avail = set(available_sources())
    return {s: w for s, w in MIXED_RECIPE.items() if s in avail}


def heldout_domains(calibration: str = "mixed", available_only: bool = True) -> list[Domain]:
    """The kinds of text to evaluate a model calibrated on ``calibration`` with, in :data:`SOURCES` order.

    A named source the calibration used (``"mixed"``: :func:`calibration_sources`) gives its held-out split;
    every other named source is held out whole. ``available_only``: only the sources present here.
    """
    used = set(MIXED_RECIPE) if calibration == "mixed" else {calibration}
    names = available_sources() if available_only else list(SOURCES[:-1])
    return [Domain(n, SOURCE_INFO[n].kind, n in used, "heldout" if n in used else "all") for n in names]


def domain_texts(domains: Sequence[Domain]) -> dict[str, list[str]]:
    """``{domain name: its documents}`` (:func:`load_texts` with the domain's split)."""
    return {d.name: load_texts(d.name, d.split) for d in domains}


def _missing(source: str) -> MissingTextError:
    info = SOURCE_INFO[source]
    return MissingTextError(
        f"text source {source!r} ({info.kind}) needs the Debian package(s) {info.apt}: apt-get install -y "
        f"--no-install-recommends {info.apt}; or set {TEXT_ROOT_ENV} to a folder holding a copy of its files "
        "(benchmarks/copy_texts.sh DEST); or use 'stdlib', 'pydoc', 'mixed', or a path."
    )


def _interleave(lists: Sequence[Sequence[str]], weights: Sequence[float] | None = None) -> list[str]:
    """Merge sources so that every prefix holds characters of each in proportion to its weight (default 1).

    The next document always comes from the source with the fewest characters emitted so far per unit of
    weight (ties: the earlier source); a source that runs out simply stops contributing.
    """
    w = list(weights) if weights is not None else [1.0] * len(lists)
    pos = [0] * len(lists)
    emitted = [0] * len(lists)
    out = []
    while True:
        live = [i for i, x in enumerate(lists) if pos[i] < len(x)]
        if not live:
            return out
        i = min(live, key=lambda j: (emitted[j] / w[j], j))
        doc = lists[i][pos[i]]
        out.append(doc)
        pos[i] += 1
        emitted[i] += len(doc)


def load_texts(source: str = "mixed", split: str = "calib") -> list[str]:
    """Documents of an offline text source, one side of a fixed calib / held-out split.

    Args:
        source: a named source (:data:`SOURCES`; ``"mixed"``: the :data:`MIXED_RECIPE` of the available ones), or
            the path of a ``.txt``/``.md``/``.rst`` file or of a folder of them.
        split: ``"calib"`` (9 of 10 documents), ``"heldout"`` (the 10th: ``SHA-1(doc) mod 10 == 0``), ``"all"``.

    Returns:
        The documents of that split, in a deterministic order (a new list each call).

    Raises:
        MissingTextError: a named source whose Debian package is missing (the message names it).
        InputError: unknown source or split, missing path, or no text.
    """
    if split not in SPLITS:
        raise InputError(f"split must be one of {SPLITS}, got {split!r}.")
    if source == "mixed":
        recipe = calibration_sources()
        per = [[d for d in _source_docs(s) if _in_split(d, split)] for s in recipe]
        docs = list(dict.fromkeys(_interleave(per, list(recipe.values()))))
    elif source in SOURCE_INFO:
        if source in _FILE_SOURCES and not source_files(source):
            raise _missing(source)
        docs = [d for d in _source_docs(source) if _in_split(d, split)]
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise InputError(
                f"unknown text source {source!r}: not one of {', '.join(SOURCES)} and no such file or folder."
            )
        docs = [d for d in _path_docs(path) if _in_split(d, split)]
    if not docs:
        raise InputError(
            f"text source {source!r} has no documents in split {split!r} (documents need >= {MIN_WORDS} words; "
            "a held-out split needs at least ~10 documents); give more text or use split='all'."
        )
    return docs


def tokenize_for_calibration(
    tokenizer: Any, texts: Sequence[str], num_tokens: int, seq_len: int, seed: int | None = 0
) -> Tensor:
    """``(n_seq, seq_len)`` token ids, ``n_seq = ceil(num_tokens / seq_len)``, cut from the concatenated texts.

    The documents are taken in the given order, cyclically from a start document chosen by ``seed`` (``0`` or
    ``None``: the first; other seeds: a pseudo-random start), so the source balance of :func:`load_texts`'s
    ``"mixed"`` order is kept whatever the seed. They are tokenised without special tokens, joined with the
    tokenizer's end-of-sequence (or separator) token, and cut into consecutive windows. Documents are tokenised
    lazily, only as many as needed, and the windows for fewer tokens are a prefix of those for more (same seed).

    Raises:
        InputError: bad sizes, or fewer than ``n_seq * seq_len`` tokens in all of ``texts``.
    """
    if num_tokens < 1 or seq_len < 1:
        raise InputError(f"num_tokens and seq_len must be >= 1, got {num_tokens} and {seq_len}.")
    if not texts:
        raise InputError("no texts to tokenise; see sparsekit.data.text.load_texts.")
    n_seq = math.ceil(num_tokens / seq_len)
    need = n_seq * seq_len
    start = 0
    if seed:
        start = int(torch.randint(len(texts), (1,), generator=torch.Generator().manual_seed(seed)))
    order = [(start + i) % len(texts) for i in range(len(texts))]
    sep = getattr(tokenizer, "eos_token_id", None)
    if sep is None:
        sep = getattr(tokenizer, "sep_token_id", None)
    ids: list[int] = []
    batch = 32
    for start in range(0, len(order), batch):
        chunk = [texts[i] for i in order[start:start + batch]]
        enc = tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]
        for e in enc:
            ids += e
            if sep is not None:
                ids.append(sep)
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise InputError(
            f"the texts give only {len(ids)} tokens but {n_seq} x {seq_len} = {need} are needed; "
            "use fewer tokens, shorter sequences, or more text (source 'mixed' has the most)."
        )
    return torch.tensor(ids[:need], dtype=torch.long).view(n_seq, seq_len)  # (n_seq, seq_len)
