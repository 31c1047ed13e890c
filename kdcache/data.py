"""Datasets (hub names, local files, ``save_to_disk`` folders) → tokenized examples.

One function turns rows into the examples every stage uses, so dump-teacher, train-student and
evaluate agree on exactly which tokens are distilled:

- seq2seq: ``input_ids`` = tokenized ``prefix + input``, ``labels`` = tokenized target;
- causal, text column: ``input_ids`` = the text (+ EOS), every next-token position is distilled:
  ``labels = input_ids[1:]``;
- causal, input + target columns: ``input_ids`` = prompt + completion (+ EOS), only the completion
  is distilled: ``labels = input_ids[-len(completion):]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .errors import KdcacheError, first_line

LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class Columns:
    """Which columns hold the text. ``text`` set → causal text mode; else ``input``/``target``."""

    input: str | None = None
    target: str | None = None
    text: str | None = None

    def needed(self) -> list[str]:
        return [self.text] if self.text else [c for c in (self.input, self.target) if c]


def resolve_columns(task: str, input_column: str | None, target_column: str | None, text_column: str | None) -> Columns:
    """Apply the per-task defaults: seq2seq reads article → highlights (CNN/DailyMail's columns);
    causal reads ``text`` unless given a text column or an input + target pair."""
    if task == "seq2seq":
        if text_column:
            raise KdcacheError("--text-column is for causal models; a seq2seq model needs --input-column and --target-column")
        return Columns(input=input_column or "article", target=target_column or "highlights")
    if text_column:
        if input_column or target_column:
            raise KdcacheError("give either --text-column or --input-column/--target-column, not both")
        return Columns(text=text_column)
    if input_column or target_column:
        if not (input_column and target_column):
            raise KdcacheError("a causal prompt/completion dataset needs both --input-column and --target-column")
        return Columns(input=input_column, target=target_column)
    return Columns(text="text")


DEFAULT_CONFIGS = {"cnn_dailymail": "3.0.0", "abisee/cnn_dailymail": "3.0.0", "code_search_net": "python"}
# Causal text column used when none is given and the dataset has no "text": CodeSearchNet's whole function.
TEXT_COLUMN_FALLBACKS = ("whole_func_string",)


def default_text_column(ds: Any, columns: Columns) -> Columns:
    """Columns with the causal default ``text`` replaced by a known column of the dataset when it has
    no ``text`` (CodeSearchNet: ``whole_func_string``)."""
    if columns.text == "text" and "text" not in ds.column_names:
        for name in TEXT_COLUMN_FALLBACKS:
            if name in ds.column_names:
                return Columns(text=name)
    return columns


def load_rows(dataset: str, config: str | None = None, split: str = "train", limit: int | None = None,
              cache_dir: str | None = None):
    """Load a ``datasets.Dataset`` from a built-in corpus (``builtin:NAME``), a local file, a
    ``save_to_disk`` folder, or the hub."""
    import datasets

    from . import corpora

    if not _is_tty():
        datasets.disable_progress_bars()
    p = Path(dataset).expanduser()
    try:
        if dataset.startswith("builtin:"):
            ds = datasets.Dataset.from_list(corpora.rows(dataset.removeprefix("builtin:"), split))
        elif p.is_file():
            builder = LOCAL_BUILDERS.get(p.suffix.lower())
            if builder is None:
                raise KdcacheError(f"unsupported dataset file {dataset}: use .json, .jsonl, .csv or .parquet")
            ds = datasets.load_dataset(builder, data_files=str(p), split="train", cache_dir=cache_dir)
        elif p.is_dir():
            loaded = datasets.load_from_disk(str(p))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise KdcacheError(f"dataset {dataset} has no split {split!r} (splits: {', '.join(loaded)})")
                loaded = loaded[split]
            ds = loaded
        elif dataset.startswith((".", "/", "~")) or dataset.count("/") > 1:
            raise KdcacheError(f"dataset path {dataset} does not exist")
        else:
            ds = datasets.load_dataset(dataset, config or DEFAULT_CONFIGS.get(dataset), split=split, cache_dir=cache_dir)
    except KdcacheError:
        raise
    except Exception as exc:  # datasets raises many types (FileNotFoundError, ConnectionError, ValueError...)
        raise KdcacheError(f"cannot load dataset {dataset!r}: {first_line(exc)}") from exc
    if len(ds) == 0:
        raise KdcacheError(f"dataset {dataset} (split {split!r}) is empty")
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return ds


def dataset_fingerprint(ds: Any) -> str | None:
    return getattr(ds, "_fingerprint", None)


def check_columns(ds: Any, columns: Columns, dataset: str) -> None:
    missing = [c for c in columns.needed() if c not in ds.column_names]
    if missing:
        raise KdcacheError(
            f"dataset {dataset} has no column {', '.join(repr(m) for m in missing)} "
            f"(columns: {', '.join(ds.column_names)})"
        )


@dataclass
class Tokenized:
    """Examples ready for a model, plus what was done to get them (never silent)."""

    input_ids: list[np.ndarray] = field(default_factory=list)  # each (n_in,) int64
    labels: list[np.ndarray] = field(default_factory=list)  # each (n,) int64
    prompts: list[str] = field(default_factory=list)  # the raw input text (evaluate's prompt)
    references: list[str] = field(default_factory=list)  # the raw target text ("" in text mode)
    rows: list[int] = field(default_factory=list)  # dataset row of each example
    truncated_inputs: int = 0
    truncated_targets: int = 0
    skipped_empty: int = 0

    def __len__(self) -> int:
        return len(self.labels)

    def report(self) -> dict[str, int]:
        return {
            "truncated_inputs": self.truncated_inputs,
            "truncated_targets": self.truncated_targets,
            "skipped_empty": self.skipped_empty,
        }


def _is_tty() -> bool:
    import sys

    return sys.stderr.isatty()


def _encode(tok: Any, texts: list[str], max_length: int, special: bool) -> tuple[list[list[int]], int]:
    """Tokenize; texts longer than ``max_length`` are re-encoded with truncation (so the tokenizer
    keeps its own end-of-sequence convention) and counted."""
    ids = tok(texts, add_special_tokens=special)["input_ids"]
    n_trunc = 0
    for i, seq in enumerate(ids):
        if len(seq) > max_length:
            ids[i] = tok(texts[i], add_special_tokens=special, truncation=True, max_length=max_length)["input_ids"]
            n_trunc += 1
    return ids, n_trunc


def tokenize(
    ds: Any,
    tok: Any,
    task: str,
    columns: Columns,
    *,
    prefix: str = "",
    max_input_length: int = 512,
    max_target_length: int = 128,
    max_seq_length: int | None = None,
    batch: int = 1000,
    desc: str = "tokenizing",
) -> Tokenized:
    """Rows → :class:`Tokenized`. Examples with nothing to distill (e.g. an empty target) are skipped
    and counted; truncation is counted per side."""
    out = Tokenized()
    eos = tok.eos_token_id
    for start in tqdm(range(0, len(ds), batch), desc=desc, unit="batch", disable=None, leave=False):
        rows = ds[start : start + batch]
        n = len(next(iter(rows.values())))
        if columns.text:
            texts = ["" if t is None else str(t) for t in rows[columns.text]]
            ids, trunc = _encode(tok, texts, max_seq_length or max_input_length, special=True)
            out.truncated_inputs += trunc
            for j, seq in enumerate(ids):
                if eos is not None and len(seq) < (max_seq_length or max_input_length) and (not seq or seq[-1] != eos) and texts[j]:
                    seq = seq + [eos]
                if len(seq) < 2 or not texts[j].strip():
                    out.skipped_empty += 1
                    continue
                out.input_ids.append(np.asarray(seq, dtype=np.int64))
                out.labels.append(np.asarray(seq[1:], dtype=np.int64))
                out.prompts.append(texts[j])
                out.references.append("")
                out.rows.append(start + j)
            continue
        inputs = ["" if t is None else str(t) for t in rows[columns.input]]
        targets = ["" if t is None else str(t) for t in rows[columns.target]]
        if task == "seq2seq":
            src, t_in = _encode(tok, [prefix + x for x in inputs], max_input_length, special=True)
            tgt, t_out = _encode(tok, targets, max_target_length, special=True)
        else:
            src, t_in = _encode(tok, [prefix + x for x in inputs], max_input_length, special=True)
            # The completion ends with EOS so a distilled model learns where to stop.
            tgt, t_out = _encode(tok, targets, max_target_length - (eos is not None), special=False)
            tgt = [t + [eos] if eos is not None and t else t for t in tgt]
        out.truncated_inputs += t_in
        out.truncated_targets += t_out
        for j in range(n):
            if task == "seq2seq":
                seq, lab = src[j], tgt[j]
            else:
                seq = src[j] + tgt[j]
                if max_seq_length and len(seq) > max_seq_length:
                    seq = seq[:max_seq_length]
                    out.truncated_targets += 1
                n_lab = len(seq) - len(src[j]) if src[j] else len(seq) - 1  # the first token has no context
                lab = seq[len(seq) - n_lab :] if n_lab > 0 else []
            if len(lab) == 0 or not targets[j].strip():
                out.skipped_empty += 1
                continue
            out.input_ids.append(np.asarray(seq, dtype=np.int64))
            out.labels.append(np.asarray(lab, dtype=np.int64))
            out.prompts.append(inputs[j])
            out.references.append(targets[j])
            out.rows.append(start + j)
    if len(out) == 0:
        raise KdcacheError(f"no example has anything to distill after tokenization ({out.skipped_empty} empty)")
    return out
