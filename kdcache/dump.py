"""Stage 1: run the teacher once over a dataset and write its sparse distributions to a cache."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__, distributed
from .batching import collate, length_grouped_batches, model_inputs
from .cache import CacheWriter
from .cache import format as fmt
from .cache.writer import read_root_attrs as zarr_attrs
from .config import DumpConfig
from .data import (
    check_columns,
    dataset_fingerprint,
    default_text_column,
    load_rows,
    resolve_columns,
    tokenize,
)
from .errors import KdcacheError
from .losses import IGNORE_INDEX
from .models import (
    check_same_tokenizer,
    count_parameters,
    detect_task,
    load_config,
    load_model,
    load_tokenizer,
    model_vocab_size,
    quiet_transformers,
    resolve_device,
    resolve_dtype,
    tokenizer_fingerprint,
)
from .sparse import fidelity, round_mantissa, sampled_targets, topk_targets

log = logging.getLogger("kdcache")

T5_FAMILY = ("t5", "mt5", "umt5", "longt5")
# Fidelity is measured on every FIDELITY_STRIDE-th distilled position: the full distribution is at
# hand there anyway, and 1 in 16 keeps the extra (N/16, V) work small next to the forward pass.
FIDELITY_STRIDE = 16
WRITE_AHEAD = 2  # blocks handed to the writer thread and not yet on disk


def default_prefix(model_type: str, prefix: str | None) -> str:
    """``summarize: `` for T5-family models (their pretraining task prefix), "" for the rest."""
    if prefix is not None:
        return prefix
    return "summarize: " if model_type in T5_FAMILY else ""


class HostTargets:
    """One batch's targets on their way to the host. On CUDA the copies go into pinned buffers without
    blocking, so the host can handle the previous batch while the GPU computes this one; :meth:`get`
    waits for this batch's copies (an event, not a device-wide sync) and returns numpy arrays."""

    def __init__(self, tensors: dict[str, Any], device: torch.device) -> None:
        self.event = None
        if device.type == "cuda":
            pinned = {}
            for key, value in _flat(tensors):
                buf = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
                buf.copy_(value, non_blocking=True)
                pinned[key] = buf
            self.event = torch.cuda.Event()
            self.event.record()
            self.tensors = pinned
        else:
            self.tensors = dict(_flat(tensors))

    def get(self) -> dict[str, Any]:
        if self.event is not None:
            self.event.synchronize()
        out: dict[str, Any] = {}
        for key, value in self.tensors.items():
            head, _, tail = key.partition(".")
            arr = value.numpy()
            if tail:
                out.setdefault(head, {})[tail] = arr
            else:
                out[key] = arr
        return out


def _unpack(idx: list[int], pending: HostTargets, examples: list[dict[str, np.ndarray]],
            per_example: list[Any], fid: list[dict[str, np.ndarray]]) -> int:
    """Wait for one batch's targets and file them per example (``idx``: the batch's examples in length
    order); returns the batch's distilled tokens."""
    out = pending.get()
    fid.append(out.pop("fidelity"))
    off = 0
    for i in idx:  # back from length order to example order
        m = len(examples[i]["labels"])
        per_example[i] = {key: arr[off : off + m] for key, arr in out.items()}
        off += m
    return off


