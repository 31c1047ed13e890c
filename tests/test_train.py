"""train-student: streaming, the loop, refusals, outputs."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import _gpt2, _save, _train_tokenizer
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

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
    key = lambda e: e["input_ids"].tobytes()
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
                                        max_steps=30, batch_size=8, grad_accum=1, warmup_steps=0, log_every=1, device="cpu"))
    records = [json.loads(line) for line in open(out / "logs" / "training_metrics.jsonl")]
    assert [r["step"] for r in records] == list(range(1, 31))
    assert np.mean([r["loss"] for r in records[-5:]]) < np.mean([r["loss"] for r in records[:5]])
    assert {"loss", "kd_loss", "ce_loss", "lr", "tokens_per_s"} <= set(records[0])
    assert summary["steps"] == 30 and "training" in (out / "logs" / "main.log").read_text()
    assert "step=30" in (out / "logs" / "training.log").read_text()
    assert json.loads((out / "logs" / "training_metrics.json").read_text()) == records
    assert (out / "logs" / "curves.png").stat().st_size > 0
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
    kw = dict(cache=t5_cache, student=models_dir["t5_student"], output=str(tmp_path / "r"), max_steps=1, grad_accum=1, device="cpu")
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
        train_student(TrainConfig(cache=t5_cache, student=models_dir["t5_student"], output=str(tmp_path / name), max_steps=3, grad_accum=1, device="cpu"))
        return AutoModelForSeq2SeqLM.from_pretrained(tmp_path / name / "final_model").state_dict()

    a, b = run("a"), run("b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _weights(path):
    return AutoModelForSeq2SeqLM.from_pretrained(path).state_dict()


def test_checkpoints_keep_the_last_n_with_everything_needed_to_resume(models_dir, t5_cache, tmp_path):
    train_student(TrainConfig(cache=t5_cache, student=models_dir["t5_student"], output=str(tmp_path / "r"), max_steps=10,
                              save_steps=2, save_total_limit=2, grad_accum=1, warmup_steps=2, device="cpu"))
    ckpts = sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir())
    assert ckpts == ["checkpoint-step-6", "checkpoint-step-8"]
    files = {p.name for p in (tmp_path / "r" / "checkpoints" / "checkpoint-step-8").iterdir()}
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pt", "trainer_state.json", "config.json"} <= files
    state = json.loads((tmp_path / "r" / "checkpoints" / "checkpoint-step-8" / "trainer_state.json").read_text())
    assert state["step"] == 8 and state["micro_in_epoch"] == 8 and state["epoch"] == 0


def test_interrupted_and_resumed_training_ends_with_the_same_weights(models_dir, t5_cache, tmp_path):
    """14 steps of 4 examples cross an epoch boundary (40 examples = 10 batches). The interrupted run
    is the same run stopped after its step-8 checkpoint: its later checkpoints and final model are
    removed, and --resume continues from step 8."""
    import shutil

    kw = dict(cache=t5_cache, student=models_dir["t5_student"], max_steps=14, batch_size=4, save_steps=4,
              grad_accum=1, warmup_steps=3, lr=1e-3, device="cpu")
    train_student(TrainConfig(output=str(tmp_path / "straight"), **kw))
    train_student(TrainConfig(output=str(tmp_path / "broken"), **kw))
    shutil.rmtree(tmp_path / "broken" / "final_model")
    shutil.rmtree(tmp_path / "broken" / "checkpoints" / "checkpoint-step-12")
    with pytest.raises(KdcacheError, match="--resume to continue"):
        train_student(TrainConfig(output=str(tmp_path / "broken"), **kw))
    with pytest.raises(KdcacheError, match="lr=0.001, this run has lr=0.002"):
        train_student(TrainConfig(output=str(tmp_path / "broken"), resume=True, **{**kw, "lr": 2e-3}))
    summary = train_student(TrainConfig(output=str(tmp_path / "broken"), resume=True, **kw))
    assert summary["steps"] == 14
    a, b = _weights(tmp_path / "straight" / "final_model"), _weights(tmp_path / "broken" / "final_model")
    assert all(torch.equal(a[k], b[k]) for k in a)
    hist = json.loads((tmp_path / "broken" / "logs" / "training_metrics.json").read_text())
    assert [h["step"] for h in hist] == [h["step"] for h in json.loads((tmp_path / "straight" / "logs" / "training_metrics.json").read_text())]


def test_validation_best_model_and_early_stopping(models_dir, dataset_file, t5_cache, tmp_path):
    val = tmp_path / "val"
    dump_teacher(DumpConfig(model=models_dir["t5_teacher"], dataset=dataset_file, output=str(val), topk=8, limit=8, device="cpu"))
    s = train_student(TrainConfig(cache=t5_cache, val_cache=str(val), student=models_dir["t5_student"], output=str(tmp_path / "r"),
                                  max_steps=30, eval_steps=2, patience=1, lr=5.0, grad_accum=1, warmup_steps=0, device="cpu"))
    assert s["stopped_early"] and s["steps"] < 30
    hist = json.loads((tmp_path / "r" / "logs" / "training_metrics.json").read_text())
    vals = [h for h in hist if "val_loss" in h]
    assert {"val_loss", "val_kd_loss", "val_ce_loss", "val_perplexity"} <= set(vals[0])
    assert s["best_val_loss"] == min(v["val_loss"] for v in vals) and vals[-1]["val_loss"] >= s["best_val_loss"]
    assert (tmp_path / "r" / "best_model" / "model.safetensors").exists() and (tmp_path / "r" / "final_model").exists()
    assert "validation loss" in (tmp_path / "r" / "logs" / "main.log").read_text()


def test_dataloader_workers_split_the_blocks_and_the_batch_count_is_exact(t5_cache):
    from functools import partial

    from kdcache.batching import collate

    stream = CacheStream(t5_cache, seed=0, shuffle_buffer=8)
    loader = torch.utils.data.DataLoader(stream, batch_size=4, num_workers=2, multiprocessing_context="spawn",
                                         collate_fn=partial(collate, task="seq2seq", pad_id=0))
    batches = list(loader)
    assert len(batches) == stream.num_batches(0, 4, 2)
    seen = sorted(tuple(row[row != 0].tolist()) for b in batches for row in b["input_ids"])
    assert seen == sorted(tuple(stream.cache[i]["input_ids"].tolist()) for i in range(40))


def test_online_teacher_equals_training_on_a_full_vocabulary_cache(models_dir, dataset_file, tmp_path):
    """Online KD (the reference in the sparse-targets study and the benchmark) is the offline loss with
    the teacher's whole distribution: same batches, so the same weights up to the cache's float16."""
    from transformers import AutoModelForCausalLM

    vocab = len(AutoTokenizer.from_pretrained(models_dir["gpt2_teacher"]))
    cache = tmp_path / "full"
    dump_teacher(DumpConfig(model=models_dir["gpt2_teacher"], dataset=dataset_file, text_column="text", limit=12, block_size=4,
                            topk=vocab, max_input_length=48, output=str(cache), device="cpu"))
    kw = dict(cache=str(cache), student=models_dir["gpt2_student"], max_steps=3, batch_size=4, grad_accum=1, warmup_steps=0,
              lr=1e-3, temperature=2.0, alpha=0.8, beta=0.2, device="cpu")
    off = train_student(TrainConfig(output=str(tmp_path / "offline"), **kw))
    on = train_student(TrainConfig(output=str(tmp_path / "online"), online_teacher=models_dir["gpt2_teacher"], **kw))
    assert on["kd_loss"] == pytest.approx(off["kd_loss"], rel=2e-3) and on["ce_loss"] == pytest.approx(off["ce_loss"], rel=1e-4)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "offline" / "final_model").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "online" / "final_model").state_dict()
    diff = torch.cat([(a[n] - b[n]).abs().flatten() for n in a])
    # Adam moves each weight by at most ~lr per step whatever its gradient, so a near-zero gradient whose
    # sign the float16 targets flip moves up to 3·lr in 3 steps; everything else must agree closely.
    assert diff.max() <= 3 * 1e-3 + 1e-6 and diff.mean() < 1e-5 and (diff > 2e-4).float().mean() < 1e-3


def _synthetic_cache(path, n_examples, block=250, length=100, k=64, vocab=4096):
    """A causal cache of random targets written straight through CacheWriter (no teacher: fast)."""
    from kdcache.cache import CacheWriter
    from kdcache.cache import format as fmt

    rng = np.random.default_rng(0)
    meta = {"format": fmt.FORMAT, "format_version": fmt.FORMAT_VERSION, "task": "causal", "targets": "topk", "k": k,
            "vocab_size": vocab, "index_dtype": "uint16", "teacher": {"name": "t"}, "dataset": {"name": "d"},
            "tokenizer": {"fingerprint": "sha256:x", "name": "t", "vocab_size": vocab}, "block_size": block,
            "num_blocks": -(-n_examples // block), "num_examples": n_examples, "params": {"n": n_examples}}
    w = CacheWriter(path, meta)
    for b in range(meta["num_blocks"]):
        n = min(block, n_examples - b * block)
        seqs = [rng.integers(0, vocab, length + 1) for _ in range(n)]
        lp = np.log(rng.dirichlet(np.ones(k + 1), size=n * length)).astype(np.float32)
        w.write_block(b, b * block, seqs, [s[1:] for s in seqs], rng.integers(0, vocab, (n * length, k)), lp[:, :k], lp[:, k],
                      np.zeros(n * length))
    w.finalize()


STREAM_PEAK = """
import sys
from kdcache.batching import collate
from kdcache.train import CacheStream
import torch
def rss(field):
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(field + ':'))
stream = CacheStream(sys.argv[1], seed=0, shuffle_buffer=256)
loader = torch.utils.data.DataLoader(stream, batch_size=16, collate_fn=lambda b: collate(b, 'causal', 0))
base = rss('VmRSS')
open('/proc/self/clear_refs', 'w').write('5')
n = sum(int((b['labels'] != -100).sum()) for b in loader)
print(n, base, rss('VmHWM'))
"""


def test_streaming_memory_is_flat_as_the_cache_grows(tmp_path):
    """Training memory must not grow with the cache: the stream holds one block and a shuffle buffer.
    Peak RSS while streaming a cache 10× larger (10× the blocks) stays within 10% (the loop's own
    memory is most of it; a loader that kept what it read would add ~120 MB here)."""
    import subprocess
    import sys

    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc to reset the peak RSS")
    peaks = {}
    for n in (500, 5000):
        _synthetic_cache(tmp_path / f"c{n}", n)
        out = subprocess.run([sys.executable, "-c", STREAM_PEAK, str(tmp_path / f"c{n}")], capture_output=True, text=True, check=True)
        tokens, base, peak = map(int, out.stdout.split())
        assert tokens == n * 100
        peaks[n] = peak
    assert peaks[5000] <= 1.10 * peaks[500], peaks
