"""Stage 3: generate with a model and score it (ROUGE via rouge-score; perplexity)."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .batching import collate, length_grouped_batches, model_inputs
from .config import EvalConfig
from .data import (
    Tokenized,
    check_columns,
    default_text_column,
    load_rows,
    resolve_columns,
    tokenize,
)
from .dump import default_prefix
from .errors import KdcacheError
from .losses import IGNORE_INDEX, cross_entropy_per_token
from .models import (
    detect_task,
    load_config,
    load_model,
    load_tokenizer,
    quiet_transformers,
    resolve_device,
)
from .sandbox import ENV_FLAG, execution_allowed

log = logging.getLogger("kdcache")

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def bleu(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU by sacrebleu with its defaults (13a tokenization, one reference per example), on
    sacrebleu's 0–100 scale."""
    import sacrebleu

    return {"bleu": sacrebleu.corpus_bleu(predictions, [references]).score}


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum F-measures (fractions), with Porter stemming, as computed by
    Google's ``rouge-score``. ROUGE-Lsum treats newlines as sentence boundaries."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for pred, ref in zip(predictions, references):
        scores = scorer.score(ref, pred)
        for key in ROUGE_TYPES:
            totals[key] += scores[key].fmeasure
    n = max(len(predictions), 1)
    return {key: totals[key] / n for key in ROUGE_TYPES}


@torch.inference_mode()
def perplexity(model: torch.nn.Module, data: Tokenized, task: str, tok: Any, device: torch.device, batch_size: int) -> dict[str, float]:
    """Token-level perplexity over the distilled positions (the target, or every next token of a
    text): exp of the mean cross-entropy in nats over all tokens (not a mean of per-example values).
    The softmax runs over all the model's output rows, padded ones included, as transformers' own
    loss does, so the numbers compare with other tools'."""
    examples = [{"input_ids": a, "labels": b} for a, b in zip(data.input_ids, data.labels)]
    total_nll, total_tokens = 0.0, 0
    dec_start = getattr(model.config, "decoder_start_token_id", None)
    for idx in tqdm(length_grouped_batches([len(e["input_ids"]) for e in examples], batch_size), desc="perplexity", disable=None, leave=False):
        batch = collate([examples[i] for i in idx], task, tok.pad_token_id, dec_start)
        logits = model(**model_inputs(batch, task, device)).logits
        labels = batch["labels"].to(device)
        nll = cross_entropy_per_token(logits, labels, logits.shape[-1])
        total_nll += float(nll[labels != IGNORE_INDEX].sum())
        total_tokens += int((labels != IGNORE_INDEX).sum())
    loss = total_nll / max(total_tokens, 1)
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": total_tokens}


@torch.inference_mode()
def teacher_agreement(model: torch.nn.Module, cache: Any, device: torch.device, batch_size: int = 16) -> dict[str, float]:
    """How often the model's most likely token is the teacher's, over every position of a cache
    (the teacher's top-1 is the cache's first entry), plus the model's loss on the cache's labels.

    Returns ``top1_agreement`` (fraction), ``loss`` (mean token cross-entropy, nats) and ``tokens``."""
    if cache.meta.get("targets", "topk") == "sample":
        # a sampled cache's first entry is the most drawn id, not necessarily the teacher's top-1
        raise KdcacheError(f"{cache.path} holds sampled targets; top-1 agreement needs a topk or topk+sample cache")
    task = cache.meta["task"]
    pad = getattr(model.config, "pad_token_id", None) or 0  # only fills masked positions
    dec_start = getattr(model.config, "decoder_start_token_id", None)
    agree = nll = 0.0
    tokens = 0
    for block in cache.iter_blocks():
        examples = [block.example(j) for j in range(len(block))]
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size], task, pad, dec_start)
            logits = model(**model_inputs(batch, task, device)).logits
            labels = batch["labels"].to(device)
            mask = labels != IGNORE_INDEX
            top1 = logits[..., : int(cache.meta["vocab_size"])].argmax(-1)
            agree += float((top1 == batch["target_ids"][..., 0].to(device))[mask].sum())
            nll += float(cross_entropy_per_token(logits, labels, logits.shape[-1])[mask].sum())
            tokens += int(mask.sum())
    return {"top1_agreement": agree / max(tokens, 1), "loss": nll / max(tokens, 1), "tokens": tokens}