def _flat(tensors: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
    """{"a": t, "b": {"c": t}} → [("a", t), ("b.c", t)]."""
    return [(f"{k}.{k2}", v2) for k, v in tensors.items() if isinstance(v, dict) for k2, v2 in v.items()] + \
        [(k, v) for k, v in tensors.items() if not isinstance(v, dict)]


@torch.inference_mode()
def teacher_targets(
    model: torch.nn.Module,
    examples: list[dict[str, np.ndarray]],
    task: str,
    *,
    k: int,
    vocab_size: int,
    pad_id: int,
    decoder_start_id: int | None,
    device: torch.device,
    targets: str = "topk",
    samples: int = 0,
    generator: torch.Generator | None = None,
    logprob_bits: int = 10,
) -> HostTargets:
    """Teacher forward on one batch → sparse targets for every distilled position, on the host.

    Returns ``ids`` (T, slots), ``logprobs`` (T, slots) float32, ``tail`` (T,), ``entropy`` (T,),
    ``captured`` (T,) in the order of the examples' concatenated labels (T = total labels), and
    ``fidelity``: {captured_mass, tvd, kl} (F,) on every FIDELITY_STRIDE-th position (see
    :func:`kdcache.sparse.fidelity`). Log-softmax and top-k run on the device; only these
    (T, k)-sized tensors cross to the host, without a device-wide synchronisation (see HostTargets).
    """
    batch = collate(examples, task, pad_id, decoder_start_id)
    logits = model(**model_inputs(batch, task, device)).logits  # (B, S, V_model)
    # Rows of distilled positions, example-major, in label order: the same order as the labels.
    # Their flat indices are computed on the host: boolean indexing on the device would wait for the GPU.
    where = (batch["labels"] != IGNORE_INDEX).flatten().nonzero().squeeze(1).to(device, non_blocking=True)
    # Only the tokenizer's ids are real tokens; padded embedding rows (T5: 32128 vs 32100) are dropped,
    # so teacher and student distributions live on the same vocabulary.
    rows = logits[..., :vocab_size].flatten(0, 1).index_select(0, where)
    if targets == "topk":
        t = topk_targets(rows, k)
    else:  # "sample" (k = 0 head) or "topk+sample": unbiased estimates, see kdcache.sparse.sampled_targets
        t = sampled_targets(rows, samples, k_head=k if targets == "topk+sample" else 0, generator=generator)
    t.logprobs = round_mantissa(t.logprobs, logprob_bits)  # what the cache will hold, so fidelity measures it
    probe = slice(None, None, FIDELITY_STRIDE)
    sub = type(t)(ids=t.ids[probe], logprobs=t.logprobs[probe], tail=t.tail[probe], entropy=t.entropy[probe], captured=t.captured[probe])
    return HostTargets({
        "fidelity": fidelity(rows[probe], sub),
        "ids": t.ids, "logprobs": t.logprobs, "tail": t.tail, "entropy": t.entropy, "captured": t.captured,
    }, device)


def dump_teacher(cfg: DumpConfig) -> dict[str, Any]:
    """Run ``cfg.model`` over ``cfg.dataset`` and write the cache at ``cfg.output``.

    Everything that can be refused is checked before the teacher is loaded. Blocks already complete
    in a partial cache made with the same parameters are kept (resume). Returns a summary dict.
    """
    cfg.validate()
    quiet_transformers()
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    # Under torchrun: rank r writes blocks r, r + world, ...; rank 0 creates the cache and finalizes it.
    # Blocks are separate groups, so no two ranks ever write the same chunk.
    ddp = distributed.init(device.type)
    if ddp.active and device.type == "cuda":
        device = torch.device("cuda", ddp.local_rank)
    dtype = resolve_dtype(cfg.dtype, device)
    mconf = load_config(cfg.model, trust_remote_code=cfg.trust_remote_code, what="teacher")
    task = detect_task(mconf, cfg.task)
    tok = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    if cfg.student:
        check_same_tokenizer(cfg.model, tok, cfg.student, load_tokenizer(cfg.student, trust_remote_code=cfg.trust_remote_code))
    vocab = len(tok)
    if cfg.topk > vocab:
        raise KdcacheError(f"--topk {cfg.topk} exceeds the teacher's vocabulary ({vocab} tokens)")
    head = cfg.topk if cfg.targets != "sample" else 0
    if cfg.targets != "topk" and head + cfg.samples > vocab:
        raise KdcacheError(f"--samples {cfg.samples} (+ top-{head}) exceeds the teacher's vocabulary ({vocab} tokens)")
    slots = head + (cfg.samples if cfg.targets != "topk" else 0)
    prefix = default_prefix(getattr(mconf, "model_type", ""), cfg.prefix)
    columns = resolve_columns(task, cfg.input_column, cfg.target_column, cfg.text_column)
    ds = load_rows(cfg.dataset, cfg.dataset_config, cfg.split, cfg.limit, cfg.cache_dir)
    columns = default_text_column(ds, columns)
    check_columns(ds, columns, cfg.dataset)
    data = tokenize(
        ds, tok, task, columns, prefix=prefix, max_input_length=cfg.max_input_length,
        max_target_length=cfg.max_target_length, max_seq_length=cfg.max_seq_length,
    )
    n = len(data)
    num_blocks = -(-n // cfg.block_size)
    params = {
        "teacher": cfg.model,
        "task": task,
        "targets": cfg.targets,
        "k": cfg.topk,
        "samples": cfg.samples if cfg.targets != "topk" else None,
        "seed": cfg.seed if cfg.targets != "topk" else None,
        "logprob_bits": cfg.logprob_bits,
        "dtype": str(dtype).removeprefix("torch."),
        "dataset": cfg.dataset,
        "dataset_config": cfg.dataset_config,
        "split": cfg.split,
        "dataset_fingerprint": dataset_fingerprint(ds),
        "columns": {"input": columns.input, "target": columns.target, "text": columns.text},
        "prefix": prefix,
        "max_input_length": cfg.max_input_length,
        "max_target_length": cfg.max_target_length,
        "max_seq_length": cfg.max_seq_length,
        "limit": cfg.limit,
        "block_size": cfg.block_size,
        "tokenizer_fingerprint": tokenizer_fingerprint(tok),
    }
    meta = {
        "format": fmt.FORMAT,
        "format_version": fmt.FORMAT_VERSION,
        "kdcache_version": __version__,
        "task": task,
        "targets": cfg.targets,
        # Slots per position: k exact entries, and/or up to `samples` sampled ids (-inf when unused).
        "k": slots,
        "topk": cfg.topk if cfg.targets != "sample" else 0,
        "samples": cfg.samples if cfg.targets != "topk" else 0,
        "logprob_bits": cfg.logprob_bits,
        "vocab_size": vocab,
        "index_dtype": fmt.index_dtype(vocab).name,
        "teacher": {
            "name": cfg.model,
            "revision": getattr(mconf, "_commit_hash", None),
            "model_type": getattr(mconf, "model_type", None),
            "dtype": params["dtype"],
        },
        "tokenizer": {"fingerprint": params["tokenizer_fingerprint"], "name": cfg.model, "vocab_size": vocab},
        "dataset": {
            "name": cfg.dataset,
            "config": cfg.dataset_config,
            "split": cfg.split,
            "fingerprint": params["dataset_fingerprint"],
            "rows": len(ds),
            "columns": params["columns"],
        },
        "prefix": prefix,
        "max_input_length": cfg.max_input_length,
        "max_target_length": cfg.max_target_length,
        "block_size": cfg.block_size,
        "num_blocks": num_blocks,
        "num_examples": n,
        "preprocessing": data.report(),
        "params": params,
    }
    error = None
    if ddp.main:
        try:
            writer = CacheWriter(cfg.output, meta, overwrite=cfg.overwrite)
        except KdcacheError as exc:
            error = str(exc)
    ddp.agree(error)
    if not ddp.main:  # rank 0 has created (or checked) the cache: the others join it as a resume
        writer = CacheWriter(cfg.output, meta, overwrite=False)
    todo = [b for b in range(ddp.rank, num_blocks, ddp.world) if not writer.block_complete(b)]
    if writer.resumed:
        log.info("resuming %s: %d of %d blocks already complete", cfg.output, num_blocks - len(todo), num_blocks)
    if data.truncated_inputs or data.truncated_targets or data.skipped_empty:
        log.warning(
            "preprocessing: %d inputs truncated to %d tokens, %d targets truncated to %d tokens, %d empty examples skipped",
            data.truncated_inputs, cfg.max_input_length, data.truncated_targets, cfg.max_target_length, data.skipped_empty,
        )

    model = load_model(cfg.model, task, dtype=dtype, trust_remote_code=cfg.trust_remote_code).to(device).eval()
    if model_vocab_size(model) < vocab:
        raise KdcacheError(f"teacher {cfg.model} has {model_vocab_size(model)} output rows but its tokenizer has {vocab} tokens")
    decoder_start = getattr(model.config, "decoder_start_token_id", None)
    tokens_todo = sum(len(data.labels[i]) for b in todo for i in range(b * cfg.block_size, min(n, (b + 1) * cfg.block_size)))
    t_forward = time.perf_counter()
    # Compression, fsync and the block's `complete` mark run on a writer thread while the teacher computes
    # the next block; at most WRITE_AHEAD blocks wait, which bounds host memory. Blocks are independent,
    # so the order they finish in does not matter, and an error in a write is raised here at the next
    # block (or at the end) and stops the dump like any other.
    pending: list[Future] = []
    with tqdm(total=tokens_todo, desc="dump-teacher", unit="tok", unit_scale=True, disable=None if ddp.main else True) as bar, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdcache-writer") as pool:
        for b in todo:
            lo, hi = b * cfg.block_size, min(n, (b + 1) * cfg.block_size)
            examples = [{"input_ids": data.input_ids[i], "labels": data.labels[i]} for i in range(lo, hi)]
            per_example: list[dict[str, np.ndarray] | None] = [None] * len(examples)
            fid: list[dict[str, np.ndarray]] = []
            lengths = [len(e["input_ids"]) + len(e["labels"]) for e in examples]
            # Sampling is seeded per block, so a resumed dump draws exactly what an uninterrupted one would.
            gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + b) if cfg.targets != "topk" else None

            # One batch in flight: the host unpacks batch i while the device computes batch i + 1.
            inflight: tuple[list[int], HostTargets] | None = None
            for idx in length_grouped_batches(lengths, cfg.batch_size):
                pending_batch = teacher_targets(
                    model, [examples[i] for i in idx], task, k=cfg.topk, vocab_size=vocab,
                    pad_id=tok.pad_token_id, decoder_start_id=decoder_start, device=device,
                    targets=cfg.targets, samples=cfg.samples, generator=gen, logprob_bits=cfg.logprob_bits,
                )
                if inflight is not None:
                    bar.update(_unpack(*inflight, examples, per_example, fid))
                inflight = (idx, pending_batch)
            if inflight is not None:
                bar.update(_unpack(*inflight, examples, per_example, fid))
            while len(pending) >= WRITE_AHEAD:
                pending.pop(0).result()
            pending.append(pool.submit(
                writer.write_block, b, lo,
                input_ids=[e["input_ids"] for e in examples],
                labels=[e["labels"] for e in examples],
                target_ids=np.concatenate([p["ids"] for p in per_example]),
                target_logprobs=np.concatenate([p["logprobs"] for p in per_example]),
                tail_logprob=np.concatenate([p["tail"] for p in per_example]),
                entropy=np.concatenate([p["entropy"] for p in per_example]),
                captured=np.concatenate([p["captured"] for p in per_example]),
                fidelity={key: np.concatenate([f[key] for f in fid]) for key in fid[0]},
            ))
        for f in pending:
            f.result()
    elapsed = time.perf_counter() - t_forward
    ddp.barrier()  # every rank's blocks are on storage
    if ddp.main:
        final = writer.finalize({"teacher": {**meta["teacher"], "parameters": count_parameters(model)}})
    ddp.barrier()  # the others report only once the cache is complete
    if not ddp.main:
        final = dict(zarr_attrs(cfg.output))
    summary = {
        "output": str(cfg.output),
        "task": task,
        "examples": n,
        "tokens": final["tokens"],
        "blocks_written": len(todo),
        "rank": ddp.rank,
        "world": ddp.world,
        "blocks_total": num_blocks,
        "tokens_per_s": tokens_todo / elapsed if elapsed > 0 else None,
        "captured_mass_mean": final["captured_mass_mean"],
        "entropy_mean": final["entropy_mean"],
        "seconds": time.perf_counter() - t0,
        **data.report(),
    }
    log.info("wrote %s: %d examples, %d distilled tokens, mean captured mass %.3f", cfg.output, n, final["tokens"], final["captured_mass_mean"])
    return summary
