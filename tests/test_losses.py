"""Sparse KD losses against dense PyTorch references."""

import pytest
import torch
import torch.nn.functional as F

from kdcache.losses import (
    IGNORE_INDEX,
    distillation_loss,
    sparse_kl_per_token,
    token_mean,
)
from kdcache.sparse import topk_targets


def _dense_kl(student_logits, teacher_logits, T):
    """KL(softmax(t/T) || softmax(s/T)) per position via F.kl_div."""
    return F.kl_div(
        torch.log_softmax(student_logits / T, -1), torch.log_softmax(teacher_logits / T, -1), log_target=True, reduction="none"
    ).sum(-1)


def _targets(teacher_logits, k):
    B, S, V = teacher_logits.shape
    t = topk_targets(teacher_logits.reshape(-1, V), k)
    return t.ids.view(B, S, k), t.logprobs.view(B, S, k), t.tail.view(B, S)


def test_sparse_kl_equals_dense_kl_div_when_k_is_the_vocabulary():
    torch.manual_seed(0)
    B, S, V = 3, 6, 23
    teacher = torch.randn(B, S, V) * 2
    for T in (1.0, 2.0, 4.0):
        student = torch.randn(B, S, V, requires_grad=True)
        ids, lp, tail = _targets(teacher, V)
        sparse = sparse_kl_per_token(student, ids, lp, tail, T, V)
        dense = _dense_kl(student, teacher, T)
        torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)
        (g_sparse,) = torch.autograd.grad(sparse.sum(), student)
        student2 = student.detach().clone().requires_grad_(True)
        (g_dense,) = torch.autograd.grad(_dense_kl(student2, teacher, T).sum(), student2)
        torch.testing.assert_close(g_sparse, g_dense, rtol=1e-5, atol=1e-6)


def test_sparse_kl_with_a_tail_equals_the_dense_bucketed_kl():
    """With k < V, the loss is the KL between teacher and student distributions bucketed into the k
    entries plus one tail bucket (built here densely, independently of the library)."""
    torch.manual_seed(1)
    B, S, V, k = 2, 4, 30, 5
    teacher, student = torch.randn(B, S, V), torch.randn(B, S, V)
    ids, lp, tail = _targets(teacher, k)
    got = sparse_kl_per_token(student, ids, lp, tail, 1.0, V)
    t_p, s_p = teacher.softmax(-1), student.softmax(-1)
    in_head = torch.zeros(B, S, V, dtype=torch.bool).scatter_(-1, ids, True)
    t_b = torch.cat([t_p.gather(-1, ids), (t_p * ~in_head).sum(-1, keepdim=True)], -1)
    s_b = torch.cat([s_p.gather(-1, ids), (s_p * ~in_head).sum(-1, keepdim=True)], -1)
    torch.testing.assert_close(got, (t_b * (t_b.log() - s_b.log())).sum(-1), rtol=1e-4, atol=1e-6)


def test_padded_student_vocabulary_is_ignored():
    torch.manual_seed(2)
    V = 17
    teacher = torch.randn(2, 3, V)
    student = torch.randn(2, 3, V + 7)  # embedding padded past the tokenizer
    ids, lp, tail = _targets(teacher, V)
    got = sparse_kl_per_token(student, ids, lp, tail, 2.0, V)
    torch.testing.assert_close(got, _dense_kl(student[..., :V], teacher, 2.0), rtol=1e-5, atol=1e-6)


def test_fully_masked_batch_gives_zero_loss_and_zero_gradient():
    V, k = 11, 3
    student = torch.randn(2, 4, V, requires_grad=True)
    labels = torch.full((2, 4), IGNORE_INDEX)
    ids = torch.zeros(2, 4, k, dtype=torch.long)
    lp = torch.full((2, 4, k), float("-inf"))  # padding, as collate writes it
    tail = torch.zeros(2, 4)
    parts = distillation_loss(student, labels, ids, lp, tail, alpha=0.7, beta=0.3, temperature=4.0, vocab_size=V)
    assert parts.loss.item() == 0.0 and parts.tokens == 0
    parts.loss.backward()
    assert torch.isfinite(student.grad).all() and (student.grad == 0).all()


def test_distillation_loss_combines_terms_and_masks_padding():
    torch.manual_seed(3)
    B, S, V, k, T = 2, 5, 19, 19, 2.0
    teacher, student = torch.randn(B, S, V), torch.randn(B, S, V)
    labels = torch.randint(0, V, (B, S))
    labels[1, 3:] = IGNORE_INDEX
    ids, lp, tail = _targets(teacher, k)
    lp = torch.where((labels == IGNORE_INDEX).unsqueeze(-1), torch.full_like(lp, float("-inf")), lp)
    parts = distillation_loss(student, labels, ids, lp, tail, alpha=0.7, beta=0.3, temperature=T, vocab_size=V)
    mask = labels != IGNORE_INDEX
    kd = _dense_kl(student, teacher, T)[mask].mean() * T**2
    ce = F.cross_entropy(student.reshape(-1, V), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(parts.kd, kd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.ce, ce)
    torch.testing.assert_close(parts.loss, 0.7 * kd + 0.3 * ce, rtol=1e-5, atol=1e-6)
    assert parts.tokens == int(mask.sum())


def test_token_mean_ignores_nan_in_masked_positions():
    x = torch.tensor([[1.0, float("nan")], [3.0, float("inf")]])
    mask = torch.tensor([[True, False], [True, False]])
    assert token_mean(x, mask).item() == 2.0


def _dense_divergence(kind, student_logits, teacher_logits, T, beta=0.5):
    p = torch.softmax(teacher_logits / T, -1)
    q = torch.softmax(student_logits / T, -1)
    if kind == "kl":
        return (p * (p.log() - q.log())).sum(-1)
    if kind == "reverse-kl":
        return (q * (q.log() - p.log())).sum(-1)
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    m = beta * q + (1 - beta) * p
    return beta * (p * (p.log() - m.log())).sum(-1) + (1 - beta) * (q * (q.log() - m.log())).sum(-1)


@pytest.mark.parametrize("kind", ["kl", "reverse-kl", "jsd", "tvd"])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_every_divergence_equals_its_dense_reference_with_gradients(kind, T):
    from kdcache.losses import sparse_divergence

    torch.manual_seed(4)
    B, S, V = 2, 5, 17
    teacher = torch.randn(B, S, V) * 2
    student = torch.randn(B, S, V, requires_grad=True)
    ids, lp, tail = _targets(teacher, V)
    got = sparse_divergence(torch.log_softmax(student / T, -1), ids, lp, tail, T, V, kind, jsd_beta=0.3 if kind == "jsd" else 0.5)
    ref_student = student.detach().clone().requires_grad_(True)
    ref = _dense_divergence(kind, ref_student, teacher, T, beta=0.3)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=2e-6)
    (g,) = torch.autograd.grad(got.sum(), student)
    (g_ref,) = torch.autograd.grad(ref.sum(), ref_student)
    torch.testing.assert_close(g, g_ref, rtol=1e-3, atol=2e-5)


