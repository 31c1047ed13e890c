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
from typing import Any

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


DIVERGENCES = ("kl", "reverse-kl", "jsd", "tvd")


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
    return sparse_divergence(s_logp, target_ids, target_logprobs, tail_logprob, temperature, vocab_size)


def _buckets(
    s_logp: torch.Tensor, target_ids: torch.Tensor, target_logprobs: torch.Tensor, tail_logprob: torch.Tensor,
    temperature: float, vocab_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher and student log-probs over the same buckets (the used entries, then the tail), (B, S, k+1)
    each, and the mask of buckets that exist (unused slots do not; the tail bucket always does)."""
    t_lp, t_tail = retemper(target_logprobs.float(), tail_logprob.float(), temperature, vocab_size)
    used = torch.isfinite(t_lp)
    s_ent = s_logp.gather(-1, target_ids)  # (B, S, k)
    # Student tail: the mass outside the used entries. Clamped away from 0 so its log and gradient
    # stay finite when the student puts (numerically) all its mass on the entries.
    s_mass = torch.where(used, s_ent.exp(), torch.zeros_like(s_ent)).sum(-1)
    s_tail = torch.log1p(-s_mass.clamp(max=1.0 - 1e-6))
    p = torch.cat([t_lp, t_tail.unsqueeze(-1)], -1)
    q = torch.cat([s_ent, s_tail.unsqueeze(-1)], -1)
    exists = torch.cat([used, torch.ones_like(used[..., :1])], -1)
    return p, q, exists


def sparse_divergence(
    s_logp: torch.Tensor,
    target_ids: torch.Tensor,
    target_logprobs: torch.Tensor,
    tail_logprob: torch.Tensor,
    temperature: float,
    vocab_size: int,
    kind: str = "kl",
    jsd_beta: float = 0.5,
) -> torch.Tensor:
    """A divergence per position (B, S) between the bucketed teacher p and student q, from the student's
    log-probs at temperature T (B, S, V) (computed once by the caller and shared with CE when T = 1).

    - ``kl``: KL(p ‖ q), the usual forward KL;
    - ``reverse-kl``: KL(q ‖ p) over the buckets where p > 0 (where p = 0 it would be infinite: when the
      entries cover the whole vocabulary that bucket is the student's numerically empty tail);
    - ``jsd``: generalized JSD with m = β·q + (1-β)·p: β·KL(p ‖ m) + (1-β)·KL(q ‖ m), so β → 1 is the
      forward KL and β → 0 the reverse one (GKD's convention); β = 0.5 is the symmetric JSD;
    - ``tvd``: total variation, ½ Σ |p - q|.

    All equal their dense definitions when the entries cover the vocabulary. Every term is computed on
    finite stand-ins and masked, so empty buckets give 0 and no NaN reaches the gradient.
    """
    p, q, exists = _buckets(s_logp, target_ids, target_logprobs, tail_logprob, temperature, vocab_size)
    p_pos = exists & torch.isfinite(p)
    q_pos = exists & torch.isfinite(q)
    p0 = torch.where(p_pos, p, torch.zeros_like(p))  # finite stand-ins: where() must never see inf * 0
    q0 = torch.where(q_pos, q, torch.zeros_like(q))
    zero = torch.zeros_like(p)
    if kind == "kl":
        return torch.where(p_pos, p0.exp() * (p0 - q0), zero).sum(-1)
    if kind == "reverse-kl":
        return torch.where(p_pos & q_pos, q0.exp() * (q0 - p0), zero).sum(-1)
    if kind == "tvd":
        pe = torch.where(p_pos, p0.exp(), zero)
        qe = torch.where(q_pos, q0.exp(), zero)
        return 0.5 * torch.where(exists, (pe - qe).abs(), zero).sum(-1)
    if kind == "jsd":
        if not 0.0 < jsd_beta < 1.0:
            raise ValueError(f"jsd_beta must be in (0, 1), got {jsd_beta}")
        pe = torch.where(p_pos, p0.exp(), zero)
        qe = torch.where(q_pos, q0.exp(), zero)
        m = jsd_beta * qe + (1.0 - jsd_beta) * pe
        m_pos = exists & (m > 0)
        log_m = torch.log(torch.where(m_pos, m, torch.ones_like(m)))
        kl_pm = torch.where(p_pos, pe * (p0 - log_m), zero).sum(-1)
        kl_qm = torch.where(q_pos, qe * (q0 - log_m), zero).sum(-1)
        return jsd_beta * kl_pm + (1.0 - jsd_beta) * kl_qm
    raise ValueError(f"unknown divergence {kind!r} (choose from {', '.join(DIVERGENCES)})")


def cross_entropy_per_token(student_logits: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Token cross-entropy (B, S) in nats; 0 where labels == IGNORE_INDEX."""
    logits = student_logits[..., :vocab_size].float()
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(labels.shape)


# Rows of (rows, V) float32 work per chunk of the fused loss: 2^26 floats = 256 MiB whatever V is.
CHUNK_ELEMENTS = 1 << 26


class _FusedKLCE(torch.autograd.Function):
    """``alpha·T²·KL(p_T ‖ q_T) + beta·CE`` and its gradient with respect to the logits, in one pass over
    chunks of rows. Autograd would keep a float32 log-softmax (and at T ≠ 1 a second one) plus the
    gather's scattered gradient, each (B, S, V); this keeps one (B, S, V_s) gradient in the logits'
    dtype and nothing else, and never holds more than a chunk of float32 work. The gradient, per row,
    with q = softmax(z / T), E the used entries and r = p_tail / q_tail:

        ∂KL/∂z_j = (q_j · (1 - r·[j ∉ E]) - p_j·[j ∈ E]) / T,        ∂CE/∂z_j = softmax(z)_j - [j = label].
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, labels: torch.Tensor, target_ids: torch.Tensor, target_logprobs: torch.Tensor,
                tail_logprob: torch.Tensor, alpha: float, beta: float, temperature: float, vocab_size: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        vs = logits.shape[-1]
        z_all = logits.reshape(-1, vs)
        lab_all = labels.reshape(-1)
        ids_all = target_ids.reshape(-1, target_ids.shape[-1])
        lp_all = target_logprobs.reshape(-1, target_logprobs.shape[-1])
        tail_all = tail_logprob.reshape(-1)
        n_tok = (lab_all != IGNORE_INDEX).sum()
        scale = 1.0 / n_tok.clamp(min=1).to(torch.float32)
        grad = torch.zeros_like(z_all)
        kd_sum = z_all.new_zeros((), dtype=torch.float32)
        ce_sum = z_all.new_zeros((), dtype=torch.float32)
        # Chunks bound the float32 work to a quarter of the logits (or CHUNK_ELEMENTS), so the peak is the
        # gradient plus at most two chunk-sized buffers: below plain CE's saved log-softmax plus gradient.
        n_rows = z_all.shape[0]
        rows = max(1, min(CHUNK_ELEMENTS // vocab_size, -(-n_rows // 4)))
        w = alpha * temperature  # T² from the loss, 1/T from the softmax's derivative
        for s in range(0, n_rows, rows):
            lab = lab_all[s : s + rows]
            keep = lab != IGNORE_INDEX
            if not bool(keep.any()):
                continue
            # Softmaxes from one exp pass each (log_softmax and then exp would take two), kept unnormalised:
            # the normalisation, the loss weights and the 1/tokens scale are folded into one per-row factor
            # applied in a single pass. Log-probs are needed only at gathered ids, where z - max - log(sum)
            # gives them exactly. With float32 logits the last buffer is the gradient's own rows.
            z = z_all[s : s + rows, :vocab_size].float()
            zm = z - z.amax(-1, keepdim=True)
            f = (keep.float() * scale).unsqueeze(-1)  # (rows, 1): masked rows get no gradient
            out = grad[s : s + rows, :vocab_size] if grad.dtype == torch.float32 else None
            safe = lab.clamp(min=0).unsqueeze(-1)
            z_lab = zm.gather(-1, safe)
            tempered = bool(alpha) and temperature != 1.0
            if beta or not tempered:
                p_un = torch.exp(zm, out=None if tempered else out)
                z_sum = p_un.sum(-1, keepdim=True)
            else:  # CE is reported but not trained on: no buffer for it
                z_sum = torch.logsumexp(zm, -1, keepdim=True).exp()
            ce_sum += torch.where(keep, (z_sum.log() - z_lab).squeeze(-1), 0.0).sum()
            if alpha:
                ids = ids_all[s : s + rows]
                if tempered:
                    zm.div_(temperature)  # (z - max) / T: zm is not needed any more
                    zt_ent = zm.gather(-1, ids)
                    q_un = torch.exp(zm, out=out)
                    q_sum = q_un.sum(-1, keepdim=True)
                    q_ent = zt_ent - q_sum.log()
                else:
                    q_un, q_sum, q_ent = p_un, z_sum, zm.gather(-1, ids) - z_sum.log()
                p, p_tail = retemper(lp_all[s : s + rows].float(), tail_all[s : s + rows].float(), temperature, vocab_size)
                used = torch.isfinite(p)
                q_mass = torch.where(used, q_ent.exp(), 0.0).sum(-1)
                q_tail = (1.0 - q_mass).clamp(min=1e-6)  # as in _buckets: finite when the entries hold everything
                pe = torch.where(used, p.exp(), 0.0)
                has_tail = torch.isfinite(p_tail)
                pt = torch.where(has_tail, p_tail.exp(), 0.0)
                kl = (pe * torch.where(used, p - q_ent, 0.0)).sum(-1) + torch.where(has_tail, pt * (p_tail - q_tail.log()), 0.0)
                kd_sum += torch.where(keep, kl, 0.0).sum()
                r = (pt / q_tail).unsqueeze(-1)
                # q·w·(1 - r) everywhere, then the named ids (not in the tail) get back w·q·r and lose w·p.
                named = torch.where(used, w * (q_ent.exp() * r - pe), 0.0) * f
                if tempered:
                    g = q_un.mul_(w * (1.0 - r) / q_sum * f)
                    if beta:
                        g.addcmul_(p_un, beta * f / z_sum)
                else:
                    g = q_un.mul_((w * (1.0 - r) + beta) / q_sum * f)  # softmax(z) serves KD and CE alike
                g.scatter_add_(-1, ids, named)
            else:
                g = p_un.mul_(beta * f / z_sum)
            if beta:
                g.scatter_add_(-1, safe, (-beta * f).to(g.dtype))
            if g is not out:
                grad[s : s + rows, :vocab_size] = g
        ctx.save_for_backward(grad)
        ctx.shape = logits.shape
        kd = kd_sum * scale * temperature**2
        ce = ce_sum * scale
        ctx.mark_non_differentiable(kd, ce)
        return alpha * kd + beta * ce, kd, ce

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g_loss: torch.Tensor, *_: Any) -> tuple[Any, ...]:
        (grad,) = ctx.saved_tensors
        # Scaled in place (the graph is used once): a second logits-sized tensor would undo the saving.
        return grad.mul_(g_loss.to(grad.dtype)).view(ctx.shape), None, None, None, None, None, None, None, None


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
    divergence: str = "kl",
    jsd_beta: float = 0.5,
) -> LossParts:
    """``alpha · T² · D(p_T, q_T) + beta · CE(labels)``, both means over distilled tokens; D is the
    forward KL unless ``divergence`` says otherwise (see :func:`sparse_divergence`).

    T² keeps the KD gradient's scale independent of T (Hinton et al. 2015). The KD term is skipped
    when alpha is 0 (a CE-only baseline must cost what plain fine-tuning costs); CE is always computed
    because it is the number every run reports.

    The forward KL (the default) goes through a fused, chunked computation that writes the gradient
    with respect to the logits directly (:class:`_FusedKLCE`), so KD costs about what CE alone costs;
    the other divergences go through autograd.
    """
    mask = labels != IGNORE_INDEX
    if divergence == "kl" and torch.is_grad_enabled() and student_logits.requires_grad:
        loss, kd, ce = _FusedKLCE.apply(student_logits, labels, target_ids, target_logprobs, tail_logprob,
                                        float(alpha), float(beta), float(temperature), vocab_size)
        return LossParts(loss=loss, kd=kd.detach(), ce=ce.detach(), tokens=int(mask.sum()))
    # One float32 log-softmax over the vocabulary serves CE and (at T = 1) KD: on a small student the
    # (B, S, V) softmaxes, not the model, dominate the step.
    logp = torch.log_softmax(student_logits[..., :vocab_size].float(), dim=-1)
    safe_labels = labels.clamp(min=0).unsqueeze(-1)
    ce = token_mean(-logp.gather(-1, safe_labels).squeeze(-1), mask)
    kd = student_logits.new_zeros((), dtype=torch.float32)
    if alpha != 0:
        s_logp = logp if temperature == 1.0 else torch.log_softmax(student_logits[..., :vocab_size].float() / temperature, dim=-1)
        kl = sparse_divergence(s_logp, target_ids, target_logprobs, tail_logprob, temperature, vocab_size, divergence, jsd_beta)
        kd = token_mean(kl, mask) * temperature**2
    return LossParts(loss=alpha * kd + beta * ce, kd=kd.detach(), ce=ce.detach(), tokens=int(mask.sum()))
