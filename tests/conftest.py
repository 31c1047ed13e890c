"""Offline fixtures: tiny T5-style and GPT-2-style models with tokenizers trained on the fly from the
Python standard library's source (the builders are kdcache's own, shared with --dry-run), saved with
``save_pretrained`` and loaded back through the same code path as hub models; and a small code →
docstring dataset written as JSONL."""

from __future__ import annotations

import ast
import json
import sysconfig
from pathlib import Path

import pytest

from kdcache.dryrun import build_tokenizer, tiny_model

STDLIB = Path(sysconfig.get_paths()["stdlib"])
MODULES = ["textwrap.py", "string.py", "shlex.py", "fnmatch.py", "glob.py", "heapq.py", "bisect.py", "colorsys.py", "calendar.py"]


def stdlib_functions(limit: int = 80) -> list[dict[str, str]]:
    """(function source, first docstring line) pairs from stdlib modules every Python install has."""
    rows = []
    for name in MODULES:
        src = (STDLIB / name).read_text()
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.FunctionDef) and ast.get_docstring(node):
                summary = ast.get_docstring(node).strip().splitlines()[0]
                code = ast.get_source_segment(src, node) or ""
                if len(summary.split()) >= 3:
                    rows.append({"article": code[:600], "highlights": summary, "text": code[:400]})
    return rows[:limit]


def _train_tokenizer(kind: str, vocab_size: int = 400):
    return build_tokenizer([(STDLIB / m).read_text() for m in MODULES], kind, vocab_size)


def _t5(tok, d_model: int, layers: int, seed: int):
    return tiny_model(tok, "t5", d_model, layers, seed)


def _gpt2(tok, d_model: int, layers: int, seed: int):
    return tiny_model(tok, "gpt2", d_model, layers, seed)


def run_cli(args, capsys) -> tuple[int, str, str]:
    """Run the kdcache CLI in-process as a user would; returns (exit code, stdout, stderr)."""
    from cli import main

    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _save(model, tok, path: Path) -> str:
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> dict[str, str]:
    """Paths of four saved models: t5_teacher, t5_student, gpt2_teacher, gpt2_student."""
    root = tmp_path_factory.mktemp("models")
    t5_tok, gpt_tok = _train_tokenizer("t5"), _train_tokenizer("gpt2")
    return {
        "t5_teacher": _save(_t5(t5_tok, 64, 2, 0), t5_tok, root / "t5_teacher"),
        "t5_student": _save(_t5(t5_tok, 32, 1, 1), t5_tok, root / "t5_student"),
        "gpt2_teacher": _save(_gpt2(gpt_tok, 64, 2, 2), gpt_tok, root / "gpt2_teacher"),
        "gpt2_student": _save(_gpt2(gpt_tok, 32, 1, 3), gpt_tok, root / "gpt2_student"),
    }


@pytest.fixture(scope="session")
def dataset_file(tmp_path_factory) -> str:
    """A JSONL file with columns article (code), highlights (its docstring's first line) and text."""
    path = tmp_path_factory.mktemp("data") / "functions.jsonl"
    with path.open("w") as f:
        for row in stdlib_functions(40):
            f.write(json.dumps(row) + "\n")
    return str(path)
