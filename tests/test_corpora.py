"""Built-in corpora from the standard library: deterministic module splits, CodeSearchNet-like filters."""

import ast

import pytest

from kdcache import corpora
from kdcache.data import load_rows
from kdcache.errors import KdcacheError


def test_split_by_module_is_disjoint_deterministic_and_hash_based():
    by_split = {s: {r["module"] for r in corpora.rows("python-code", s)} for s in corpora.SPLITS}
    assert all(by_split.values())
    assert not (by_split["train"] & by_split["validation"] or by_split["train"] & by_split["test"] or by_split["validation"] & by_split["test"])
    assert all(corpora.split_of(m) == s for s, mods in by_split.items() for m in mods)
    assert corpora.split_of("json/decoder.py") == corpora.split_of("json/decoder.py")
    total = sum(len(m) for m in by_split.values())
    assert 0.8 < len(by_split["train"]) / total < 0.97
    for m in set().union(*by_split.values()):
        parts = m.split("/")
        assert not {"test", "tests", "idle_test"} & set(parts[:-1]) and not parts[-1].startswith("test_"), m


def test_code_pieces_cover_modules_in_order():
    rows = corpora.rows("python-code", "validation")
    first_module = rows[0]["module"]
    pieces = [r["text"] for r in rows if r["module"] == first_module]
    assert "".join(pieces).strip() == (corpora.stdlib_root() / first_module).read_text().strip()
    assert max(len(p) for p in pieces) < 4 * corpora.CHUNK_CHARS


def test_docstring_pairs_have_the_docstring_removed_and_are_filtered():
    rows = corpora.rows("python-docstrings", "test")
    assert len(rows) > 50
    codes = [r["code"] for r in rows]
    assert len(codes) == len(set(codes))  # de-duplicated
    for r in rows[:200]:
        assert len(r["docstring"].split()) >= 3 and len(r["docstring"]) <= corpora.MAX_DOC_CHARS
        fn = ast.parse(__import__("textwrap").dedent(r["code"])).body[0]
        first = fn.body[0]
        # the function's first statement is no longer its docstring
        assert not (isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant)
                    and isinstance(first.value.value, str) and " ".join(first.value.value.split()).startswith(r["docstring"][:20]))


def test_builtin_datasets_load_through_the_dataset_path():
    ds = load_rows("builtin:python-docstrings", split="validation", limit=7)
    assert len(ds) == 7 and {"code", "docstring", "module", "name"} <= set(ds.column_names)
    again = load_rows("builtin:python-docstrings", split="validation", limit=7)
    assert ds._fingerprint == again._fingerprint  # so a resumed dump accepts it
    with pytest.raises(KdcacheError, match="unknown built-in corpus"):
        load_rows("builtin:nope")
    with pytest.raises(KdcacheError, match="no split"):
        load_rows("builtin:python-code", split="dev")
