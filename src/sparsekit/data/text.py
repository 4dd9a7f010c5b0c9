"""Offline calibration and evaluation text (DESIGN.md §7): no dataset hub, only text already on the machine.

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
``"mixed"`` (the default)
    All available sources interleaved so that every prefix holds about as many characters of each source
    (until the smallest runs out): the calibration text dominates what a pruned model fits (DESIGN.md §7),
    so the default must be diverse.
a path
    A ``.txt``/``.md``/``.rst`` file, or a folder searched recursively for them.

Determinism and the split: documents are de-duplicated, then ordered by the SHA-1 of their text (a shuffle
that does not depend on the file order), and a document is held out iff ``SHA-1(text) mod 10 == 0``. The split
depends on the document alone, so calibration and held-out sets never overlap, whatever the source mix.
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
import sys
import sysconfig
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor

from sparsekit.errors import InputError

log = logging.getLogger(__name__)

__all__ = [
    "SOURCES",
    "SPLITS",
    "available_sources",
    "load_texts",
    "tokenize_for_calibration",
    "text_fingerprint",
    "default_cache_dir",
]

#: named sources; anything else given to :func:`load_texts` is treated as a path
SOURCES = ("stdlib", "pydoc", "docs", "mixed")
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


def _chunk(text: str, target: int = CHUNK_CHARS) -> list[str]:
    """Group blank-line separated paragraphs into documents of at least ``target`` characters."""
    out, cur, n = [], [], 0
    for para in text.replace("\r\n", "\n").split("\n\n"):
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
    files: list[str] = []
    for d in sorted(glob.glob("/usr/share/doc/python3*/html/_sources")):
        files += sorted(glob.glob(os.path.join(d, "**", "*.txt"), recursive=True))
    files += sorted(glob.glob("/usr/share/doc/debian-handbook/html/en-US/*.html"))
    return files


@lru_cache(maxsize=1)
def _debian_docs() -> tuple[str, ...]:
    return tuple(_finalise(c for p in _doc_files() for c in _chunk(_read_text_file(p))))


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


_NAMED = {"stdlib": _stdlib_docs, "pydoc": _pydoc_docs, "docs": _debian_docs}


def available_sources() -> list[str]:
    """The named sources with at least one document on this machine (``docs`` needs the apt step)."""
    return [s for s in ("stdlib", "pydoc") if _NAMED[s]()] + (["docs"] if _doc_files() else [])


def _interleave(lists: Sequence[Sequence[str]]) -> list[str]:
    """Merge sources so that every prefix holds about the same number of characters of each.

    The next document always comes from the source with the fewest characters emitted so far (ties: the
    earlier source); a source that runs out simply stops contributing.
    """
    pos = [0] * len(lists)
    emitted = [0] * len(lists)
    out = []
    while True:
        live = [i for i, x in enumerate(lists) if pos[i] < len(x)]
        if not live:
            return out
        i = min(live, key=lambda j: (emitted[j], j))
        doc = lists[i][pos[i]]
        out.append(doc)
        pos[i] += 1
        emitted[i] += len(doc)


def load_texts(source: str = "mixed", split: str = "calib") -> list[str]:
    """Documents of an offline text source, one side of a fixed calib / held-out split.

    Args:
        source: ``"stdlib"``, ``"pydoc"``, ``"docs"``, ``"mixed"`` (all available, interleaved), or the path of a
            ``.txt``/``.md``/``.rst`` file or of a folder of them.
        split: ``"calib"`` (9 of 10 documents), ``"heldout"`` (the 10th: ``SHA-1(doc) mod 10 == 0``), ``"all"``.

    Returns:
        The documents of that split, in a deterministic order (a new list each call).

    Raises:
        InputError: unknown source or split, missing path, or no text.
    """
    if split not in SPLITS:
        raise InputError(f"split must be one of {SPLITS}, got {split!r}.")
    if source == "mixed":
        per = [list(_NAMED[s]()) for s in available_sources()]
        docs = list(dict.fromkeys(_interleave([[d for d in p if _in_split(d, split)] for p in per])))
    elif source in _NAMED:
        if source == "docs" and not _doc_files():
            raise InputError(
                "text source 'docs' needs Debian documentation: apt-get install --no-install-recommends "
                "python3.11-doc debian-handbook (or use 'stdlib', 'pydoc', 'mixed', or a path)."
            )
        docs = [d for d in _NAMED[source]() if _in_split(d, split)]
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
