"""Examples → padded model inputs with one aligned layout for labels and targets.

Every stage (teacher forward, student training, evaluation) batches through :func:`collate`, so
"position s of example b" means the same thing everywhere: the logits at (b, s) predict
``labels[b, s]``, and the cached targets for that label sit at (b, s) too.

- seq2seq: S = longest label sequence; decoder inputs are the labels shifted right.
- causal: S = longest input; logits at s predict token s + 1, so the n distilled labels of an example
  of length L sit at positions L-n-1 .. L-2 (inputs are right-padded).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .losses import IGNORE_INDEX


def length_grouped_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first, so an out-of-memory shows at
    once), to keep padding small."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def collate(
    examples: Sequence[dict[str, np.ndarray]], task: str, pad_id: int, decoder_start_id: int | None = None
) -> dict[str, torch.Tensor]:
    """Pad a list of examples (``input_ids``, ``labels`` and optionally ``target_ids``,
    ``target_logprobs``, ``tail_logprob``, as in the cache) into tensors.

    Returns ``input_ids`` (B, L) and ``attention_mask`` (B, L); ``labels`` (B, S) with IGNORE_INDEX
    where nothing is distilled; seq2seq adds ``decoder_input_ids`` (B, S); with targets, also
    ``target_ids`` (B, S, k) int64, ``target_logprobs`` (B, S, k) float32 (-inf in padding) and
    ``tail_logprob`` (B, S) float32 (0 in padding: all mass in the tail, so padding is finite).
    """
    bsz = len(examples)
    lens = [len(e["input_ids"]) for e in examples]
    n_lab = [len(e["labels"]) for e in examples]
    L = max(lens)
    input_ids = torch.full((bsz, L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((bsz, L), dtype=torch.long)
    for b, e in enumerate(examples):
        input_ids[b, : lens[b]] = torch.from_numpy(np.asarray(e["input_ids"], dtype=np.int64))
        attention_mask[b, : lens[b]] = 1
    S = max(n_lab) if task == "seq2seq" else L
    # Where each example's labels start in the S axis.
    starts = [0] * bsz if task == "seq2seq" else [lens[b] - n_lab[b] - 1 for b in range(bsz)]
    labels = torch.full((bsz, S), IGNORE_INDEX, dtype=torch.long)
    for b, e in enumerate(examples):
        labels[b, starts[b] : starts[b] + n_lab[b]] = torch.from_numpy(np.asarray(e["labels"], dtype=np.int64))
    out: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if task == "seq2seq":
        start_id = pad_id if decoder_start_id is None else decoder_start_id
        dec = torch.where(labels == IGNORE_INDEX, torch.full_like(labels, pad_id), labels)
        out["decoder_input_ids"] = torch.cat([torch.full((bsz, 1), start_id, dtype=torch.long), dec[:, :-1]], dim=1)
    if "target_ids" in examples[0]:
        k = examples[0]["target_ids"].shape[-1]
        t_ids = torch.zeros((bsz, S, k), dtype=torch.long)
        t_lp = torch.full((bsz, S, k), float("-inf"), dtype=torch.float32)
        tail = torch.zeros((bsz, S), dtype=torch.float32)
        for b, e in enumerate(examples):
            sl = slice(starts[b], starts[b] + n_lab[b])
            t_ids[b, sl] = torch.from_numpy(e["target_ids"].astype(np.int64))
            t_lp[b, sl] = torch.from_numpy(e["target_logprobs"].astype(np.float32))
            tail[b, sl] = torch.from_numpy(e["tail_logprob"].astype(np.float32))
        out.update(target_ids=t_ids, target_logprobs=t_lp, tail_logprob=tail)
    return out


def model_inputs(batch: dict[str, torch.Tensor], task: str, device: torch.device) -> dict[str, torch.Tensor]:
    """The subset of a collated batch a model's forward takes, on ``device``. Labels are not passed:
    kdcache computes its own losses from the logits."""
    keys = ("input_ids", "attention_mask", "decoder_input_ids") if task == "seq2seq" else ("input_ids", "attention_mask")
    return {k: batch[k].to(device, non_blocking=True) for k in keys}