@pytest.mark.parametrize("kind", ["kl", "reverse-kl", "jsd", "tvd"])
def test_divergences_are_finite_on_top_k_and_masked_batches(kind):
    V, k = 13, 3
    teacher, student = torch.randn(2, 4, V), torch.randn(2, 4, V, requires_grad=True)
    ids, lp, tail = _targets(teacher, k)
    labels = torch.randint(0, V, (2, 4))
    labels[1] = IGNORE_INDEX
    lp[1] = float("-inf")
    tail[1] = 0.0
    parts = distillation_loss(student, labels, ids, lp, tail, alpha=1.0, beta=0.0, temperature=2.0, vocab_size=V, divergence=kind)
    parts.loss.backward()
    assert torch.isfinite(parts.loss) and parts.loss > 0 and torch.isfinite(student.grad).all()


@pytest.mark.parametrize("T, alpha, beta, chunk", [(1.0, 0.9, 0.1, 1 << 26), (2.5, 0.7, 0.3, 7 * 40), (1.0, 1.0, 0.0, 40),
                                                   (2.0, 1.0, 0.0, 40), (3.0, 0.0, 1.0, 40)])
def test_fused_kl_ce_equals_autograd_reference_in_value_and_gradient(T, alpha, beta, chunk, monkeypatch):
    """The fused loss writes its own gradient; it must equal autograd through the unfused definition with
    a tail bucket, masked positions, a padded student vocabulary, unused slots, and several chunks."""
    from kdcache import losses

    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", chunk)  # 40 columns of vocabulary: `chunk // 40` rows per chunk
    torch.manual_seed(int(T * 10) + chunk)
    B, S, V, Vs, k = 3, 6, 40, 48, 5
    teacher = torch.randn(B, S, V) * 2
    student = (torch.randn(B, S, Vs) * 2).requires_grad_()
    labels = torch.randint(0, V, (B, S))
    labels[0, 4:] = IGNORE_INDEX
    labels[2, :] = IGNORE_INDEX
    ids, lp, tail = _targets(teacher, k)
    lp[1, 2, 3:] = float("-inf")  # unused slots (as sampled targets leave them): their mass joins nothing
    tail[1, 2] = torch.log1p(-lp[1, 2, :3].exp().sum())
    parts = distillation_loss(student, labels, ids, lp, tail, alpha=alpha, beta=beta, temperature=T, vocab_size=V)
    parts.loss.backward()
    fused_grad = student.grad.clone()

    ref = student.detach().clone().requires_grad_()
    mask = labels != IGNORE_INDEX
    s_logp = torch.log_softmax(ref[..., :V] / T, -1)
    kd = token_mean(losses.sparse_divergence(s_logp, ids, lp, tail, T, V), mask) * T**2
    ce = token_mean(F.cross_entropy(ref[..., :V].reshape(-1, V), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                                    reduction="none").view(B, S), mask)
    (alpha * kd + beta * ce).backward()
    torch.testing.assert_close(parts.ce, ce.detach(), rtol=1e-5, atol=1e-6)
    if alpha:
        torch.testing.assert_close(parts.kd, kd.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_grad, ref.grad, rtol=1e-4, atol=1e-7)
    assert (fused_grad[..., V:] == 0).all() and (fused_grad[2] == 0).all()


def test_fused_loss_with_bfloat16_logits_matches_float32():
    """Autocast gives bf16 logits: the gradient is then written in bf16 (the logits' dtype), computed in float32."""
    torch.manual_seed(7)
    B, S, V, k = 2, 5, 30, 4
    teacher = torch.randn(B, S, V) * 2
    base = torch.randn(B, S, V) * 2
    labels = torch.randint(0, V, (B, S))
    ids, lp, tail = _targets(teacher, k)
    grads, losses = [], []
    for dtype in (torch.float32, torch.bfloat16):
        x = base.clone().to(dtype).requires_grad_()
        parts = distillation_loss(x, labels, ids, lp, tail, alpha=0.7, beta=0.3, temperature=2.0, vocab_size=V)
        parts.loss.backward()
        assert x.grad.dtype == dtype
        grads.append(x.grad.float())
        losses.append(parts.loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=2e-2, atol=1e-2)
    torch.testing.assert_close(grads[1], grads[0], rtol=3e-2, atol=3e-4)
