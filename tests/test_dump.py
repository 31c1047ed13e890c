"""dump-teacher: the cache holds what an independent teacher forward computes."""

import json

import numpy as np
import pytest
import torch
import zarr
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from kdcache import DumpConfig, dump_teacher, open_cache


def _check_against_fresh_forward(cache, logits_for, k):
    """For every example: cached ids == fresh top-k (up to ties), log-probs within float16 precision,
    tail == log(1 - Σ exp(target_logprobs))."""
    checked = 0
    for i in range(len(cache)):
        ex = cache[i]
        ref = torch.log_softmax(logits_for(ex).float(), -1)  # (n, V) fresh, one example at a time
        ref_lp, ref_ids = ref.topk(k, -1)
        got_ids = torch.from_numpy(ex["target_ids"].astype(np.int64))
        got_lp = torch.from_numpy(ex["target_logprobs"].astype(np.float32))
        torch.testing.assert_close(got_lp, ref_lp, rtol=2e-3, atol=2e-3)  # float16 storage
        # same ids up to ties: each cached id's fresh log-prob equals the cached one
        torch.testing.assert_close(ref.gather(-1, got_ids), ref_lp, rtol=2e-3, atol=2e-3)
        assert (got_ids == ref_ids).float().mean() > 0.95
        tail = np.log1p(-np.exp(ex["target_logprobs"].astype(np.float64)).sum(-1))
        np.testing.assert_allclose(ex["tail_logprob"], tail, rtol=2e-2, atol=2e-3)
        checked += len(ex["labels"])
    assert checked > 100


def test_seq2seq_cache_matches_a_fresh_teacher_forward(models_dir, dataset_file, tmp_path):
    out = tmp_path / "cache"
    summary = dump_teacher(DumpConfig(model=models_dir["t5_teacher"], dataset=dataset_file, output=str(out), topk=8, batch_size=3, block_size=7, device="cpu"))
    cache = open_cache(out)
    assert summary["examples"] == len(cache) == 40 and cache.num_blocks == 6
    tok = AutoTokenizer.from_pretrained(models_dir["t5_teacher"])
    model = AutoModelForSeq2SeqLM.from_pretrained(models_dir["t5_teacher"]).eval()
    rows = [json.loads(line) for line in open(dataset_file)]
    # the cache's inputs are the tokenizer's own encoding of the prefixed article (T5 → "summarize: ")
    assert cache.meta["prefix"] == "summarize: "
    np.testing.assert_array_equal(cache[5]["input_ids"], tok("summarize: " + rows[5]["article"], truncation=True, max_length=512)["input_ids"])
    np.testing.assert_array_equal(cache[5]["labels"], tok(rows[5]["highlights"])["input_ids"])

    @torch.no_grad()
    def logits_for(ex):
        labels = torch.from_numpy(ex["labels"].astype(np.int64))[None]
        return model(input_ids=torch.from_numpy(ex["input_ids"].astype(np.int64))[None], labels=labels).logits[0, :, : len(tok)]

    _check_against_fresh_forward(cache, logits_for, 8)


def test_causal_prompt_completion_cache_matches_a_fresh_forward(models_dir, dataset_file, tmp_path):
    out = tmp_path / "cache"
    dump_teacher(DumpConfig(model=models_dir["gpt2_teacher"], dataset=dataset_file, output=str(out), topk=5, batch_size=4, block_size=16,
                            input_column="highlights", target_column="article", max_target_length=64, device="cpu"))
    cache = open_cache(out)
    model = AutoModelForCausalLM.from_pretrained(models_dir["gpt2_teacher"]).eval()
    assert cache.meta["task"] == "causal" and cache.meta["prefix"] == ""
    assert cache.meta["preprocessing"]["truncated_targets"] > 0  # articles over 64 tokens were cut, and counted
    for i in range(len(cache)):
        ex = cache[i]
        n = len(ex["labels"])
        np.testing.assert_array_equal(ex["labels"], ex["input_ids"][-n:])  # the distilled tail of the sequence

    @torch.no_grad()
    def logits_for(ex):
        ids = torch.from_numpy(ex["input_ids"].astype(np.int64))[None]
        n = len(ex["labels"])
        return model(input_ids=ids).logits[0, -n - 1 : -1]

    _check_against_fresh_forward(cache, logits_for, 5)


def test_causal_text_column_distills_every_next_token(models_dir, dataset_file, tmp_path):
    out = tmp_path / "cache"
    dump_teacher(DumpConfig(model=models_dir["gpt2_teacher"], dataset=dataset_file, output=str(out), topk=4, text_column="text", limit=6, device="cpu"))
    cache = open_cache(out)
    tok = AutoTokenizer.from_pretrained(models_dir["gpt2_teacher"])
    rows = [json.loads(line) for line in open(dataset_file)][:6]
    for i, row in enumerate(rows):
        ids = tok(row["text"])["input_ids"] + [tok.eos_token_id]
        np.testing.assert_array_equal(cache[i]["input_ids"], ids)
        np.testing.assert_array_equal(cache[i]["labels"], ids[1:])


