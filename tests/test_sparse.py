"""Sparse targets against dense computations."""

import math

import pytest
import torch

from kdcache.sparse import retemper, topk_targets


def test_topk_matches_dense_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(50, 97) * 3
    t = topk_targets(logits, 10, row_chunk=7)  # several chunks
    dense = torch.log_softmax(logits, -1)
    ref_lp, ref_ids = dense.topk(10, -1)
    assert torch.equal(t.ids, ref_ids)
    torch.testing.assert_close(t.logprobs, ref_lp)
    # tail = log(1 - sum(exp(top))) = logsumexp of the rest
    torch.testing.assert_close(t.tail, torch.log1p(-ref_lp.exp().sum(-1)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(t.captured, ref_lp.exp().sum(-1))
    torch.testing.assert_close(t.entropy, -(dense.exp() * dense).sum(-1))


def test_tail_is_exact_when_the_head_holds_almost_everything():
    logits = torch.tensor([[40.0, 0.0, 0.0, 0.0]])  # top-1 mass ≈ 1 - 3e-17
    t = topk_targets(logits, 1)
    expected = math.log(3) - 40.0  # log(3 e^0 / e^40), to first order
    assert t.tail.item() == pytest.approx(expected, rel=1e-5)


def test_full_vocabulary_has_empty_tail_and_bf16_input_is_computed_in_float32():
    logits = torch.randn(4, 16).to(torch.bfloat16)
    t = topk_targets(logits, 16)
    assert torch.isinf(t.tail).all() and (t.tail < 0).all()
    assert t.logprobs.dtype == torch.float32
    torch.testing.assert_close(t.logprobs.exp().sum(-1), torch.ones(4))


def test_retemper_identity_at_t1_and_dense_softmax_when_complete():
    logp = torch.log_softmax(torch.randn(3, 5, 12), -1)
    tail = torch.full((3, 5), float("-inf"))
    assert retemper(logp, tail, 1.0, 12)[0] is logp
    lp_t, tail_t = retemper(logp, tail, 2.5, 12)
    torch.testing.assert_close(lp_t, torch.log_softmax(logp / 2.5, -1))
    assert torch.isinf(tail_t).all()


def test_retemper_tail_is_the_uniform_spread_bucket():
    # With a tail that really is uniform over the remaining ids, retempering is exact.
    V, k, T = 20, 4, 3.0
    probs = torch.tensor([0.4, 0.2, 0.1, 0.1] + [0.2 / 16] * 16)
    lp = probs.log()
    lp_t, tail_t = retemper(lp[:k], torch.log(probs[k:].sum()), T, V)
    dense_t = torch.log_softmax(lp / T, -1)
    torch.testing.assert_close(lp_t, dense_t[:k])
    torch.testing.assert_close(tail_t, torch.logsumexp(dense_t[k:], -1))
    # unused slots (-inf) are not counted as covered ids
    lp_pad = torch.cat([lp[:k], torch.tensor([float("-inf")])])
    lp_t2, tail_t2 = retemper(lp_pad, torch.log(probs[k:].sum()), T, V)
    torch.testing.assert_close(tail_t2, tail_t)
    assert torch.isinf(lp_t2[-1])


def _monte_carlo_mean(make, p_logits, trials=20000):
    """Average of the dense reconstruction over many independent draws for the same distribution."""
    from kdcache.sparse import to_dense

    t = make(p_logits.expand(trials, -1).contiguous())
    return to_dense(t.ids, t.logprobs, p_logits.shape[-1]).mean(0)


def test_sampled_targets_are_unbiased_and_topk_renormalised_is_not():
    from kdcache.sparse import sampled_targets

    torch.manual_seed(0)
    logits = torch.randn(1, 24) * 2
    p = logits.softmax(-1)[0]
    g = torch.Generator().manual_seed(1)
    sample = _monte_carlo_mean(lambda x: sampled_targets(x, 12, generator=g), logits)
    head_and_sample = _monte_carlo_mean(lambda x: sampled_targets(x, 6, k_head=4, generator=g), logits)
    torch.testing.assert_close(sample, p, atol=4e-3, rtol=0)
    torch.testing.assert_close(head_and_sample, p, atol=4e-3, rtol=0)
    # top-4 renormalised (the biased choice): mass moved onto the head, none on the tail
    top = topk_targets(logits, 4)
    renorm = torch.zeros_like(p).scatter_(-1, top.ids[0], (top.logprobs[0] - torch.logsumexp(top.logprobs[0], -1)).exp())
    assert (renorm - p).abs().max() > 0.02


def test_sampled_targets_shape_seed_and_mass():
    from kdcache.sparse import sampled_targets

    logits = torch.randn(5, 50)
    a = sampled_targets(logits, 12, k_head=3, generator=torch.Generator().manual_seed(7))
    b = sampled_targets(logits, 12, k_head=3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.ids, b.ids) and torch.equal(a.logprobs, b.logprobs)  # reproducible from the seed
    assert a.ids.shape == (5, 15) and torch.isinf(a.tail).all()
    lp = a.logprobs
    torch.testing.assert_close(torch.where(torch.isfinite(lp), lp.exp(), 0).sum(-1), torch.ones(5))  # each estimate sums to 1
    torch.testing.assert_close(a.logprobs[:, :3], topk_targets(logits, 3).logprobs)  # the exact head
