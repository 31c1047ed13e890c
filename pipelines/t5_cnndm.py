"""Recipe: distil T5-large into T5-small for CNN/DailyMail summarization, scored by ROUGE.

    python pipelines/t5_cnndm.py                        # the workflow's defaults (needs the hub and a GPU)
    python pipelines/t5_cnndm.py --config distillation_config.json
    python pipelines/t5_cnndm.py --teacher DIR --student DIR --dataset data.jsonl --output run   # local

Steps, each one kdcache library call:
1. dump the teacher over the train split (train_size rows) and the validation split (val_size rows);
2. train the student from the train cache, validating on the validation cache every eval_steps,
   keeping best_model/ and final_model/;
3. evaluate the teacher and the distilled student on the test split (test_size rows): ROUGE-1/2/L/Lsum
   and BLEU, side by side in ``OUTPUT/comparison.json``.

Defaults are the ones `kdcache create-config` writes (T=4, alpha=0.7, beta=0.3, batch 4 × 4 accumulation,
lr 5e-5, 3 epochs, 500 warmup steps).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from kdcache import (
    DumpConfig,
    EvalConfig,
    TrainConfig,
    dump_teacher,
    evaluate,
    train_student,
)
from kdcache.config import FILE_DEFAULTS, load_config_file, stage_kwargs


def run(file_cfg: dict[str, Any], output: str, device: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    dev = {"device": device} if device else {}
    caches = {split: str(out / f"cache_{split}") for split in ("train", "validation")}
    for split, path in caches.items():
        dump_teacher(DumpConfig(**{**stage_kwargs(file_cfg, "dump", split), "split": split, "output": path, **dev, "overwrite": overwrite}))
    train = stage_kwargs(file_cfg, "train")
    train.update(cache=caches["train"], val_cache=caches["validation"], output=str(out / "student"), overwrite=overwrite,
                 logs_dir=None, checkpoint_dir=None, **dev)
    summary = train_student(TrainConfig(**train))
    comparison = {}
    for name, model in (("teacher", file_cfg["model_config"]["teacher_model"]), ("student", summary["final_model"])):
        ev = {**stage_kwargs(file_cfg, "evaluate", "test"), "model": model, "metrics": ["rouge", "bleu"],
              "output": str(out / f"eval_{name}"), **dev}
        comparison[name] = evaluate(EvalConfig(**ev))["results"]
    (out / "comparison.json").write_text(json.dumps(comparison, indent=2) + "\n")
    return {"train": summary, "comparison": comparison}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="distillation_config.json from `kdcache create-config`")
    ap.add_argument("--teacher")
    ap.add_argument("--student")
    ap.add_argument("--dataset", help="hub name (default cnn_dailymail 3.0.0) or a local file / save_to_disk folder")
    ap.add_argument("--output", default="./t5_cnndm")
    ap.add_argument("--device")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args()
    cfg = load_config_file(args.config) if args.config else json.loads(json.dumps(FILE_DEFAULTS))
    if args.teacher:
        cfg["model_config"]["teacher_model"] = args.teacher
    if args.student:
        cfg["model_config"]["student_model"] = args.student
    if args.dataset:
        cfg["data_config"]["dataset_name"] = args.dataset
    result = run(cfg, args.output, args.device, args.overwrite)
    print(f"{'metric':<10} {'teacher':>10} {'student':>10}")
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum", "bleu"):
        print(f"{key:<10} {result['comparison']['teacher'][key]:>10.4f} {result['comparison']['student'][key]:>10.4f}")


if __name__ == "__main__":
    main()
