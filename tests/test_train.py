"""train-student: streaming, the loop, refusals, outputs."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from conftest import _gpt2, _save, _train_tokenizer
from kdcache import DumpConfig, TrainConfig, dump_teacher, train_student
from kdcache.errors import KdcacheError
from kdcache.train import CacheStream


@pytest.fixture(scope="module")
def t5_cache(models_dir, dataset_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("t5cache") / "cache"
    dump_teacher(DumpConfig(model=models_dir["t5_teacher"], dataset=dataset_file, output=str(out), topk=8, block_size=6, device="cpu"))
    return str(out)


def test_stream_yields_every_example_once_per_epoch_in_a_seeded_order(t5_cache):
    stream = CacheStream(t5_cache, seed=1, shuffle_buffer=5)
    key = lambda e: e["input_ids"].tobytes()  # noqa: E731
    first = [key(e) for e in stream]
    again = [key(e) for e in CacheStream(t5_cache, seed=1, shuffle_buffer=5)]
    stream.set_epoch(1)
    second = [key(e) for e in stream]
    assert len(first) == 40 and len(set(first)) == 40
    assert first == again  # reproducible
    assert sorted(first) == sorted(second) and first != second  # same examples, new order
    ordered = [key(stream.cache[i]) for i in range(40)]
    assert first != ordered  # actually shuffled


def test_training_lowers_the_loss_and_writes_a_loadable_model(models_dir, t5_cache, tmp_path):
    out = tmp_path / "run"
    summary = train_student(TrainConfig(cache=t5_cache, student=models_dir["t5_student"], output=str(out), lr=3e-3,
                                        max_steps=30, batch_size=8, log_every=1, device="cpu"))
    records = [json.loads(line) for line in open(out / "logs" / "training_metrics.jsonl")]
    assert [r["step"] for r in records] == list(range(1, 31))
    assert np.mean([r["loss"] for r in records[-5:]]) < np.mean([r["loss"] for r in records[:5]])
    assert {"loss", "kd_loss", "ce_loss", "lr", "tokens_per_s"} <= set(records[0])
    assert summary["steps"] == 30 and (out / "logs" / "train.log").read_text()
    model = AutoModelForSeq2SeqLM.from_pretrained(out / "final_model")
    tok = AutoTokenizer.from_pretrained(out / "final_model")
    assert (out / "final_model" / "model.safetensors").exists()
    gen = model.generate(**tok(["def f(x): return x"], return_tensors="pt"), max_new_tokens=5)
    assert gen.shape[1] > 1


def test_gradient_accumulation_matches_a_larger_batch_in_step_count(models_dir, t5_cache, tmp_path):
    s = train_student(TrainConfig(cache=t5_cache, student=models_dir["t5_student"], output=str(tmp_path / "r"),
                                  epochs=1, batch_size=4, grad_accum=3, device="cpu"))
    assert s["steps"] == 4  # 10 micro-batches of 4 → ceil(10 / 3) optimizer steps


def test_refuses_existing_final_model_without_overwrite(models_dir, t5_cache, tmp_path):
    kw = dict(cache=t5_cache, student=models_dir["t5_student"], output=str(tmp_path / "r"), max_steps=1, device="cpu")
    train_student(TrainConfig(**kw))
    marker = (tmp_path / "r" / "final_model" / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(KdcacheError, match="exists; pass --overwrite"):
        train_student(TrainConfig(**kw))
    assert (tmp_path / "r" / "final_model" / "model.safetensors").stat().st_mtime_ns == marker
    train_student(TrainConfig(**kw, overwrite=True))
    assert not (tmp_path / "r" / "final_model.tmp").exists()


def test_refuses_a_student_with_another_tokenizer(models_dir, dataset_file, tmp_path):
    cache = tmp_path / "cache"
    dump_teacher(DumpConfig(model=models_dir["gpt2_teacher"], dataset=dataset_file, output=str(cache), topk=4, limit=4, device="cpu"))
    other_tok = _train_tokenizer("gpt2", vocab_size=350)
    other = _save(_gpt2(other_tok, 32, 1, 0), other_tok, tmp_path / "other")
    with pytest.raises(KdcacheError, match="student tokenizer .* differs from the cache's"):
        train_student(TrainConfig(cache=str(cache), student=other, output=str(tmp_path / "r"), device="cpu"))
    assert not (tmp_path / "r").exists()  # refused before anything was written
    with pytest.raises(KdcacheError, match="seq2seq model"):
        train_student(TrainConfig(cache=str(cache), student=models_dir["t5_student"], output=str(tmp_path / "r"), device="cpu"))


def test_seed_makes_cpu_training_deterministic(models_dir, t5_cache, tmp_path):
    def run(name):
        train_student(TrainConfig(cache=t5_cache, student=models_dir["t5_student"], output=str(tmp_path / name), max_steps=3, device="cpu"))
        return AutoModelForSeq2SeqLM.from_pretrained(tmp_path / name / "final_model").state_dict()

    a, b = run("a"), run("b")
    assert all(torch.equal(a[k], b[k]) for k in a)