def test_cache_attributes_describe_the_dump(models_dir, dataset_file, tmp_path):
    out = tmp_path / "cache"
    dump_teacher(DumpConfig(model=models_dir["t5_teacher"], dataset=dataset_file, output=str(out), topk=6, limit=9, block_size=4, device="cpu"))
    attrs = zarr.open_group(str(out), mode="r").attrs
    assert attrs["format"] == "kdcache.teacher-cache" and attrs["format_version"] == 1
    assert attrs["teacher"]["name"] == models_dir["t5_teacher"] and attrs["teacher"]["parameters"] > 0
    assert attrs["tokenizer"]["fingerprint"].startswith("sha256:")
    assert attrs["k"] == 6 and attrs["num_examples"] == 9 and attrs["num_blocks"] == 3
    assert attrs["dataset"]["split"] == "train" and attrs["dataset"]["fingerprint"]
    assert attrs["max_input_length"] == 512 and attrs["max_target_length"] == 128
    assert 0 < attrs["captured_mass_mean"] < 1 and attrs["entropy_mean"] > 0
    assert attrs["index_dtype"] == "uint16" and attrs["kdcache_version"] and attrs["created"]
    assert attrs["tokens"] == sum(len(open_cache(out)[i]["labels"]) for i in range(9))


def test_resume_after_partial_dump_gives_identical_arrays(models_dir, dataset_file, tmp_path):
    kw = dict(model=models_dir["t5_teacher"], dataset=dataset_file, topk=4, limit=12, block_size=4, device="cpu")
    dump_teacher(DumpConfig(output=str(tmp_path / "full"), **kw))
    dump_teacher(DumpConfig(output=str(tmp_path / "part"), **kw))
    # simulate a crash: block 1 never completed, the root never finalized
    g = zarr.open_group(str(tmp_path / "part"), mode="r+", use_consolidated=False)
    g.attrs["complete"] = False
    del g["blocks/000001"]
    summary = dump_teacher(DumpConfig(output=str(tmp_path / "part"), **kw))
    assert summary["blocks_written"] == 1
    a, b = open_cache(tmp_path / "full"), open_cache(tmp_path / "part")
    for i in range(12):
        for key, value in a[i].items():
            np.testing.assert_array_equal(value, b[i][key])


@pytest.mark.parametrize("targets, slots", [("sample", 10), ("topk+sample", 14)])
def test_sampled_targets_dump_reproducibly_and_train(targets, slots, models_dir, dataset_file, tmp_path):
    from kdcache import TrainConfig, train_student

    kw = dict(model=models_dir["gpt2_teacher"], dataset=dataset_file, text_column="text", limit=8, block_size=3, topk=4,
              targets=targets, samples=10, seed=3, max_input_length=64, device="cpu")
    dump_teacher(DumpConfig(output=str(tmp_path / "a"), **kw))
    dump_teacher(DumpConfig(output=str(tmp_path / "b"), **kw))
    # a "crash": block 1 lost and redone on resume draws the same samples
    g = zarr.open_group(str(tmp_path / "b"), mode="r+", use_consolidated=False)
    g.attrs["complete"] = False
    del g["blocks/000001"]
    dump_teacher(DumpConfig(output=str(tmp_path / "b"), **kw))
    a, b = open_cache(tmp_path / "a"), open_cache(tmp_path / "b")
    assert a.meta["targets"] == targets and a.meta["k"] == slots
    for i in range(len(a)):
        for key in ("target_ids", "target_logprobs", "tail_logprob"):
            np.testing.assert_array_equal(a[i][key], b[i][key])
        lp = a[i]["target_logprobs"].astype(np.float64)
        np.testing.assert_allclose(np.where(np.isfinite(lp), np.exp(lp), 0).sum(-1), 1.0, atol=5e-3)  # estimates sum to 1
        assert np.isinf(a[i]["tail_logprob"]).all()
    assert a.meta["captured_mass_mean"] < 1.0 if targets == "topk+sample" else a.meta["captured_mass_mean"] == 0.0
    from kdcache import inspect_cache, verify_cache

    assert verify_cache(tmp_path / "a") == []
    fid = inspect_cache(tmp_path / "a")["fidelity"]
    # an estimate that sums to 1 on its samples has no mass elsewhere: KL(teacher || it) is infinite, TVD is not
    assert fid["kl"] is None and fid["kl_infinite_fraction"] > 0.5 and 0 < fid["tvd"] < 1
    s = train_student(TrainConfig(cache=str(tmp_path / "a"), student=models_dir["gpt2_student"], output=str(tmp_path / "run"),
                                  max_steps=2, grad_accum=1, warmup_steps=0, temperature=1.0, device="cpu"))
    assert s["steps"] == 2 and np.isfinite(s["loss"])


def test_logprob_bits_rounds_what_is_stored_and_fidelity_measures_it(models_dir, dataset_file, tmp_path):
    from kdcache import inspect_cache

    kw = dict(model=models_dir["t5_teacher"], dataset=dataset_file, topk=16, limit=12, block_size=6, device="cpu")
    dump_teacher(DumpConfig(output=str(tmp_path / "exact"), **kw))
    dump_teacher(DumpConfig(output=str(tmp_path / "bf16"), logprob_bits=7, **kw))
    a, b = open_cache(tmp_path / "exact"), open_cache(tmp_path / "bf16")
    assert b.meta["logprob_bits"] == 7 and a.meta["logprob_bits"] == 10
    for i in range(12):
        x, y = a[i]["target_logprobs"], b[i]["target_logprobs"]
        np.testing.assert_array_equal(a[i]["target_ids"], b[i]["target_ids"])
        assert np.all(y.view(np.uint16) & 0b111 == 0)  # three mantissa bits dropped
        np.testing.assert_allclose(y, x, rtol=2**-8)
    fa, fb = inspect_cache(tmp_path / "exact")["fidelity"], inspect_cache(tmp_path / "bf16")["fidelity"]
    assert fa["captured_mass"] == pytest.approx(fb["captured_mass"], abs=1e-6)
    assert abs(fb["tvd"] - fa["tvd"]) < 0.01 and fb["tvd"] != fa["tvd"]
