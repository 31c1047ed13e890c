"""Built-in corpora from the running interpreter's standard library: real code, no download.

``builtin:python-code``: source text of non-test modules, cut at line boundaries into pieces of about
``CHUNK_CHARS`` characters (column ``text``; causal LM). ``builtin:python-docstrings``: a function's
source with its docstring removed (column ``code``) → the docstring's first paragraph (column
``docstring``), filtered like CodeSearchNet: at least 3 words, bounded lengths, de-duplicated.

Splits are by module: sha256 of the module's path relative to the standard library decides, so no module
is in two splits and the split does not depend on file order or on the Python version.
"""

from __future__ import annotations

import ast
import hashlib
import sysconfig
from functools import lru_cache
from pathlib import Path

from .errors import KdcacheError

NAMES = ("python-code", "python-docstrings")
SPLITS = ("train", "validation", "test")
CHUNK_CHARS = 384  # ≈ 110 tokens of the quickstart tokenizer: sequences fit its 128-token context
MAX_CODE_CHARS = 4000
MAX_DOC_CHARS = 400
TEST_DIRS = {"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(module_path: str) -> str:
    """90 / 5 / 5 split by a hash of the module's relative path."""
    bucket = int(hashlib.sha256(module_path.encode()).hexdigest(), 16) % 100
    return "train" if bucket < 90 else "validation" if bucket < 95 else "test"


@lru_cache(maxsize=1)
def _modules() -> tuple[tuple[str, str], ...]:
    """(relative path, source) of every non-test module of the standard library, sorted by path."""
    root = stdlib_root()
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if TEST_DIRS & set(rel.parts[:-1]) or rel.name.startswith("test_") or rel.parts[0].startswith(("test", "lib2to3")):
            continue
        try:
            out.append((rel.as_posix(), path.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            continue
    return tuple(out)


def _chunks(source: str, size: int) -> list[str]:
    """Cut at line boundaries into pieces of about ``size`` characters (a longer single line stays whole)."""
    pieces, current, length = [], [], 0
    for line in source.splitlines(keepends=True):
        if current and length + len(line) > size:
            pieces.append("".join(current))
            current, length = [], 0
        current.append(line)
        length += len(line)
    if current and "".join(current).strip():
        pieces.append("".join(current))
    return pieces


def _strip_docstring(src: str, node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    """The function's source without its docstring statement (line-based, on the function's own text)."""
    lines = src.splitlines(keepends=True)
    doc = node.body[0]
    start, end = node.lineno - 1, node.end_lineno
    if node.decorator_list:
        start = node.decorator_list[0].lineno - 1
    body = lines[start : doc.lineno - 1] + lines[doc.end_lineno : end]
    return "".join(body)


def _docstring_rows(rel: str, src: str) -> list[dict[str, str]]:
    try:
        tree = ast.parse(src)
    except SyntaxError:
        return []
    rows = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        if not doc or len(node.body) < 2:  # a function that is only a docstring has no code to describe
            continue
        summary = " ".join(doc.strip().split("\n\n")[0].split())
        code = _strip_docstring(src, node)
        if len(summary.split()) < 3 or len(summary) > MAX_DOC_CHARS or len(code) > MAX_CODE_CHARS:
            continue
        rows.append({"code": code, "docstring": summary, "module": rel, "name": node.name})
    return rows


def rows(name: str, split: str) -> list[dict[str, str]]:
    """The rows of built-in corpus ``name`` for ``split``, in a deterministic order."""
    if name not in NAMES:
        raise KdcacheError(f"unknown built-in corpus {name!r} (available: {', '.join('builtin:' + n for n in NAMES)})")
    if split not in SPLITS:
        raise KdcacheError(f"built-in corpus {name!r} has no split {split!r} (splits: {', '.join(SPLITS)})")
    out: list[dict[str, str]] = []
    seen: set[str] = set()
    for rel, src in _modules():
        if split_of(rel) != split:
            continue
        if name == "python-code":
            out.extend({"text": piece, "module": rel} for piece in _chunks(src, CHUNK_CHARS))
            continue
        for row in _docstring_rows(rel, src):
            key = hashlib.sha256(row["code"].encode()).hexdigest()
            if key not in seen:
                seen.add(key)
                out.append(row)
    return out
