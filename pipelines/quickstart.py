"""The quickstart: kdcache's whole job on real data, offline, and the proof that distillation pays.

    kdcache quickstart [--budget tiny|default|large] [--output ./quickstart] [--device auto]

1. dump-teacher: the bundled teacher (a small GPT-2-style model trained on the Python standard library,
   kdcache/assets/quickstart_teacher) runs once over ``builtin:python-code``'s train, validation and
   test splits and writes three caches;
2. train-student, twice, same student initialisation, seed, steps and batches: cross-entropy only
   (alpha=0, beta=1) and distilled from the cache;
3. evaluate teacher and both students on the test split: held-out token loss, perplexity, and top-1
   agreement with the teacher;
4. print the table, write results.json and results.png under the output folder.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
)

from kdcache import DumpConfig, TrainConfig, dump_teacher, open_cache, train_student
from kdcache.errors import KdcacheError
from kdcache.evaluate import teacher_agreement
from kdcache.models import resolve_device

TEACHER = Path(__file__).resolve().parents[1] / "kdcache" / "assets" / "quickstart_teacher"


@dataclass
class Budget:
    """How much of the corpus and how many student steps; ``default`` fits 15 minutes on 2 CPU cores."""

    train_examples: int | None
    eval_examples: int | None
    steps: int
    batch_size: int


BUDGETS = {
    "tiny": Budget(train_examples=256, eval_examples=48, steps=30, batch_size=16),
    "default": Budget(train_examples=4096, eval_examples=None, steps=600, batch_size=16),
    "large": Budget(train_examples=None, eval_examples=None, steps=5000, batch_size=64),
}

# The distilled run's settings: kdcache's loss with the weights this recipe found best (see README).
KD = {"temperature": 1.0, "alpha": 0.9, "beta": 0.1}
LR = 2e-3
STUDENT = {"n_embd": 128, "n_layer": 2, "n_head": 4}


def make_student(teacher_dir: Path, out: Path, seed: int) -> str:
    """A randomly initialised GPT-2-style student with the teacher's tokenizer, saved like any model."""
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    tconf = GPT2Config.from_pretrained(teacher_dir)
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=tconf.vocab_size, n_positions=tconf.n_positions, bos_token_id=tconf.bos_token_id,
                     eos_token_id=tconf.eos_token_id, **STUDENT)
    GPT2LMHeadModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def plot(results: dict[str, Any], runs: dict[str, Path], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, run in runs.items():
        recs = [json.loads(line) for line in open(run / "logs" / "training_metrics.jsonl")]
        ax1.plot([r["step"] for r in recs], [r["ce_loss"] for r in recs], label=name)
    ax1.set_xlabel("step")
    ax1.set_ylabel("training cross-entropy (nats)")
    ax1.set_title("student training")
    ax1.legend()
    names = list(results)
    ax2.bar(names, [results[n]["loss"] for n in names], color=["#555", "#c44", "#48c"])
    for i, n in enumerate(names):
        ax2.text(i, results[n]["loss"], f"{results[n]['loss']:.3f}", ha="center", va="bottom")
    ax2.set_ylabel("held-out loss (nats/token)")
    ax2.set_title("test split")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(output: str = "./quickstart", budget: str = "default", device: str = "auto", teacher: str | None = None,
        seed: int = 0, overwrite: bool = False) -> dict[str, Any]:
    """Run the quickstart; returns {"results": ..., "paths": ...}."""
    b = BUDGETS[budget]
    out = Path(output)
    if (out / "results.json").exists() and not overwrite:
        raise KdcacheError(f"{out} holds an earlier quickstart run; pass --overwrite to redo it, or choose another --output")
    out.mkdir(parents=True, exist_ok=True)
    teacher_dir = Path(teacher) if teacher else TEACHER
    dev = str(resolve_device(device))
    t0 = time.perf_counter()
    max_len = GPT2Config.from_pretrained(teacher_dir).n_positions

    caches = {}
    for split, limit in (("train", b.train_examples), ("validation", b.eval_examples), ("test", b.eval_examples)):
        caches[split] = out / f"cache_{split}"
        dump_teacher(DumpConfig(model=str(teacher_dir), dataset="builtin:python-code", split=split, limit=limit,
                                max_input_length=max_len, topk=64, batch_size=32, block_size=512, device=dev,
                                output=str(caches[split]), overwrite=True))  # the quickstart's own folder

    student_init = make_student(teacher_dir, out / "student_init", seed)
    common = dict(cache=str(caches["train"]), student=student_init, max_steps=b.steps, batch_size=b.batch_size, lr=LR,
                  warmup_steps=max(1, b.steps // 20), grad_accum=1, seed=seed, device=dev, log_every=max(1, b.steps // 60), overwrite=True)
    runs = {"student_ce": out / "student_ce", "student_kd": out / "student_kd"}
    train_student(TrainConfig(output=str(runs["student_ce"]), alpha=0.0, beta=1.0, **common))
    train_student(TrainConfig(output=str(runs["student_kd"]), **KD, **common))

    test = open_cache(caches["test"])
    models = {"teacher": teacher_dir, **{k: v / "final_model" for k, v in runs.items()}}
    results: dict[str, Any] = {}
    for name, path in models.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(dev).eval()
        m = teacher_agreement(model, test, torch.device(dev))
        results[name] = {
            "loss": m["loss"], "perplexity": math.exp(m["loss"]), "top1_agreement": m["top1_agreement"],
            "parameters": sum(p.numel() for p in model.parameters()), "tokens": m["tokens"],
        }
    settings = {"budget": budget, "device": dev, "steps": b.steps, "batch_size": b.batch_size, "lr": LR, "kd": KD,
                "train_examples": len(open_cache(caches["train"])), "test_tokens": results["teacher"]["tokens"],
                "seconds": time.perf_counter() - t0}
    (out / "results.json").write_text(json.dumps({**results, "settings": settings}, indent=2) + "\n")
    plot(results, runs, out / "results.png")
    return {"results": results, "settings": settings, "paths": {"output": str(out), "results": str(out / "results.json"),
                                                               "plot": str(out / "results.png"), **{k: str(v) for k, v in runs.items()}}}
