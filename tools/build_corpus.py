"""Build the embedded default corpus, ``megatron_dsv3/data/corpus.jsonl.gz``.

The text is English prose from Python's own standard library (PSF licence): the docstrings of its
pure-Python modules, and the help topics in ``pydoc_data/topics.py`` (the Language Reference text
that ``help("if")`` prints). Both are read by parsing the source files with :mod:`ast`; nothing is
imported, so no module's import-time side effects run.

Deterministic for a given Python version: files are visited in sorted order, documents are cleaned,
filtered and de-duplicated by fixed rules, shuffled with a fixed seed (Megatron's ``--split`` takes
contiguous document ranges, so an alphabetical order would make the validation set "the last
modules"), and the gzip header carries no time stamp or file name.

Usage (a developer step; the output is committed)::

    python tools/build_corpus.py            # reads the running interpreter's stdlib
    python tools/build_corpus.py --stdlib /path/to/lib/python3.12 --out corpus.jsonl.gz
"""

from __future__ import annotations

import argparse
import ast
import gzip
import json
import random
import re
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

# Top-level stdlib entries that are not library prose: test suites, GUI/demo code, deprecated or
# vendored trees, and installation leftovers.
SKIP_TOP = {
    "__phello__",
    "ensurepip",
    "idlelib",
    "lib2to3",
    "pydoc_data",  # read separately, as help topics
    "site-packages",
    "test",
    "tkinter",
    "turtledemo",
}
# A document is kept when it has at least MIN_CHARS characters, is ASCII after `clean`, and at
# least MIN_PROSE_FRACTION of it is letters, whitespace and . , ; : ' " ( ) -.  All docstrings of
# the 3.12 stdlib together are about 1.4 MB, so the length floor is low (100, not 200: 200 keeps
# 1.31 MB instead of 1.49 MB); the prose fraction is what keeps code and tables out.
MIN_CHARS = 100
MIN_PROSE_FRACTION = 0.9
SHUFFLE_SEED = 1234
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "megatron_dsv3" / "data" / "corpus.jsonl.gz"

_PROSE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ \n.,;:'\"()-")
# The help topics use typographic quotes and dashes; map them to ASCII so they pass the filter.
_TYPOGRAPHIC = str.maketrans(
    {"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'}
    | {"\u2026": "...", "\u2014": "--", "\u2013": "-"}
)
_DOCTEST_LINE = re.compile(r"^\s*(>>>|\.\.\.)( |$)")
_UNDERLINE = re.compile(r'^([*=\-~^"])\1{2,}$')


def stdlib_sources(root: Path) -> list[Path]:
    """The stdlib's ``.py`` files worth reading, sorted by relative path."""
    paths = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts
        if parts[0] in SKIP_TOP or parts[0].startswith("config-"):
            continue
        if any(p in ("test", "tests") or p.startswith("test_") for p in parts):
            continue
        paths.append(path)
    return sorted(paths, key=lambda p: p.relative_to(root).as_posix())


def docstrings(path: Path) -> Iterator[str]:
    """Module, class and function docstrings of one source file, in ``ast.walk`` order."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            text = ast.get_docstring(node, clean=True)
            if text:
                yield text


def help_topics(root: Path) -> Iterator[str]:
    """Sections of the help topics (``pydoc_data/topics.py``), split at reST-style headings.

    Several topics repeat others (``compound`` holds ``if``, ``while`` ...) under a different
    heading underline; :func:`dedup_key` drops the heading so the copies collapse.
    """
    tree = ast.parse((root / "pydoc_data" / "topics.py").read_text(encoding="utf-8"))
    topics: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "topics" for t in node.targets
        ):
            topics = ast.literal_eval(node.value)
    if not topics:
        raise RuntimeError(f"{root / 'pydoc_data' / 'topics.py'}: no `topics = {{...}}` literal found")
    for name in sorted(topics):
        lines = topics[name].splitlines()
        starts = [
            i
            for i in range(len(lines) - 1)
            if lines[i].strip()
            and _UNDERLINE.match(lines[i + 1])
            and len(lines[i + 1]) == len(lines[i])
        ]
        bounds = [0, *starts, len(lines)]
        for a, b in zip(bounds, bounds[1:]):
            section = "\n".join(lines[a:b]).strip()
            if section:
                yield section


def clean(text: str) -> str:
    """ASCII punctuation, no doctest lines, no trailing spaces, at most one blank line in a row."""
    text = text.translate(_TYPOGRAPHIC)
    lines = [line.rstrip() for line in text.splitlines() if not _DOCTEST_LINE.match(line)]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def is_prose(text: str) -> bool:
    """Long enough, ASCII, and mostly letters, spaces and ordinary punctuation (not code)."""
    if len(text) < MIN_CHARS or not text.isascii():
        return False
    return sum(c in _PROSE_CHARS for c in text) / len(text) >= MIN_PROSE_FRACTION


def dedup_key(text: str) -> str:
    """Text without heading underlines, whitespace collapsed: copies that differ only there match."""
    lines = [line for line in text.splitlines() if not _UNDERLINE.match(line.strip())]
    return " ".join(" ".join(lines).split())


def build(root: Path) -> list[str]:
    """The corpus documents, de-duplicated and shuffled with :data:`SHUFFLE_SEED`."""
    candidates: list[str] = []
    for path in stdlib_sources(root):
        candidates.extend(docstrings(path))
    candidates.extend(help_topics(root))
    documents, seen = [], set()
    for raw in candidates:
        text = clean(raw)
        key = dedup_key(text)
        if is_prose(text) and key not in seen:
            seen.add(key)
            documents.append(text)
    random.Random(SHUFFLE_SEED).shuffle(documents)
    return documents


def write(documents: list[str], out: Path) -> bytes:
    """One ``{"text": ...}`` JSON object per line, gzipped with no time stamp; returns the raw bytes."""
    raw = "".join(json.dumps({"text": d}, ensure_ascii=True) + "\n" for d in documents).encode()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:
        with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0, compresslevel=9) as gz:
            gz.write(raw)
    return raw


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--stdlib",
        type=Path,
        default=Path(sysconfig.get_paths()["stdlib"]),
        help="the standard library folder to read (default: this interpreter's)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if not (args.stdlib / "pydoc_data" / "topics.py").is_file():
        parser.error(f"--stdlib {args.stdlib}: no pydoc_data/topics.py, so not a Python standard library")
    documents = build(args.stdlib)
    raw = write(documents, args.out)
    text_chars = sum(len(d) for d in documents)
    print(f"Python {sys.version.split()[0]} stdlib at {args.stdlib}")
    print(
        f"{len(documents)} documents, {text_chars} characters of text, {len(raw)} bytes of JSON "
        f"lines, {args.out.stat().st_size} bytes gzipped -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
