"""Teacher logits → sparse targets, and re-tempering of sparse targets. Pure tensor maths, no I/O.

A sparse target for one distilled position is the one shape every part of kdcache agrees on:

- ``ids`` (k,): explicit token ids;
- ``logprobs`` (k,): the teacher's log-probabilities of those ids at temperature 1
  (``-inf`` marks an unused slot; its id is meaningless);
- ``tail`` (): the log of the probability mass the explicit entries do not cover
  (``-inf`` when they cover everything, e.g. k = vocabulary size).

``exp(logprobs).sum() + exp(tail) == 1`` up to rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class SparseTargets:
    """A batch of N sparse targets.

    ids: (N, k) int64; logprobs: (N, k) float32; tail: (N,) float32;
    entropy: (N,) float32, the full distribution's entropy in nats (a statistic, not a target);
    captured: (N,) float32, the mass the entries cover.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail: torch.Tensor
    entropy: torch.Tensor
    captured: torch.Tensor


def _entropy(probs: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """-Σ p log p per row (N,), as one batched dot product (a single pass; a product, NaN guard and sum
    would be three). Rows with -inf log-probs (masked vocabulary) give NaN there and are redone safely."""
    h = -(probs.unsqueeze(-2) @ logp.unsqueeze(-1)).view(-1)
    bad = ~torch.isfinite(h)
    if bool(bad.any()):
        h[bad] = -torch.where(probs[bad] > 0, probs[bad] * logp[bad], 0.0).sum(-1)
    return h


@torch.no_grad()
def topk_targets(logits: torch.Tensor, k: int, row_chunk: int = 1024) -> SparseTargets:
    """Exact top-k of ``log_softmax(logits)`` plus the tail bucket, computed on ``logits``' device.

    logits: (N, V), any float dtype; the softmax runs in float32 whatever the model's dtype,
    because a bf16 log-softmax loses the small probabilities the tail is made of.
    Rows are processed ``row_chunk`` at a time so the float32 copy stays bounded.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, V), got {tuple(logits.shape)}")
    n, vocab = logits.shape
    if not 0 < k <= vocab:
        raise ValueError(f"k must be in 1..{vocab}, got {k}")
    parts: list[tuple[torch.Tensor, ...]] = []
    for start in range(0, max(n, 1), row_chunk):
        logp = torch.log_softmax(logits[start : start + row_chunk].float(), dim=-1)
        probs = logp.exp()
        entropy = _entropy(probs, logp)
        top_lp, top_ids = logp.topk(k, dim=-1)
        # The tail as the sum of the remaining probabilities, not 1 - sum(top): when the head holds
        # nearly all the mass, 1 - sum in float32 is mostly rounding error. (In place: probs is done.)
        tail = probs.scatter_(-1, top_ids, 0.0).sum(-1).log()
        parts.append((top_ids, top_lp, tail, entropy, top_lp.exp().sum(-1)))
    ids, lps, tails, ents, caps = (torch.cat(p) for p in zip(*parts))
    return SparseTargets(ids=ids, logprobs=lps, tail=tails, entropy=ents, captured=caps)


def retemper(
    logprobs: torch.Tensor, tail: torch.Tensor, temperature: float, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse targets at temperature 1 → the same targets at ``temperature``, normalised.

    logprobs: (..., k) with ``-inf`` in unused slots; tail: (...). Returns (logprobs_T, tail_T),
    same shapes, with ``logsumexp(cat(logprobs_T, tail_T)) == 0``.

    Explicit entries become ``logprob / T``. The tail's inner distribution is unknown, so it is taken
    as spread evenly over the m = vocab_size - (used slots) ids it covers: each such id has
    probability tail/m, which tempers to (tail/m)^(1/T), and the bucket's unnormalised log-mass is
    ``log m + (log tail - log m) / T``. At T = 1 this is the identity; at T > 1 the bucket grows,
    as the true tail would (flatter distributions move mass to the many small ids).
    """
    if temperature == 1.0:
        return logprobs, tail
    used = torch.isfinite(logprobs).sum(-1)
    m = (vocab_size - used).clamp(min=1).to(logprobs.dtype)
    log_m = torch.log(m)
    has_tail = torch.isfinite(tail) & (vocab_size - used > 0)
    tail_t = torch.where(has_tail, log_m + (tail - log_m) / temperature, torch.full_like(tail, -math.inf))
    entries_t = logprobs / temperature
    z = torch.logsumexp(torch.cat([entries_t, tail_t.unsqueeze(-1)], dim=-1), dim=-1)
    return entries_t - z.unsqueeze(-1), tail_t - z


@torch.no_grad()
def sampled_targets(
    logits: torch.Tensor, n_samples: int, k_head: int = 0, generator: torch.Generator | None = None, row_chunk: int = 1024
) -> SparseTargets:
    """Unbiased sparse estimates of the teacher distribution (random-sampling KD, Anshumann et al. 2025).

    ``k_head = 0`` (``sample``): ``n_samples`` ids drawn with replacement from p; each unique id gets
    weight count / n_samples, so E[weight_i] = p_i. ``k_head > 0`` (``topk+sample``): the exact top-k
    head, plus ``n_samples`` draws from the rest of the distribution (renormalised), each unique id
    weighted tail_mass · count / n_samples, so the estimate of every tail id is unbiased too.

    Returns ids (N, k_head + n_samples), logprobs (log weights; -inf in unused slots, sorted by
    weight within each part), tail (N,) = -inf (the estimate sums to 1), entropy and captured (the
    exact head's mass; 1 - captured is what the samples estimate).
    """
    n, vocab = logits.shape
    if not (0 <= k_head < vocab and 1 <= n_samples <= vocab - k_head):
        raise ValueError(f"need 0 <= k_head < {vocab} and 1 <= n_samples <= {vocab - k_head}, got {k_head}, {n_samples}")
    parts: list[tuple[torch.Tensor, ...]] = []
    for start in range(0, max(n, 1), row_chunk):
        logp = torch.log_softmax(logits[start : start + row_chunk].float(), dim=-1)
        entropy = _entropy(logp.exp(), logp)
        rows = logp.shape[0]
        if k_head:
            head_lp, head_ids = logp.topk(k_head, dim=-1)
            rest = logp.scatter(-1, head_ids, float("-inf"))
            rest_mass = torch.logsumexp(rest, dim=-1)  # log of the mass the head leaves
        else:
            head_lp = logp.new_empty(rows, 0)
            head_ids = torch.empty(rows, 0, dtype=torch.long, device=logp.device)
            rest, rest_mass = logp, logp.new_zeros(rows)
        draws = torch.multinomial(rest.exp(), n_samples, replacement=True, generator=generator)  # (rows, n)
        counts = torch.zeros_like(logp).scatter_add_(-1, draws, torch.ones_like(draws, dtype=logp.dtype))
        top_counts, ids = counts.topk(n_samples, dim=-1)  # at most n_samples unique ids
        weights = torch.where(top_counts > 0, torch.log(top_counts / n_samples) + rest_mass.unsqueeze(-1),
                              torch.full_like(top_counts, float("-inf")))
        parts.append((torch.cat([head_ids, ids], -1), torch.cat([head_lp, weights], -1),
                      torch.full((rows,), float("-inf"), device=logp.device), entropy, head_lp.exp().sum(-1)))
    ids, lps, tails, ents, caps = (torch.cat(p) for p in zip(*parts))
    return SparseTargets(ids=ids, logprobs=lps, tail=tails, entropy=ents, captured=caps)


def round_mantissa(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``x`` rounded to float16, then to ``bits`` (1..10) mantissa bits, round-to-nearest; returned as
    float32 holding exactly the values the cache stores. bits = 10 is a plain float16 cast. Fewer bits
    leave the low bits zero, which the codecs then compress away; non-finite values pass unchanged."""
    x16 = x.to(torch.float16)
    drop = 10 - bits
    if drop <= 0:
        return x16.float()
    v = x16.view(torch.int16).to(torch.int32) & 0xFFFF  # sign | exponent | mantissa as an unsigned int
    # Adding half an ulp to the magnitude and clearing the dropped bits rounds the magnitude to nearest
    # (a carry into the exponent is the correct next power of two).
    # A carry out of the largest finite binade would give ±inf, which means "unused slot": keep the
    # truncated value there instead.
    up = ((v + (1 << (drop - 1))) >> drop) << drop
    down = (v >> drop) << drop
    as_half = lambda u: torch.where(u >= 0x8000, u - 0x10000, u).to(torch.int16).view(torch.float16)
    rounded = torch.where(torch.isfinite(as_half(up)), as_half(up), as_half(down))
    return torch.where(torch.isfinite(x16), rounded, x16).float()


def to_dense(ids: torch.Tensor, logprobs: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Sparse entries (N, k) → dense probabilities (N, V) (the tail bucket is left out); for tests and
    fidelity measurements, never on the training path."""
    probs = torch.where(torch.isfinite(logprobs), logprobs.exp(), torch.zeros_like(logprobs))
    return torch.zeros(ids.shape[0], vocab_size, dtype=probs.dtype, device=probs.device).scatter_add_(-1, ids, probs)


@torch.no_grad()
def fidelity(logits: torch.Tensor, targets: SparseTargets, stored_dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """How far the cached targets are from the teacher's full distribution p, per position.

    logits: (N, V) the teacher's logits over the tokenizer's vocabulary; targets: the N sparse targets
    made from them. The target is reconstructed as training sees it: the entries' log-probs rounded
    to ``stored_dtype`` (what the cache holds), and the tail bucket spread evenly over the ids it covers
    (the assumption :func:`retemper` makes). Returns (N,) float32 tensors:

    - ``captured_mass``: the teacher's own mass on the ids the target names;
    - ``tvd``: total variation ½ Σ |p - q|, the size of the target's error in the KD gradient;
    - ``kl``: KL(p ‖ q) in nats; ``inf`` where q has no mass on an id p gives mass to, which is the
      case for every sampled estimate (it sums to 1 on its samples; it is right on average, not per
      position — see the study in docs/results.md).
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    n, vocab = logp.shape
    lp = targets.logprobs.to(stored_dtype).float()
    used = torch.isfinite(lp)
    q = torch.zeros_like(logp).scatter_add_(-1, targets.ids, torch.where(used, lp.exp(), torch.zeros_like(lp)))
    # scatter_add, not scatter_: several unused slots may share an id with a used one, and scatter_'s
    # write order among duplicates is undefined.
    named = torch.zeros_like(logp).scatter_add_(-1, targets.ids, used.float()) > 0
    m = (vocab - named.sum(-1)).clamp(min=1).unsqueeze(-1)
    q = torch.where(named, q, targets.tail.float().exp().unsqueeze(-1) / m)
    p = logp.exp()
    log_q = torch.where(q > 0, q.log(), torch.full_like(q, float("-inf")))
    kl_terms = torch.where(p > 0, p * (logp - log_q), torch.zeros_like(p))
    return {
        "captured_mass": torch.where(named, p, torch.zeros_like(p)).sum(-1),
        "tvd": 0.5 * (p - q).abs().sum(-1),
        "kl": kl_terms.sum(-1),
    }
