"""Compare KD settings on the quickstart's caches: which temperature and weights the quickstart should use.

    kdcache quickstart --output ./quickstart        # first: makes the caches and the student's initialisation
    python pipelines/quickstart_kd_settings.py --quickstart ./quickstart

Trains the quickstart's student from the same initialisation, seed, steps and batches with each
setting and prints the held-out loss on the test cache (the CE-only row is the quickstart's baseline).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from kdcache import TrainConfig, open_cache, train_student
from kdcache.evaluate import teacher_agreement
from pipelines.quickstart import BUDGETS, LR

SETTINGS = {
    "CE only (alpha=0, beta=1)": {"temperature": 1.0, "alpha": 0.0, "beta": 1.0},
    "kdcache defaults (T=4, alpha=0.7, beta=0.3)": {"temperature": 4.0, "alpha": 0.7, "beta": 0.3},
    "T=2, alpha=0.9, beta=0.1": {"temperature": 2.0, "alpha": 0.9, "beta": 0.1},
    "T=1, alpha=0.9, beta=0.1 (quickstart)": {"temperature": 1.0, "alpha": 0.9, "beta": 0.1},
    "T=1, alpha=1, beta=0": {"temperature": 1.0, "alpha": 1.0, "beta": 0.0},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quickstart", default="./quickstart")
    ap.add_argument("--budget", default="default")
    ap.add_argument("--only", nargs="*", help="names of SETTINGS to run (default: all)")
    args = ap.parse_args()
    qs, b = Path(args.quickstart), BUDGETS[args.budget]
    test = open_cache(qs / "cache_test")
    rows = {}
    for name, kd in SETTINGS.items():
        if args.only and not any(o in name for o in args.only):
            continue
        run = qs / "settings" / name.split(" (")[0].replace(" ", "_").replace(",", "").replace("=", "")
        train_student(TrainConfig(cache=str(qs / "cache_train"), student=str(qs / "student_init"), output=str(run), max_steps=b.steps,
                                  batch_size=b.batch_size, lr=LR, warmup_steps=max(1, b.steps // 20), grad_accum=1, seed=0,
                                  device="cpu", log_every=max(1, b.steps // 60), overwrite=True, **kd))
        model = AutoModelForCausalLM.from_pretrained(run / "final_model").eval()
        rows[name] = teacher_agreement(model, test, torch.device("cpu"))
        print(f"{name:<46} held-out loss {rows[name]['loss']:.4f}  top-1 agreement {rows[name]['top1_agreement']:.3f}", flush=True)
    (qs / "settings" / "results.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
