"""Sparse targets against dense computations."""

import math

import pytest
import torch

from kdcache.sparse import fidelity, retemper, sampled_targets, topk_targets


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


def _reference_fidelity(logits, ids, logprobs, tail):
    """Dense, row by row: the target as training sees it (fp16 entries, tail spread evenly)."""
    out = []
    for row, i, lp, t in zip(logits, ids, logprobs, tail):
        p = torch.softmax(row.double(), -1)
        keep = torch.isfinite(lp)
        q = torch.full_like(p, float(t.double().exp()) / (len(p) - int(keep.sum())) if keep.sum() < len(p) else 0.0)
        q[i[keep]] = lp[keep].half().double().exp()
        kl = float(torch.where(p > 0, p * (p.log() - q.log()), torch.zeros_like(p)).sum())
        out.append((float(p[i[keep]].sum()), 0.5 * float((p - q).abs().sum()), kl))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("k", [1, 7, 64])
def test_fidelity_equals_a_dense_reference(k):
    torch.manual_seed(k)
    logits = torch.randn(20, 64) * 3
    t = topk_targets(logits, k)
    f = fidelity(logits, t)
    ref = _reference_fidelity(logits, t.ids, t.logprobs, t.tail)
    got = torch.stack([f["captured_mass"], f["tvd"], f["kl"]], -1).double()
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    if k == 64:  # the whole vocabulary: only float16 rounding is left
        assert f["kl"].abs().max() < 1e-3 and f["tvd"].max() < 1e-3


def test_fidelity_is_zero_for_a_flat_tail_and_infinite_kl_for_samples():
    logits = torch.zeros(4, 100)
    logits[:, :3] = torch.tensor([4.0, 3.0, 2.0])  # a head of 3 and 97 equal tail ids: the uniform tail is exact
    f = fidelity(logits, topk_targets(logits, 3))
    assert f["kl"].abs().max() < 1e-3 and f["tvd"].max() < 1e-3  # float16 rounding of the head only
    g = torch.Generator().manual_seed(0)
    s = sampled_targets(logits, 5, generator=g)
    f = fidelity(logits, s)
    assert torch.isinf(f["kl"]).all() and (f["tvd"] > 0).all()
    p = torch.softmax(logits, -1)
    named = [p[r, s.ids[r][torch.isfinite(s.logprobs[r])]].sum() for r in range(4)]
    torch.testing.assert_close(f["captured_mass"], torch.stack(named))


@pytest.mark.parametrize("bits", [10, 7, 3])
def test_round_mantissa_rounds_to_nearest_representable(bits):
    from kdcache.sparse import round_mantissa

    torch.manual_seed(bits)
    x = torch.cat([-torch.rand(1000) * 30, torch.tensor([0.0, -1.0, float("-inf"), -65504.0])])
    y = round_mantissa(x, bits)
    x16 = x.half().float()
    assert torch.isneginf(y[-2]) and y[-3] == -1.0 and y[-4] == 0.0
    assert torch.isfinite(y[-1])  # float16's largest magnitude does not round to -inf ("unused slot")
    fin = torch.isfinite(x16)
    fin[-1] = False
    if bits == 10:
        assert torch.equal(y, x16)
    # at most half a unit in the last kept place, relative to the magnitude's power of two
    exponent = torch.floor(torch.log2(x16[fin].abs().clamp(min=2**-14)))
    ulp = 2.0 ** (exponent - bits)
    assert ((y[fin] - x16[fin]).abs() <= ulp / 2 + 1e-12).all()
    # and the result is on the grid: the dropped mantissa bits are zero
    low = (y[fin].half().view(torch.int16).to(torch.int32) & ((1 << (10 - bits)) - 1))
    assert (low == 0).all()