@torch.inference_mode()
def generate(
    model: torch.nn.Module, data: Tokenized, task: str, tok: Any, device: torch.device, cfg: EvalConfig
) -> list[str]:
    """Generate a continuation for each example's input; batched, in length order, returned in example order.

    Causal prompts are left-padded so every row's generation starts right after its prompt.
    """
    prompts = []
    for ids, labels in zip(data.input_ids, data.labels):
        prompts.append(ids if task == "seq2seq" else ids[: len(ids) - len(labels)])
    preds: list[str] = [""] * len(prompts)
    gen_kwargs = {
        "num_beams": cfg.num_beams, "max_new_tokens": cfg.max_new_tokens, "min_new_tokens": cfg.min_new_tokens,
        "length_penalty": cfg.length_penalty, "no_repeat_ngram_size": cfg.no_repeat_ngram_size,
        "do_sample": False, "pad_token_id": tok.pad_token_id,
    }
    for idx in tqdm(length_grouped_batches([len(p) for p in prompts], cfg.batch_size), desc="generate", disable=None, leave=False):
        L = max(len(prompts[i]) for i in idx)
        input_ids = torch.full((len(idx), L), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(idx), L), dtype=torch.long)
        for r, i in enumerate(idx):
            p = torch.as_tensor(np.asarray(prompts[i], dtype=np.int64))
            if task == "seq2seq":
                input_ids[r, : len(p)], mask[r, : len(p)] = p, 1
            else:
                input_ids[r, L - len(p) :], mask[r, L - len(p) :] = p, 1
        out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), **gen_kwargs)
        if task == "causal":
            out = out[:, L:]
        for r, text in zip(idx, tok.batch_decode(out, skip_special_tokens=True)):
            preds[r] = text.strip()
    return preds


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Score ``cfg.model`` on ``cfg.dataset`` with ``cfg.metrics``; write ``results.json`` and
    ``samples.jsonl`` under ``cfg.output`` when given. Returns {"results": {...}, "samples": [...]}."""
    cfg.validate()
    quiet_transformers()
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    mconf = load_config(cfg.model, trust_remote_code=cfg.trust_remote_code)
    task = detect_task(mconf, cfg.task)
    if "pass@k" in cfg.metrics:
        if not execution_allowed(cfg.allow_code_execution):
            raise KdcacheError(f"--metric pass@k executes model-written code; allow it with --allow-code-execution (or {ENV_FLAG}=1)")
        if task != "causal":
            raise KdcacheError(f"--metric pass@k completes Python functions and needs a causal model; {cfg.model} is {task}")
    tok = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    data_metrics = [m for m in cfg.metrics if m != "pass@k"]  # pass@k brings its own problems
    data = Tokenized()
    if data_metrics:
        columns = resolve_columns(task, cfg.input_column, cfg.target_column, cfg.text_column)
        generated = [m for m in cfg.metrics if m in ("rouge", "bleu")]
        if generated and columns.text:
            raise KdcacheError(f"--metric {generated[0]} needs a reference: give --input-column and --target-column (a text column has none)")
        ds = load_rows(cfg.dataset, cfg.dataset_config, cfg.split, cfg.limit, cfg.cache_dir)
        columns = default_text_column(ds, columns)
        check_columns(ds, columns, cfg.dataset)
        prefix = default_prefix(getattr(mconf, "model_type", ""), cfg.prefix)
        data = tokenize(ds, tok, task, columns, prefix=prefix, max_input_length=cfg.max_input_length, max_target_length=cfg.max_target_length,
                        max_seq_length=cfg.max_seq_length)
        if data.truncated_inputs or data.skipped_empty:
            log.warning("preprocessing: %d inputs truncated to %d tokens, %d empty examples skipped", data.truncated_inputs, cfg.max_input_length, data.skipped_empty)
    model = load_model(cfg.model, task, trust_remote_code=cfg.trust_remote_code).to(device).eval()

    results: dict[str, Any] = {}
    predictions: list[str] | None = None
    if "perplexity" in cfg.metrics:
        ppl = perplexity(model, data, task, tok, device, cfg.batch_size)
        results.update({"loss": ppl["loss"], "perplexity": ppl["perplexity"]})
    if any(m in ("rouge", "bleu") for m in cfg.metrics):
        predictions = generate(model, data, task, tok, device, cfg)
        if "rouge" in cfg.metrics:
            results.update(rouge(predictions, data.references))
        if "bleu" in cfg.metrics:
            results.update(bleu(predictions, data.references))
    humaneval_samples = None
    if "pass@k" in cfg.metrics:
        from .humaneval import evaluate_humaneval

        passk, humaneval_samples = evaluate_humaneval(model, tok, cfg, device)
        results.update(passk)
    if data_metrics:
        results["examples"] = len(data)
    samples = [
        {"row": row, "prompt": p, "reference": r, **({"prediction": predictions[i]} if predictions is not None else {})}
        for i, (row, p, r) in enumerate(zip(data.rows, data.prompts, data.references))
    ]
    if cfg.output:
        out = Path(cfg.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        if data_metrics:
            with (out / "samples.jsonl").open("w") as f:
                for s in samples:
                    f.write(json.dumps(s, ensure_ascii=False) + "\n")
        if humaneval_samples is not None:
            from .humaneval import write_samples

            write_samples(humaneval_samples, out)
    log.info("evaluated %s (%s) in %.1f s", cfg.model, ", ".join(cfg.metrics), time.perf_counter() - t0)
    return {"results": results, "samples": samples, "humaneval_samples": humaneval_samples}
