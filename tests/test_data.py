"""Datasets from local files and folders, column handling, truncation accounting."""

import json

import datasets
import pytest
from transformers import AutoTokenizer

from kdcache.data import check_columns, load_rows, resolve_columns, tokenize
from kdcache.errors import KdcacheError


def test_local_formats_load_alike(dataset_file, tmp_path):
    rows = [json.loads(line) for line in open(dataset_file)]
    ds = datasets.Dataset.from_list(rows)
    ds.to_csv(str(tmp_path / "d.csv"))
    ds.to_parquet(str(tmp_path / "d.parquet"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(3))}).save_to_disk(str(tmp_path / "saved"))
    for spec, split, n in [(dataset_file, "train", 40), (str(tmp_path / "d.csv"), "train", 40),
                           (str(tmp_path / "d.parquet"), "train", 40), (str(tmp_path / "saved"), "test", 3)]:
        got = load_rows(spec, split=split)
        assert len(got) == n and got[0]["highlights"] == rows[0]["highlights"]
    assert len(load_rows(dataset_file, limit=5)) == 5


def test_load_refusals(tmp_path):
    with pytest.raises(KdcacheError, match="does not exist"):
        load_rows(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(KdcacheError):
        load_rows(str(tmp_path / "empty.jsonl"))
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(KdcacheError, match="unsupported dataset file"):
        load_rows(str(tmp_path / "d.txt"))


def test_columns(dataset_file):
    assert resolve_columns("seq2seq", None, None, None).needed() == ["article", "highlights"]
    assert resolve_columns("causal", None, None, None).needed() == ["text"]
    assert resolve_columns("causal", "a", "b", None).needed() == ["a", "b"]
    with pytest.raises(KdcacheError, match="text-column is for causal"):
        resolve_columns("seq2seq", None, None, "text")
    with pytest.raises(KdcacheError, match="needs both"):
        resolve_columns("causal", "a", None, None)
    ds = load_rows(dataset_file)
    with pytest.raises(KdcacheError, match=r"no column 'summary' \(columns: article, highlights, text\)"):
        check_columns(ds, resolve_columns("seq2seq", None, "summary", None), dataset_file)


def test_truncation_and_empty_rows_are_counted(models_dir):
    tok = AutoTokenizer.from_pretrained(models_dir["t5_teacher"])
    ds = datasets.Dataset.from_list([
        {"article": "word " * 300, "highlights": "short summary here"},
        {"article": "fine input", "highlights": ""},
        {"article": "fine input", "highlights": "token " * 100},
    ])
    out = tokenize(ds, tok, "seq2seq", resolve_columns("seq2seq", None, None, None), max_input_length=32, max_target_length=16)
    assert (out.truncated_inputs, out.truncated_targets, out.skipped_empty) == (1, 1, 1)
    assert len(out) == 2 and out.rows == [0, 2]
    assert len(out.input_ids[0]) == 32 and out.input_ids[0][-1] == tok.eos_token_id  # truncation keeps </s>
    assert len(out.labels[1]) == 16
