"""Recipe: distil a code GPT into DistilGPT-2 on CodeSearchNet-Python, scored by perplexity and HumanEval pass@k.

    python pipelines/codegpt_codesearchnet.py                                  # hub models and data, GPU
    python pipelines/codegpt_codesearchnet.py --alpha 0 --temperature 3        # pure distillation
    python pipelines/codegpt_codesearchnet.py --teacher DIR --student DIR --dataset functions.jsonl --device cpu

**The alpha convention.** In this workflow ``--alpha`` is the weight of the *cross-entropy* term and
``1 - alpha`` the weight of the distillation term. kdcache names them the other way round (its
``alpha`` weighs KD, its ``beta`` weighs CE), so this recipe maps them explicitly:
``kdcache alpha = 1 - alpha``, ``kdcache beta = alpha``. ``--alpha 0`` is pure distillation;
``--alpha 1`` is plain fine-tuning.

**The teacher.** microsoft/CodeGPT-small-py has its own vocabulary, which DistilGPT-2 does not share, so
its token ids would be wrong for the student: kdcache refuses that pair before any work. The default
teacher is microsoft/CodeGPT-small-py-adaptedGPT2, which uses GPT-2's tokenizer.

Experiments of the workflow, as one-liners:

    python pipelines/codegpt_codesearchnet.py --alpha 0   --temperature 3   --output runs/pure_kd
    python pipelines/codegpt_codesearchnet.py --alpha 0.5 --temperature 2.5 --output runs/balanced
    python pipelines/codegpt_codesearchnet.py --alpha 0.3 --temperature 4   --output runs/high_temperature
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


def kdcache_weights(alpha_ce: float) -> dict[str, float]:
    """This workflow's alpha (CE weight, 1 - alpha on KD) → kdcache's alpha (KD) and beta (CE)."""
    if not 0.0 <= alpha_ce <= 1.0:
        raise ValueError(f"--alpha must be in [0, 1] (got {alpha_ce})")
    return {"alpha": 1.0 - alpha_ce, "beta": alpha_ce}


def run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    data = {"dataset": args.dataset, "dataset_config": args.dataset_config, "max_seq_length": args.max_seq_length,
            "max_input_length": args.max_seq_length, "device": args.device}
    if args.prompt_completion:  # docstring → code: only the code is distilled
        data.update(input_column="func_documentation_string", target_column="func_code_string", max_target_length=args.max_seq_length)
    else:
        data.update(text_column="whole_func_string")
    caches = {}
    for split, limit in (("train", args.train_size), ("validation", args.val_size)):
        caches[split] = str(out / f"cache_{split}")
        dump_teacher(DumpConfig(model=args.teacher, student=args.student, split=split, limit=limit, topk=args.topk,
                                batch_size=args.dump_batch_size, output=caches[split], overwrite=args.overwrite, **data))
    summary = train_student(TrainConfig(
        cache=caches["train"], val_cache=caches["validation"], student=args.student, output=str(out / "student"),
        temperature=args.temperature, **kdcache_weights(args.alpha), epochs=args.epochs, max_steps=args.max_steps,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, grad_accum=args.gradient_accumulation_steps,
        warmup_steps=args.warmup_steps, eval_steps=args.eval_steps, save_steps=args.save_steps, log_every=args.logging_steps,
        mixed_precision=True, amp_dtype=args.amp_dtype, device=args.device, overwrite=args.overwrite,
    ))
    test = {**data, "split": "test", "limit": args.test_size}
    results = {"perplexity": evaluate(EvalConfig(model=summary["final_model"], metrics=["perplexity"], **test))["results"]}
    if args.allow_code_execution:
        results["humaneval"] = evaluate(EvalConfig(
            model=summary["final_model"], metrics=["pass@k"], ks=args.k, num_samples=args.num_samples,
            temperature=args.sampling_temperature, allow_code_execution=True, limit=args.humaneval_limit,
            max_new_tokens=args.max_new_tokens, device=args.device, output=str(out / "humaneval"),
        ))["results"]
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return {"train": summary, "results": results}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="microsoft/CodeGPT-small-py-adaptedGPT2")
    ap.add_argument("--student", default="distilgpt2")
    ap.add_argument("--dataset", default="code_search_net")
    ap.add_argument("--dataset-config", default=None, help="code_search_net: python")
    ap.add_argument("--prompt-completion", action="store_true", help="docstring → code instead of whole functions")
    ap.add_argument("--train-size", type=int, default=None)
    ap.add_argument("--val-size", type=int, default=2000)
    ap.add_argument("--test-size", type=int, default=2000)
    ap.add_argument("--max-seq-length", type=int, default=512, help="384 saves memory")
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--dump-batch-size", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--alpha", type=float, default=0.5, help="CE weight; 1 - alpha goes to the KD term (see above)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=6)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--gradient-accumulation-steps", type=int, default=1)
    ap.add_argument("--warmup-steps", type=int, default=500)
    ap.add_argument("--eval-steps", type=int, default=500)
    ap.add_argument("--save-steps", type=int, default=1000)
    ap.add_argument("--logging-steps", type=int, default=50)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--amp-dtype", default="fp16", choices=["auto", "bf16", "fp16"], help="the workflow trains in fp16 on the GPU")
    ap.add_argument("--output", default="./codegpt_codesearchnet")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--allow-code-execution", action="store_true", help="also score HumanEval pass@k (runs model-written code in kdcache's sandbox)")
    ap.add_argument("--k", type=lambda s: [int(x) for x in s.split(",")], default=[1, 10, 20])
    ap.add_argument("--num-samples", type=int, default=20)
    ap.add_argument("--sampling-temperature", type=float, default=0.8)
    ap.add_argument("--max-new-tokens", type=int, default=300)
    ap.add_argument("--humaneval-limit", type=int, default=None)
    return ap


if __name__ == "__main__":
    result = run(parser().parse_args())
    print(json.dumps(result["results"], indent=2))
