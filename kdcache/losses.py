"""Distillation losses on sparse targets, and cross-entropy. Pure functions on tensors.

Shapes, shared by every function here (B batch, S positions, V vocabulary, k entries):

- student logits: (B, S, V_s) with V_s >= V; only the first V columns (the tokenizer's
  vocabulary, the one the cache was made with) take part, so a student whose embedding matrix is
  padded (T5: 32128 rows for 32100 tokens) is fine;
- target ids (B, S, k) int64, target log-probs (B, S, k) float at temperature 1, tail (B, S);
- labels (B, S) int64, with ``IGNORE_INDEX`` where a position is not distilled.

All reductions go through :func:`token_mean`: the loss is a mean over distilled tokens, and a batch
with none gives 0 (with a gradient of 0), not NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .sparse import retemper

IGNORE_INDEX = -100


def token_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``per_token`` (B, S) over positions where ``mask`` (B, S) is true; 0 if none are.

    ``torch.where`` rather than multiplication: a masked position may hold inf or NaN (padding),
    and 0 * inf is NaN.
    """
    total = torch.where(mask, per_token, torch.zeros_like(per_token)).sum()
    return total / mask.sum().clamp(min=1)


def sparse_kl_per_token(
    student_logits: torch.Tensor,
    target_ids: torch.Tensor,
    target_logprobs: torch.Tensor,
    tail_logprob: torch.Tensor,
    temperature: float,
    vocab_size: int,
) -> torch.Tensor:
    """KL(p_T ‖ q_T) per position (B, S), over the k cached entries plus the tail bucket.

    p_T is the cached teacher target re-tempered by :func:`kdcache.sparse.retemper`; q_T is
    ``softmax(student_logits / T)`` bucketed the same way: its probabilities at the cached ids, and
    one tail bucket holding the rest of its mass. When the entries cover the whole vocabulary this is
    exactly the dense KL. The student's log-softmax is taken once; no (B, S, V) teacher tensor exists.
    """
    s_logp = torch.log_softmax(student_logits[..., :vocab_size].float() / temperature, dim=-1)
    return sparse_kl_from_logprobs(s_logp, target_ids, target_logprobs, tail_logprob, temperature, vocab_size)


def sparse_kl_from_logprobs(
    s_logp: torch.Tensor,
    target_ids: torch.Tensor,
    target_logprobs: torch.Tensor,
    tail_logprob: torch.Tensor,
    temperature: float,
    vocab_size: int,
) -> torch.Tensor:
    """:func:`sparse_kl_per_token` from the student's log-probs at temperature T, (B, S, V), already
    computed (the loss shares one log-softmax between KD and CE when T = 1)."""
    t_lp, t_tail = retemper(target_logprobs.float(), tail_logprob.float(), temperature, vocab_size)
    used = torch.isfinite(t_lp)
    s_ent = s_logp.gather(-1, target_ids)  # (B, S, k)
    # Student tail: the mass outside the used entries. Clamped away from 0 so its log and gradient
    # stay finite when the student puts (numerically) all its mass on the entries.
    s_mass = torch.where(used, s_ent.exp(), torch.zeros_like(s_ent)).sum(-1)
    s_tail = torch.log1p(-s_mass.clamp(max=1.0 - 1e-6))
    zero = torch.zeros_like(s_ent)
    head = torch.where(used, t_lp.exp() * (t_lp - s_ent), zero).sum(-1)
    has_tail = torch.isfinite(t_tail)
    tail = torch.where(has_tail, t_tail.exp() * (t_tail - s_tail), torch.zeros_like(s_tail))
    return head + tail


def cross_entropy_per_token(student_logits: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Token cross-entropy (B, S) in nats; 0 where labels == IGNORE_INDEX."""
    logits = student_logits[..., :vocab_size].float()
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(labels.shape)


@dataclass
class LossParts:
    """The scalar losses of one batch; ``loss`` is the one to backpropagate."""

    loss: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor
    tokens: int


def distillation_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    target_ids: torch.Tensor,
    target_logprobs: torch.Tensor,
    tail_logprob: torch.Tensor,
    *,
    alpha: float,
    beta: float,
    temperature: float,
    vocab_size: int,
) -> LossParts:
    """``alpha · T² · KL(p_T ‖ q_T) + beta · CE(labels)``, both means over distilled tokens.

    T² keeps the KD gradient's scale independent of T (Hinton et al. 2015). The KD term is skipped
    when alpha is 0 (a CE-only baseline must cost what plain fine-tuning costs); CE is always computed
    because it is the number every run reports.
    """
    mask = labels != IGNORE_INDEX
    # One float32 log-softmax over the vocabulary serves CE and (at T = 1) KD: on a small student the
    # (B, S, V) softmaxes, not the model, dominate the step.
    logp = torch.log_softmax(student_logits[..., :vocab_size].float(), dim=-1)
    safe_labels = labels.clamp(min=0).unsqueeze(-1)
    ce = token_mean(-logp.gather(-1, safe_labels).squeeze(-1), mask)
    kd = student_logits.new_zeros((), dtype=torch.float32)
    if alpha != 0:
        s_logp = logp if temperature == 1.0 else torch.log_softmax(student_logits[..., :vocab_size].float() / temperature, dim=-1)
        kl = sparse_kl_from_logprobs(s_logp, target_ids, target_logprobs, tail_logprob, temperature, vocab_size)
        kd = token_mean(kl, mask) * temperature**2
    return LossParts(loss=alpha * kd + beta * ce, kd=kd.detach(), ce=ce.detach(), tokens=int(mask.sum()))
