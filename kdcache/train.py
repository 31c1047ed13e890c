"""Stage 2: train a student from the cache alone. The teacher is never loaded.

The loop is written out (setup → fit → save) rather than hidden in a trainer class: every side
effect is in this file, in the order it happens.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from . import distributed
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
    shared_tokenizer_hint,
    tokenizer_fingerprint,
)

log = logging.getLogger("kdcache")


class CacheStream(torch.utils.data.IterableDataset):
    """Examples streamed from a cache: blocks in a seeded random order, each read whole (contiguous
    chunk reads), mixed through a shuffle buffer so a batch draws from several blocks. Memory is
    bounded by the buffer and one block, whatever the cache's size. With DataLoader workers, each
    worker reads a disjoint set of blocks."""

    def __init__(self, cache_path: str, *, seed: int, shuffle_buffer: int, rank: int = 0, world: int = 1) -> None:
        self.cache_path = cache_path
        self.seed = seed
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.rank, self.world = rank, world  # under DDP each rank streams blocks rank, rank + world, ... of the order
        self.epoch = 0
        self._cache: TeacherCache | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self, epoch: int, rank: int | None = None) -> tuple[np.random.Generator, list[int]]:
        # Every rank draws the same permutation (same seed) and takes its own slice of it; one process
        # goes on drawing its shuffle from the same generator.
        rng = np.random.default_rng((self.seed, epoch))
        order = rng.permutation(self.cache.num_blocks).tolist()
        if self.world == 1:
            return rng, order
        r = self.rank if rank is None else rank
        return np.random.default_rng((self.seed, epoch, r)), order[r :: self.world]

    def num_batches(self, epoch: int, batch_size: int, num_workers: int, rank: int | None = None) -> int:
        """Batches a DataLoader makes of this stream in ``epoch`` (on ``rank``, default this one's): each
        worker batches its own blocks, so with workers the count is a sum of per-worker ceilings."""
        _, order = self._order(epoch, rank)
        total = 0
        for w in range(max(num_workers, 1)):
            n = sum(np.subtract(*self.cache.block_range(b)[::-1]) for b in order[w :: max(num_workers, 1)])
            total += -(-int(n) // batch_size)
        return total

    @property
    def cache(self) -> TeacherCache:
        if self._cache is None:  # opened lazily, once per worker process
            self._cache = open_cache(self.cache_path)
        return self._cache

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        rng, order = self._order(self.epoch)
        info = torch.utils.data.get_worker_info()
        if info is not None:
            order = order[info.id :: info.num_workers]
        buffer: list[dict[str, np.ndarray]] = []
        for block in self.cache.iter_blocks(order):
            for j in range(len(block)):
                # Copies, not views: a view would keep its whole block alive for as long as any of the
                # block's examples waits in the buffer, and memory would grow with the number of blocks.
                buffer.append({key: value.copy() for key, value in block.example(j).items()})
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


def _precision(device: torch.device, enabled: bool, amp_dtype: str = "auto") -> tuple[Any, torch.amp.GradScaler]:
    """(autocast context factory, grad scaler) for the device: with ``amp_dtype`` auto, bf16 autocast on
    GPUs that have it and fp16 autocast with a loss scaler on other CUDA GPUs; ``fp16`` or ``bf16``
    force one; fp32 everywhere else (CPU, MPS, or mixed precision off)."""
    if enabled and device.type == "cuda":
        if amp_dtype == "bf16" or (amp_dtype == "auto" and torch.cuda.is_bf16_supported()):
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


# ----------------------------------------------------------------------------------------------
# Checkpoints: everything needed to continue exactly where a run stopped.

CHECKPOINT_PREFIX = "checkpoint-step-"
# Settings a resumed run must share with the run it continues, or the result would be neither.
RESUME_KEYS = ("cache", "student", "online_teacher", "temperature", "alpha", "beta", "loss", "jsd_beta", "lr", "weight_decay", "warmup_steps", "epochs",
               "max_steps", "batch_size", "grad_accum", "seed", "shuffle_buffer", "num_workers")


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (a folder is renamed into place only once whole), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    out = []
    for p in ckpt_dir.iterdir():
        suffix = p.name.removeprefix(CHECKPOINT_PREFIX)
        if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit():
            out.append((int(suffix), p))
    return sorted(out)


def _torch_rng() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def save_checkpoint(ckpt_dir: Path, step: int, model: Any, tokenizer: Any, optimizer: Any, scheduler: Any,
                    scaler: Any, state: dict[str, Any], keep: int, rank_rngs: list[dict[str, Any]] | None = None) -> Path:
    """Write ``checkpoint-step-N/`` (model as safetensors, optimizer, scheduler, scaler, RNG states,
    trainer state with the data position) into a temporary folder, rename it into place, then drop
    the oldest checkpoints beyond ``keep``."""
    target = ckpt_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = ckpt_dir / f".tmp-{CHECKPOINT_PREFIX}{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(scaler.state_dict(), tmp / "scaler.pt")
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / "rng_state.pt")
    # Under DDP each rank's dropout draws from its own torch generator, which has run ahead by its own
    # batches' sizes: rank r resumes from rank_rngs[r], or its masks (and the weights) would differ.
    for r, rank_rng in enumerate(rank_rngs or []):
        if r:
            torch.save(rank_rng, tmp / f"rng_state_rank{r}.pt")
    np_state = np.random.get_state()
    _atomic_json(tmp / "trainer_state.json", {
        **state, "python_rng": [list(random.getstate()[1]), random.getstate()[0], random.getstate()[2]],
        "numpy_rng": [np_state[0], np_state[1].tolist(), *map(float, np_state[2:])],
    })
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    for _, old in list_checkpoints(ckpt_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any, scaler: Any, rank: int = 0) -> dict[str, Any]:
    """Restore a checkpoint in place; returns its trainer state. Tensors are loaded with
    ``weights_only=True``: a checkpoint is data, never code."""
    # transformers' own loader knows which weights are tied (and stored once); copy its result in.
    saved = type(model).from_pretrained(path, dtype=torch.float32)
    model.load_state_dict(saved.state_dict())
    del saved
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
    rng = torch.load(path / "rng_state.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    state = json.loads((path / "trainer_state.json").read_text())
    py = state.pop("python_rng")
    random.setstate((py[1], tuple(py[0]), py[2]))
    npr = state.pop("numpy_rng")
    np.random.set_state((npr[0], np.asarray(npr[1], dtype=np.uint32), int(npr[2]), int(npr[3]), npr[4]))
    if rank and (path / f"rng_state_rank{rank}.pt").exists():
        own = torch.load(path / f"rng_state_rank{rank}.pt", weights_only=True)
        torch.set_rng_state(own["torch"])
        if own["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(own["cuda"])
    return state


# ----------------------------------------------------------------------------------------------
# Validation


@torch.inference_mode()
def validate(model: Any, cache: TeacherCache, collate_fn: Any, cfg: TrainConfig, task: str, device: torch.device,
             autocast: Any) -> dict[str, float]:
    """The training loss on a validation cache, token-weighted over all of it: ``val_loss``,
    ``val_kd_loss``, ``val_ce_loss``, ``val_perplexity`` (exp of the CE)."""
    was_training = model.training
    model.eval()
    vocab = int(cache.meta["vocab_size"])
    kd = ce = 0.0
    tokens = 0
    for block in cache.iter_blocks():
        examples = [block.example(j) for j in range(len(block))]
        for start in range(0, len(examples), cfg.batch_size):
            batch = collate_fn(examples[start : start + cfg.batch_size])
            with autocast():
                logits = model(**model_inputs(batch, task, device)).logits
            parts = distillation_loss(
                logits, batch["labels"].to(device), batch["target_ids"].to(device), batch["target_logprobs"].to(device),
                batch["tail_logprob"].to(device), alpha=cfg.alpha or 1.0, beta=cfg.beta, temperature=cfg.temperature,
                vocab_size=vocab, divergence=cfg.loss, jsd_beta=cfg.jsd_beta,
            )
            kd += float(parts.kd) * parts.tokens
            ce += float(parts.ce) * parts.tokens
            tokens += parts.tokens
    model.train(was_training)
    kd, ce = kd / max(tokens, 1), ce / max(tokens, 1)
    return {"val_loss": cfg.alpha * kd + cfg.beta * ce, "val_kd_loss": kd, "val_ce_loss": ce,
            "val_perplexity": math.exp(min(ce, 50.0))}


# ----------------------------------------------------------------------------------------------
# The run


@torch.no_grad()  # not inference_mode: the targets enter the student's autograd graph
def online_targets(teacher: Any, batch: dict[str, torch.Tensor], task: str, device: torch.device,
                   vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's full distribution on ``batch`` in the sparse shape the losses take: ids (B, S, V)
    (an expanded arange: no copy), log-probs (B, S, V) float32 and an empty tail (B, S). With every id
    an entry, the sparse losses are the dense ones (tests/test_losses.py)."""
    logits = teacher(**model_inputs(batch, task, device)).logits[..., :vocab_size]
    logp = torch.log_softmax(logits.float(), dim=-1)
    ids = torch.arange(vocab_size, device=device).expand_as(logp)
    return ids, logp, torch.full(logp.shape[:-1], float("-inf"), device=device)


def _check_cache_fits(cache: TeacherCache, tok: Any, student: str, what: str = "cache") -> None:
    meta = cache.meta
    fp = tokenizer_fingerprint(tok)
    if fp != meta["tokenizer"]["fingerprint"]:
        raise KdcacheError(
            f"student tokenizer ({student}, {len(tok)} tokens, {fp}) differs from the {what}'s "
            f"({meta['tokenizer']['name']}, {meta['tokenizer']['vocab_size']} tokens, {meta['tokenizer']['fingerprint']}): "
            f"token ids would not mean the same strings; {shared_tokenizer_hint(meta['tokenizer']['name'])}"
        )


def train_student(cfg: TrainConfig) -> dict[str, Any]:
    """Train ``cfg.student`` on the cache at ``cfg.cache``. Writes under ``cfg.output``: ``final_model/``,
    ``best_model/`` (with a validation cache), ``checkpoints/``, ``logs/`` (main.log, training.log,
    training_metrics.json and .jsonl, curves.png). Everything refusable is refused before the first
    step. Returns a summary."""
    cfg.validate()
    quiet_transformers()
    cache = open_cache(cfg.cache)
    val_cache = open_cache(cfg.val_cache) if cfg.val_cache else None
    meta = cache.meta
    out_dir = Path(cfg.output)
    final_dir, best_dir = out_dir / "final_model", out_dir / "best_model"
    log_dir = Path(cfg.logs_dir) if cfg.logs_dir else out_dir / "logs"
    ckpt_dir = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else out_dir / "checkpoints"
    checkpoints = list_checkpoints(ckpt_dir)
    if cfg.resume and not checkpoints:
        raise KdcacheError(f"--resume: no checkpoint in {ckpt_dir} to resume from")
    if not cfg.resume and not cfg.overwrite:
        if final_dir.exists():
            raise KdcacheError(f"{final_dir} exists; pass --overwrite to replace it, --resume to continue its run, or choose another --output")
        if checkpoints:
            raise KdcacheError(f"{ckpt_dir} holds checkpoints of an earlier run; pass --resume to continue it or --overwrite to start over")
    device = resolve_device(cfg.device)
    # Under torchrun: DistributedDataParallel, each rank streaming its own share of the blocks; rank 0
    # alone writes logs, checkpoints and models.
    ddp = distributed.init(device.type)
    if ddp.active and device.type == "cuda":
        device = torch.device("cuda", ddp.local_rank)
    sconf = load_config(cfg.student, trust_remote_code=cfg.trust_remote_code, what="student")
    task = meta["task"]
    if detect_task(sconf) != task:
        raise KdcacheError(f"the cache holds {task} targets but student {cfg.student} is a {detect_task(sconf)} model")
    tok = load_tokenizer(cfg.student, trust_remote_code=cfg.trust_remote_code)
    _check_cache_fits(cache, tok, cfg.student)
    if val_cache is not None:
        _check_cache_fits(val_cache, tok, cfg.student, "validation cache")
    vocab = int(meta["vocab_size"])
    resume_state = None
    if cfg.resume:
        resume_state = json.loads((checkpoints[-1][1] / "trainer_state.json").read_text())
        old = resume_state.get("config", {})
        diff = [k for k in RESUME_KEYS if old.get(k) != getattr(cfg, k)]
        if diff:
            k = diff[0]
            raise KdcacheError(f"--resume: the checkpoint was made with {k}={old.get(k)!r}, this run has {k}={getattr(cfg, k)!r}; use the same settings")
    ddp.barrier()  # every rank has looked at the output folder before rank 0 clears it
    if cfg.overwrite and not cfg.resume and ddp.main:  # start over: nothing of the earlier run may pass for this one's
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        shutil.rmtree(best_dir, ignore_errors=True)

    _seed_everything(cfg.seed)
    model = load_model(cfg.student, task, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code)
    if model_vocab_size(model) < vocab:
        raise KdcacheError(f"student {cfg.student} has {model_vocab_size(model)} output rows, fewer than the cache's vocabulary ({vocab})")
    model.to(device).train()
    # `model` stays the plain module (saving, validation); `train_model` is what the step runs forward.
    train_model = model
    if ddp.active:
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    autocast, scaler = _precision(device, cfg.mixed_precision, cfg.amp_dtype)
    teacher = None
    if cfg.online_teacher:
        _check_cache_fits(cache, load_tokenizer(cfg.online_teacher, trust_remote_code=cfg.trust_remote_code), cfg.online_teacher)
        teacher = load_model(cfg.online_teacher, task, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code).to(device).eval()
        log.info("online KD: %s runs on every batch; the cache supplies only the examples", cfg.online_teacher)

    stream = CacheStream(cfg.cache, seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer, rank=ddp.rank, world=ddp.world)

    def batches_in(epoch: int) -> int:
        # Every rank must take the same number of steps, or DDP's all-reduce would wait forever for the
        # rank that ran out: all stop at the smallest share (the rest of a larger share is dropped).
        return min(stream.num_batches(epoch, cfg.batch_size, cfg.num_workers, rank=r) for r in range(ddp.world))

    collate_fn = partial(
        collate, task=task, pad_id=tok.pad_token_id, decoder_start_id=getattr(model.config, "decoder_start_token_id", None)
    )
    loader = torch.utils.data.DataLoader(
        stream, batch_size=cfg.batch_size, collate_fn=collate_fn, pin_memory=device.type == "cuda",
        num_workers=cfg.num_workers,
        # zarr runs an event-loop thread; a forked worker would inherit a copy of it that never runs.
        multiprocessing_context="spawn" if cfg.num_workers else None, persistent_workers=False,
        # Its own generator: each new epoch iterator draws a seed, and drawing it from the global RNG
        # would shift dropout's random stream between a resumed run and an uninterrupted one.
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    micro_per_epoch = [batches_in(e) for e in range(cfg.epochs)]
    steps_per_epoch = math.ceil(micro_per_epoch[0] / cfg.grad_accum)
    total_steps = cfg.max_steps or sum(math.ceil(m / cfg.grad_accum) for m in micro_per_epoch)
    epochs = cfg.epochs if not cfg.max_steps else max(cfg.epochs, math.ceil(total_steps / steps_per_epoch))

    no_decay = ("bias", "layer_norm.weight", "LayerNorm.weight", "ln_f.weight", "ln_1.weight", "ln_2.weight")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in model.named_parameters() if n.endswith(no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, fused=device.type == "cuda")
    scheduler = get_linear_schedule_with_warmup(optimizer, cfg.warmup_steps, total_steps)

    step, start_epoch, skip_micro = 0, 0, 0
    best, bad_evals, history = float("inf"), 0, []
    if cfg.resume:
        state = load_checkpoint(checkpoints[-1][1], model, optimizer, scheduler, scaler, rank=ddp.rank)
        step, start_epoch, skip_micro = state["step"], state["epoch"], state["micro_in_epoch"]
        best, bad_evals = state["best_val_loss"], state["evals_without_improvement"]
        history = [h for h in state["log_history"] if h["step"] <= step]

    if ddp.main:
        log_dir.mkdir(parents=True, exist_ok=True)
    handlers = []
    for name, target in (("kdcache", "main.log"), ("kdcache.training", "training.log")) if ddp.main else ():
        handler = logging.FileHandler(log_dir / target, mode="a" if cfg.resume else "w")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handler.setLevel(logging.INFO)
        logging.getLogger(name).addHandler(handler)
        handlers.append((name, handler))
    train_log = logging.getLogger("kdcache.training")
    train_log.propagate = False  # metric lines go to training.log, not the console
    for lg in (log, train_log):
        if lg.getEffectiveLevel() > logging.INFO:  # the files record INFO even when the console does not
            lg.setLevel(logging.INFO)
    metrics_jsonl = (log_dir / "training_metrics.jsonl").open("w") if ddp.main else open(os.devnull, "w")  # noqa: SIM115
    for h in history:
        metrics_jsonl.write(json.dumps(h) + "\n")

    def record(entry: dict[str, Any]) -> None:
        history.append(entry)
        metrics_jsonl.write(json.dumps(entry) + "\n")
        metrics_jsonl.flush()
        train_log.info(" ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()))

    log.info(
        "%s %s on %s (%d examples, %s targets, k=%s) for %d steps on %s; loss %s, T=%g alpha=%g beta=%g",
        "resuming" if cfg.resume else "training", cfg.student, cfg.cache, len(cache), meta.get("targets", "topk"),
        meta["k"], total_steps, device, cfg.loss, cfg.temperature, cfg.alpha, cfg.beta,
    )
    if cfg.resume:
        log.info("resumed from %s at step %d (epoch %d, batch %d)", checkpoints[-1][1], step, start_epoch, skip_micro)

    window = {"loss": 0.0, "kd": 0.0, "ce": 0.0, "tokens": 0, "micro": 0}
    t_window = t_start = time.perf_counter()
    total_tokens = 0
    stopped_early = False
    grad_norm = 0.0
    try:
        with tqdm(total=total_steps, initial=step, desc="train-student", unit="step", disable=None if ddp.main else True) as bar:
            for epoch in range(start_epoch, epochs):
                stream.set_epoch(epoch)
                n_micro = batches_in(epoch)
                for micro, batch in enumerate(loader):
                    if micro >= n_micro:
                        break  # this rank's share is larger than the smallest (see batches_in)
                    if epoch == start_epoch and micro < skip_micro:
                        continue  # already trained on before the checkpoint; the stream replays exactly
                    if teacher is not None:
                        with autocast():
                            batch["target_ids"], batch["target_logprobs"], batch["tail_logprob"] = online_targets(
                                teacher, batch, task, device, vocab)
                    with autocast():
                        logits = train_model(**model_inputs(batch, task, device)).logits
                    parts = distillation_loss(
                        logits, batch["labels"].to(device), batch["target_ids"].to(device),
                        batch["target_logprobs"].to(device), batch["tail_logprob"].to(device),
                        alpha=cfg.alpha, beta=cfg.beta, temperature=cfg.temperature, vocab_size=vocab,
                        divergence=cfg.loss, jsd_beta=cfg.jsd_beta,
                    )
                    scaler.scale(parts.loss / cfg.grad_accum).backward()
                    window["loss"] += float(parts.loss.detach())
                    window["kd"] += float(parts.kd)
                    window["ce"] += float(parts.ce)
                    window["tokens"] += parts.tokens
                    window["micro"] += 1
                    if (micro + 1) % cfg.grad_accum and micro + 1 != n_micro:
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
                        m = max(window["micro"], 1)
                        entry = {
                            "step": step, "epoch": epoch, "loss": window["loss"] / m, "kd_loss": window["kd"] / m,
                            "ce_loss": window["ce"] / m, "perplexity": math.exp(min(window["ce"] / m, 50.0)),
                            "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                            "tokens_per_s": window["tokens"] / max(now - t_window, 1e-9),
                        }
                        total_tokens += window["tokens"]
                        record(entry)
                        bar.set_postfix(loss=f"{entry['loss']:.3f}", ce=f"{entry['ce_loss']:.3f}")
                        window = {"loss": 0.0, "kd": 0.0, "ce": 0.0, "tokens": 0, "micro": 0}
                        t_window = now
                    if val_cache is not None and (step % cfg.eval_steps == 0 or step == total_steps):
                        v = validate(model, val_cache, collate_fn, cfg, task, device, autocast)
                        record({"step": step, "epoch": epoch, **v})
                        log.info("step %d: validation loss %.4f (KD %.4f, CE %.4f, perplexity %.2f)", step,
                                 v["val_loss"], v["val_kd_loss"], v["val_ce_loss"], v["val_perplexity"])
                        if v["val_loss"] < best:
                            best, bad_evals = v["val_loss"], 0
                            if ddp.main:
                                save_model_atomic(model, tok, best_dir, overwrite=True)
                        else:
                            bad_evals += 1
                            if cfg.patience and bad_evals >= cfg.patience:
                                log.info("early stopping at step %d: %d evaluations without improvement", step, bad_evals)
                                stopped_early = True
                    if step % cfg.save_steps == 0 and step < total_steps and not stopped_early:
                        rank_rngs = ddp.gather(_torch_rng()) if ddp.active else None  # every rank takes part
                        if ddp.main:
                            state = {"step": step, "epoch": epoch + (micro + 1 == n_micro),
                                     "micro_in_epoch": 0 if micro + 1 == n_micro else micro + 1, "best_val_loss": best,
                                     "evals_without_improvement": bad_evals, "log_history": history, "config": cfg.to_dict()}
                            path = save_checkpoint(ckpt_dir, step, model, tok, optimizer, scheduler, scaler, state,
                                                   cfg.save_total_limit, rank_rngs)
                            log.info("saved %s", path)
                    if step >= total_steps or stopped_early:
                        break
                if step >= total_steps or stopped_early:
                    break
        if ddp.main:
            save_model_atomic(model, tok, final_dir, overwrite=True)
    finally:
        metrics_jsonl.close()
        for name, handler in handlers:
            logging.getLogger(name).removeHandler(handler)
            handler.close()
    total_tokens += window["tokens"]
    elapsed = time.perf_counter() - t_start
    ddp.barrier()  # rank 0's final model is in place before any rank returns
    if not ddp.main:
        return {"output": str(out_dir), "steps": step, "rank": ddp.rank, "world": ddp.world, "seconds": elapsed}
    _atomic_json(log_dir / "training_metrics.json", history)
    # The files the Hugging Face Trainer leaves beside a model, for tools that read them.
    last_train = next((h for h in reversed(history) if "loss" in h), {})
    last_val = next((h for h in reversed(history) if "val_loss" in h), {})
    _atomic_json(final_dir / "trainer_state.json", {
        "global_step": step, "epoch": history[-1]["epoch"] if history else 0, "max_steps": total_steps,
        "best_metric": best if best < float("inf") else None, "best_model_checkpoint": str(best_dir) if best < float("inf") else None,
        "log_history": history,
    })
    _atomic_json(final_dir / "train_results.json", {
        "train_loss": last_train.get("loss"), "train_runtime": elapsed, "train_steps": step, "train_tokens": total_tokens,
        "train_tokens_per_second": total_tokens / max(elapsed, 1e-9), "stopped_early": stopped_early,
    })
    _atomic_json(final_dir / "eval_results.json", {k.replace("val_", "eval_"): v for k, v in last_val.items() if k.startswith("val_")})
    from .plots import plot_run

    plot_run(out_dir, log_dir)
    last = next((h for h in reversed(history) if "loss" in h), {})
    summary = {
        "output": str(out_dir), "final_model": str(final_dir), "best_model": str(best_dir) if best < float("inf") else None,
        "steps": step, "seconds": elapsed, "tokens": total_tokens, "tokens_per_s": total_tokens / max(elapsed, 1e-9),
        "stopped_early": stopped_early, "best_val_loss": best if best < float("inf") else None, "rank": 0, "world": ddp.world,
        **{k: last.get(k) for k in ("loss", "kd_loss", "ce_loss")},
    }
    log.info("saved %s after %d steps (%.1f s)", final_dir, step, elapsed)
    return summary
