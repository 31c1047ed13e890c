"""Stage 2: train a student from the cache alone. The teacher is never loaded.

The loop is written out (setup → fit → save) rather than hidden in a trainer class: every side
effect is in this file, in the order it happens.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import shutil
import time
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from .batching import collate, model_inputs
from .cache import TeacherCache, open_cache
from .config import TrainConfig
from .errors import KdcacheError
from .losses import distillation_loss
from .models import (
    detect_task,
    load_config,
    load_model,
    load_tokenizer,
    model_vocab_size,
    quiet_transformers,
    resolve_device,
    tokenizer_fingerprint,
)

log = logging.getLogger("kdcache")


class CacheStream(torch.utils.data.IterableDataset):
    """Examples streamed from a cache: blocks in a seeded random order, each read whole (contiguous
    chunk reads), mixed through a shuffle buffer so a batch draws from several blocks. Memory is
    bounded by the buffer and one block, whatever the cache's size. With DataLoader workers, each
    worker reads a disjoint set of blocks."""

    def __init__(self, cache_path: str, *, seed: int, shuffle_buffer: int) -> None:
        self.cache_path = cache_path
        self.seed = seed
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.epoch = 0
        self._cache: TeacherCache | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def cache(self) -> TeacherCache:
        if self._cache is None:  # opened lazily, once per worker process
            self._cache = open_cache(self.cache_path)
        return self._cache

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        rng = np.random.default_rng((self.seed, self.epoch))
        order = rng.permutation(self.cache.num_blocks).tolist()
        info = torch.utils.data.get_worker_info()
        if info is not None:
            order = order[info.id :: info.num_workers]
        buffer: list[dict[str, np.ndarray]] = []
        for block in self.cache.iter_blocks(order):
            for j in range(len(block)):
                buffer.append(block.example(j))
                if len(buffer) >= self.shuffle_buffer:
                    # Swap a random element to the end and pop it: O(1) random draw.
                    r = int(rng.integers(len(buffer)))
                    buffer[r], buffer[-1] = buffer[-1], buffer[r]
                    yield buffer.pop()
        rng.shuffle(buffer)
        yield from buffer


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _precision(device: torch.device, enabled: bool) -> tuple[Any, torch.amp.GradScaler]:
    """(autocast context factory, grad scaler) for the device: bf16 autocast on GPUs that have it,
    fp16 autocast with a loss scaler on other CUDA GPUs, fp32 everywhere else."""
    if enabled and device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return partial(torch.autocast, "cuda", dtype=torch.bfloat16), torch.amp.GradScaler("cuda", enabled=False)
        return partial(torch.autocast, "cuda", dtype=torch.float16), torch.amp.GradScaler("cuda", enabled=True)
    return contextlib.nullcontext, torch.amp.GradScaler(device.type if device.type == "cuda" else "cpu", enabled=False)


def save_model_atomic(model: torch.nn.Module, tokenizer: Any, target: Path, overwrite: bool) -> None:
    """Save as safetensors + tokenizer into a temporary sibling folder, then rename into place, so a
    crash never leaves a half-written model where a good one was."""
    if target.exists() and not overwrite:
        raise KdcacheError(f"{target} exists; pass --overwrite to replace it")
    tmp = target.with_name(target.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if target.exists():
        old = target.with_name(target.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old)
    else:
        tmp.rename(target)


def train_student(cfg: TrainConfig) -> dict[str, Any]:
    """Train ``cfg.student`` on the cache at ``cfg.cache``; write ``final_model/`` and logs under
    ``cfg.output``. Everything refusable is refused before the first step. Returns a summary."""
    cfg.validate()
    quiet_transformers()
    cache = open_cache(cfg.cache)
    meta = cache.meta
    out_dir = Path(cfg.output)
    final_dir = out_dir / "final_model"
    if final_dir.exists() and not cfg.overwrite:
        raise KdcacheError(f"{final_dir} exists; pass --overwrite to replace it, or choose another --output")
    device = resolve_device(cfg.device)
    sconf = load_config(cfg.student, trust_remote_code=cfg.trust_remote_code, what="student")
    task = meta["task"]
    if detect_task(sconf) != task:
        raise KdcacheError(f"the cache holds {task} targets but student {cfg.student} is a {detect_task(sconf)} model")
    tok = load_tokenizer(cfg.student, trust_remote_code=cfg.trust_remote_code)
    fp = tokenizer_fingerprint(tok)
    if fp != meta["tokenizer"]["fingerprint"]:
        raise KdcacheError(
            f"student tokenizer ({cfg.student}, {len(tok)} tokens, {fp}) differs from the cache's "
            f"({meta['tokenizer']['name']}, {meta['tokenizer']['vocab_size']} tokens, {meta['tokenizer']['fingerprint']}): "
            "token ids would not mean the same strings; use a student that shares the teacher's tokenizer"
        )
    vocab = int(meta["vocab_size"])

    _seed_everything(cfg.seed)
    model = load_model(cfg.student, task, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code)
    if model_vocab_size(model) < vocab:
        raise KdcacheError(f"student {cfg.student} has {model_vocab_size(model)} output rows, fewer than the cache's vocabulary ({vocab})")
    model.to(device).train()
    autocast, scaler = _precision(device, cfg.mixed_precision)

    stream = CacheStream(cfg.cache, seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer)
    collate_fn = partial(
        collate, task=task, pad_id=tok.pad_token_id, decoder_start_id=getattr(model.config, "decoder_start_token_id", None)
    )
    loader = torch.utils.data.DataLoader(
        stream, batch_size=cfg.batch_size, collate_fn=collate_fn, pin_memory=device.type == "cuda"
    )
    micro_per_epoch = math.ceil(len(cache) / cfg.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)

    no_decay = ("bias", "layer_norm.weight", "LayerNorm.weight", "ln_f.weight", "ln_1.weight", "ln_2.weight")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in model.named_parameters() if n.endswith(no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, fused=device.type == "cuda")
    scheduler = get_linear_schedule_with_warmup(optimizer, cfg.warmup_steps, total_steps)

    log_dir = out_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(log_dir / "train.log")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    file_handler.setLevel(logging.INFO)
    log.addHandler(file_handler)
    if log.getEffectiveLevel() > logging.INFO:  # the log file records INFO even when the console does not
        log.setLevel(logging.INFO)
    metrics_path = log_dir / "training_metrics.jsonl"
    metrics_file = metrics_path.open("w")
    log.info(
        "training %s on %s (%d examples, %s targets, k=%s) for %d steps on %s; T=%g alpha=%g beta=%g",
        cfg.student, cfg.cache, len(cache), meta.get("targets", "topk"), meta["k"], total_steps, device,
        cfg.temperature, cfg.alpha, cfg.beta,
    )

    step = 0
    window = {"loss": 0.0, "kd": 0.0, "ce": 0.0, "tokens": 0, "micro": 0}
    t_window = t_start = time.perf_counter()
    total_tokens = 0
    last: dict[str, Any] = {}
    try:
        with tqdm(total=total_steps, desc="train-student", unit="step", disable=None) as bar:
            for epoch in range(epochs):
                stream.set_epoch(epoch)
                for micro, batch in enumerate(loader):
                    with autocast():
                        logits = model(**model_inputs(batch, task, device)).logits
                    parts = distillation_loss(
                        logits,
                        batch["labels"].to(device),
                        batch["target_ids"].to(device),
                        batch["target_logprobs"].to(device),
                        batch["tail_logprob"].to(device),
                        alpha=cfg.alpha, beta=cfg.beta, temperature=cfg.temperature, vocab_size=vocab,
                    )
                    scaler.scale(parts.loss / cfg.grad_accum).backward()
                    window["loss"] += float(parts.loss.detach())
                    window["kd"] += float(parts.kd)
                    window["ce"] += float(parts.ce)
                    window["tokens"] += parts.tokens
                    window["micro"] += 1
                    if (micro + 1) % cfg.grad_accum and micro + 1 != micro_per_epoch:
                        continue
                    scaler.unscale_(optimizer)
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm))
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    scheduler.step()
                    step += 1
                    bar.update(1)
                    if step % cfg.log_every == 0 or step == total_steps:
                        now = time.perf_counter()
                        m = window["micro"]
                        last = {
                            "step": step,
                            "epoch": epoch,
                            "loss": window["loss"] / m,
                            "kd_loss": window["kd"] / m,
                            "ce_loss": window["ce"] / m,
                            "perplexity": math.exp(min(window["ce"] / m, 50.0)),
                            "lr": scheduler.get_last_lr()[0],
                            "grad_norm": grad_norm,
                            "tokens_per_s": window["tokens"] / max(now - t_window, 1e-9),
                        }
                        total_tokens += window["tokens"]
                        metrics_file.write(json.dumps(last) + "\n")
                        metrics_file.flush()
                        bar.set_postfix(loss=f"{last['loss']:.3f}", ce=f"{last['ce_loss']:.3f}")
                        log.debug("step %d: %s", step, last)
                        window = {"loss": 0.0, "kd": 0.0, "ce": 0.0, "tokens": 0, "micro": 0}
                        t_window = now
                    if step >= total_steps:
                        break
                if step >= total_steps:
                    break
        save_model_atomic(model, tok, final_dir, overwrite=cfg.overwrite)
    finally:
        metrics_file.close()
        log.removeHandler(file_handler)
        file_handler.close()
    total_tokens += window["tokens"]
    elapsed = time.perf_counter() - t_start
    summary = {
        "output": str(out_dir),
        "final_model": str(final_dir),
        "steps": step,
        "seconds": elapsed,
        "tokens": total_tokens,
        "tokens_per_s": total_tokens / max(elapsed, 1e-9),
        **{k: last.get(k) for k in ("loss", "kd_loss", "ce_loss")},
    }
    log.info("saved %s after %d steps (%.1f s)", final_dir, step, elapsed)
    return summary
