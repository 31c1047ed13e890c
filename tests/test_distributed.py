"""Several processes under torchrun (gloo, CPU): the dump splits blocks between ranks and equals a
single-process dump."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from kdcache import open_cache, verify_cache

ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def _torchrun(args, n=2):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m", "kdcache", *args],
                          capture_output=True, text=True, env=ENV, timeout=300)


def test_two_process_dump_equals_one_process_dump(models_dir, dataset_file, tmp_path):
    args = ["dump-teacher", "--model", models_dir["t5_teacher"], "--dataset", dataset_file, "--topk", "6", "--block-size", "3",
            "--limit", "17", "--device", "cpu"]
    one = subprocess.run([sys.executable, "-m", "kdcache", *args, "--output", str(tmp_path / "one")], capture_output=True, text=True, env=ENV)
    assert one.returncode == 0, one.stderr
    two = _torchrun([*args, "--output", str(tmp_path / "two")])
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("cache ") == 1 and "by rank 0 of 2" in two.stdout  # one summary, from rank 0
    a, b = open_cache(tmp_path / "one"), open_cache(tmp_path / "two")
    assert len(a) == len(b) == 17 and a.num_blocks == 6
    for i in range(len(a)):
        for key, value in a[i].items():
            np.testing.assert_array_equal(value, b[i][key], err_msg=f"example {i} {key}")
    for key in ("tokens", "input_tokens", "captured_mass_mean", "captured_mass_p5", "entropy_mean", "fidelity", "num_examples"):
        assert a.meta[key] == pytest.approx(b.meta[key]), key
    assert verify_cache(tmp_path / "two") == []


def test_two_process_dump_refusal_stops_every_rank(models_dir, dataset_file, tmp_path):
    args = ["dump-teacher", "--model", models_dir["t5_teacher"], "--dataset", dataset_file, "--topk", "6", "--limit", "4",
            "--device", "cpu", "--output", str(tmp_path / "c")]
    assert _torchrun(args).returncode == 0
    again = _torchrun([a if a != "6" else "5" for a in args])  # other parameters, onto a complete cache
    assert again.returncode != 0 and "already holds a complete cache" in again.stderr


def test_two_process_ddp_training_runs_and_saves_once(models_dir, dataset_file, tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    cache = tmp_path / "cache"
    assert _torchrun(["dump-teacher", "--model", models_dir["t5_teacher"], "--dataset", dataset_file, "--topk", "6", "--block-size", "5",
                      "--limit", "23", "--device", "cpu", "--output", str(cache)]).returncode == 0
    out = tmp_path / "run"
    r = _torchrun(["train-student", "--cache", str(cache), "--student", models_dir["t5_student"], "--output", str(out), "--batch-size", "2",
                   "--grad-accum", "1", "--epochs", "1", "--warmup-steps", "0", "--save-steps", "2", "--save-total-limit", "10",
                   "--log-every", "1", "--device", "cpu"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("saved ") == 1  # one summary, from rank 0
    # 5 blocks (5, 5, 5, 5, 3 examples) split 3/2 between the ranks; both stop at the smaller share's batches
    state = json.loads((out / "final_model" / "trainer_state.json").read_text())
    steps = state["global_step"]
    assert 4 <= steps <= 6
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == [f"checkpoint-step-{s}" for s in range(2, steps, 2)]  # written once each, by rank 0
    AutoModelForSeq2SeqLM.from_pretrained(out / "final_model")
    metrics = [json.loads(line) for line in open(out / "logs" / "training_metrics.jsonl")]
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))

    # An interrupted DDP run resumed under torchrun ends where the uninterrupted one did, weight for weight.
    import shutil

    import torch

    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "final_model")
    for ckpt in sorted((resumed / "checkpoints").iterdir())[1:]:  # keep only checkpoint-step-2
        shutil.rmtree(ckpt)
    args = [a if a != str(out) else str(resumed) for a in r.args[r.args.index("train-student"):]]
    again = _torchrun([*args, "--resume"])
    assert again.returncode == 0, again.stderr[-3000:]
    a = AutoModelForSeq2SeqLM.from_pretrained(out / "final_model").state_dict()
    b = AutoModelForSeq2SeqLM.from_pretrained(resumed / "final_model").state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
