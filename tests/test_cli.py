"""The three commands end to end, through the CLI, for a seq2seq and a causal pair; and refusals."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli as run
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from cli import main

REPO = Path(__file__).resolve().parents[1]


def test_seq2seq_end_to_end_through_the_console_script(models_dir, dataset_file, tmp_path):
    """The installed `kdcache` executable, as a user runs it."""
    exe = Path(sys.executable).parent / "kdcache"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}

    def sh(*args):
        proc = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    sh("dump-teacher", "--model", models_dir["t5_teacher"], "--dataset", dataset_file, "--topk", 8, "--output", "cache", "--block-size", 16)
    sh("train-student", "--cache", "cache", "--student", models_dir["t5_student"], "--output", "run", "--max-steps", 4)
    out = sh("evaluate", "--model", "run/final_model", "--dataset", dataset_file, "--split", "train", "--limit", 4,
             "--metric", "rouge", "--metric", "perplexity", "--max-new-tokens", 8, "--output", "ev")
    assert "rougeLsum" in out and "perplexity" in out
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert {"rouge1", "rouge2", "rougeL", "rougeLsum", "perplexity"} <= set(results)
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "run" / "final_model")
    tok = AutoTokenizer.from_pretrained(tmp_path / "run" / "final_model")
    assert model.generate(**tok(["x = 1"], return_tensors="pt"), max_new_tokens=3).shape[0] == 1


def test_causal_end_to_end(models_dir, dataset_file, tmp_path, capsys):
    code, out, err = run(["dump-teacher", "--model", models_dir["gpt2_teacher"], "--dataset", dataset_file, "--input-column", "highlights",
                          "--target-column", "text", "--topk", 6, "--output", tmp_path / "cache", "--limit", 20], capsys)
    assert code == 0, err
    code, out, err = run(["train-student", "--cache", tmp_path / "cache", "--student", models_dir["gpt2_student"],
                          "--output", tmp_path / "run", "--epochs", 1, "--alpha", 1.0, "--beta", 0.0], capsys)
    assert code == 0, err
    code, out, err = run(["evaluate", "--model", tmp_path / "run" / "final_model", "--dataset", dataset_file, "--split", "train",
                          "--input-column", "highlights", "--target-column", "text", "--limit", 3, "--max-new-tokens", 6,
                          "--metric", "rouge", "--output", tmp_path / "ev"], capsys)
    assert code == 0, err
    samples = [json.loads(line) for line in open(tmp_path / "ev" / "samples.jsonl")]
    assert len(samples) == 3 and all("prediction" in s for s in samples)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final_model")
    tok = AutoTokenizer.from_pretrained(tmp_path / "run" / "final_model")
    assert model.generate(**tok(["def"], return_tensors="pt"), max_new_tokens=3, pad_token_id=tok.eos_token_id).shape[1] > 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["dump-teacher", "--model", "./no/such/model", "--dataset", "{data}"], "does not exist"),
        (["dump-teacher", "--model", "{t5}", "--dataset", "./no/such.jsonl"], "does not exist"),
        (["dump-teacher", "--model", "{t5}", "--dataset", "{data}", "--target-column", "summary"], "no column 'summary'"),
        (["dump-teacher", "--model", "{t5}", "--dataset", "{data}", "--topk", "0"], "--topk must be at least 1"),
        (["dump-teacher", "--model", "{t5}", "--dataset", "{data}", "--topk", "100000"], "exceeds the teacher's vocabulary"),
        (["train-student", "--cache", "./no/cache", "--student", "{t5}"], "no cache at"),
        (["train-student", "--cache", "{data}", "--student", "{t5}", "--temperature", "0"], "--temperature must be positive"),
        (["train-student", "--cache", "{data}", "--student", "{t5}", "--alpha", "0", "--beta", "0"], "both 0"),
    ],
)
def test_bad_input_gives_one_line_and_exit_code_2(args, message, models_dir, dataset_file, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [a.format(t5=models_dir["t5_teacher"], data=dataset_file) for a in args]
    code, out, err = run(args, capsys)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "teacher_cache").exists()


def test_debug_shows_the_traceback(capsys):
    from kdcache.errors import KdcacheError

    with pytest.raises(KdcacheError):
        main(["train-student", "--cache", "./no/cache", "--student", "x", "--debug"])
