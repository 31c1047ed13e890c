"""evaluate: metrics equal their reference implementations on the same strings and tokens."""

import json

import pytest
import torch
from rouge_score import rouge_scorer
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from kdcache import EvalConfig, evaluate
from kdcache.errors import KdcacheError
from kdcache.evaluate import rouge


def test_rouge_equals_rouge_score():
    preds = ["the cat sat on the mat", "running quickly home", ""]
    refs = ["a cat was sitting on the mat", "he runs home quickly\nthen sleeps", "something"]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    got = rouge(preds, refs)
    for key in got:
        ref = sum(scorer.score(r, p)[key].fmeasure for p, r in zip(preds, refs)) / 3
        assert got[key] == pytest.approx(ref)
    assert got["rouge1"] > 0  # stemming matters: "running"/"runs" both stem to "run"


def test_evaluate_rouge_from_samples_and_perplexity(models_dir, dataset_file, tmp_path):
    out = evaluate(EvalConfig(model=models_dir["t5_teacher"], dataset=dataset_file, split="train", limit=6,
                              metrics=["rouge", "perplexity"], max_new_tokens=12, num_beams=2, output=str(tmp_path / "ev"), device="cpu"))
    samples = [json.loads(line) for line in open(tmp_path / "ev" / "samples.jsonl")]
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert results == pytest.approx(out["results"])
    assert len(samples) == 6 and {"prompt", "reference", "prediction"} <= set(samples[0])
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    assert results["rougeL"] == pytest.approx(sum(scorer.score(s["reference"], s["prediction"])["rougeL"].fmeasure for s in samples) / 6)
    # perplexity: exp of the token-weighted mean NLL, computed here by transformers' own loss
    tok = AutoTokenizer.from_pretrained(models_dir["t5_teacher"])
    model = AutoModelForSeq2SeqLM.from_pretrained(models_dir["t5_teacher"]).eval()
    rows = [json.loads(line) for line in open(dataset_file)][:6]
    nll = n = 0
    with torch.no_grad():
        for r in rows:
            labels = tok(r["highlights"], return_tensors="pt")["input_ids"]
            loss = model(**tok("summarize: " + r["article"], return_tensors="pt"), labels=labels).loss
            nll, n = nll + loss.item() * labels.shape[1], n + labels.shape[1]
    assert results["loss"] == pytest.approx(nll / n, rel=1e-4)
    assert results["perplexity"] == pytest.approx(torch.tensor(nll / n).exp().item(), rel=1e-4)


def test_causal_perplexity_on_a_text_column(models_dir, dataset_file):
    out = evaluate(EvalConfig(model=models_dir["gpt2_teacher"], dataset=dataset_file, split="train", limit=4,
                              text_column="text", metrics=["perplexity"], device="cpu"))
    tok = AutoTokenizer.from_pretrained(models_dir["gpt2_teacher"])
    model = AutoModelForCausalLM.from_pretrained(models_dir["gpt2_teacher"]).eval()
    nll = n = 0
    with torch.no_grad():
        for r in [json.loads(line) for line in open(dataset_file)][:4]:
            ids = torch.tensor([tok(r["text"])["input_ids"] + [tok.eos_token_id]])
            loss = model(input_ids=ids, labels=ids).loss  # HF shifts internally
            nll, n = nll + loss.item() * (ids.shape[1] - 1), n + ids.shape[1] - 1
    assert out["results"]["loss"] == pytest.approx(nll / n, rel=1e-4)


def test_rouge_needs_a_reference(models_dir, dataset_file):
    with pytest.raises(KdcacheError, match="needs a reference"):
        evaluate(EvalConfig(model=models_dir["gpt2_teacher"], dataset=dataset_file, text_column="text", metrics=["rouge"], device="cpu"))


def test_bleu_equals_sacrebleu():
    import sacrebleu

    from kdcache.evaluate import bleu

    preds = ["the cat sat on the mat today", "a quick brown fox"]
    refs = ["the cat sat on a mat today", "the quick brown fox jumps"]
    assert bleu(preds, refs)["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score)


def test_several_models_side_by_side(models_dir, dataset_file, tmp_path, capsys):
    from conftest import run_cli

    code, out, err = run_cli(["evaluate", "--model", models_dir["t5_teacher"], "--model", models_dir["t5_student"], "--dataset", dataset_file,
                              "--split", "train", "--limit", 3, "--metric", "rouge", "--metric", "bleu", "--max-new-tokens", 6,
                              "--num-beams", 2, "--length-penalty", 0.8, "--no-repeat-ngram-size", 2, "--output", tmp_path / "ev"], capsys)
    assert code == 0, err
    header = out.splitlines()[0]
    assert "t5_teacher" in header and "t5_student" in header
    table = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert set(table) == {"t5_teacher", "t5_student"} and "bleu" in table["t5_student"]
    assert (tmp_path / "ev" / "t5_teacher" / "samples.jsonl").exists()
