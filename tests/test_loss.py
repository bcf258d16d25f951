"""The SDPO loss against hand computations, and where its gradient flows."""

from __future__ import annotations

import pytest
import torch

from sdpo_platform.logprobs import OUTSIDE_MASK, logsumexp_outside
from sdpo_platform.loss import sdpo_loss


def tensors(*values):
    return [torch.tensor(v, dtype=torch.float32) for v in values]


def test_loss_matches_hand_computation_with_default_skip():
    # interaction 1: |y| = 3, skip = 2 counts only token 3: −(1.2 · −0.5) / 3 = 0.2
    # interaction 2: |y| = 2, nothing counted: 0
    # mean over interactions: (0.2 + 0) / 2 = 0.1
    logp = tensors([-1.0, -2.0, -0.5], [-0.1, -3.0])
    adv = tensors([0.3, -0.4, 1.2], [2.0, 0.5])
    loss, diag = sdpo_loss(logp, adv)
    assert loss.item() == pytest.approx(0.1)
    assert diag["tokens"] == 1.0
    assert diag["mean_advantage"] == pytest.approx(1.2)
    assert diag["positive_fraction"] == pytest.approx(1.0)
    assert diag["eos_advantage"] == pytest.approx((1.2 + 0.5) / 2)


def test_loss_matches_hand_computation_with_skip_one():
    # interaction 1: −[(−0.4)(−2.0) + (1.2)(−0.5)] / 3 = −(0.8 − 0.6) / 3 = −0.0667
    # interaction 2: −[(0.5)(−3.0)] / 2 = 0.75
    # mean: (−0.0667 + 0.75) / 2 = 0.341667
    logp = tensors([-1.0, -2.0, -0.5], [-0.1, -3.0])
    adv = tensors([0.3, -0.4, 1.2], [2.0, 0.5])
    loss, diag = sdpo_loss(logp, adv, skip=1)
    assert loss.item() == pytest.approx((-0.2 / 3 + 0.75) / 2)
    assert diag["tokens"] == 3.0
    assert diag["mean_advantage"] == pytest.approx((-0.4 + 1.2 + 0.5) / 3)
    assert diag["mean_abs_advantage"] == pytest.approx((0.4 + 1.2 + 0.5) / 3)
    assert diag["positive_fraction"] == pytest.approx(2 / 3)


def test_gradient_flows_only_through_student_logprobs():
    logp = torch.tensor([-1.0, -2.0, -0.5, -0.7], requires_grad=True)
    adv = torch.tensor([0.3, -0.4, 1.2, -2.0], requires_grad=True)
    loss, _ = sdpo_loss([logp], [adv], skip=2)
    loss.backward()
    assert adv.grad is None  # stop-gradient on A
    # d loss / d logp_i = −A_i / |y| for i ≥ skip, 0 for the skipped tokens
    assert torch.allclose(logp.grad, torch.tensor([0.0, 0.0, -1.2 / 4, 2.0 / 4]))


def test_advantage_computed_from_the_student_itself_gets_no_gradient():
    """The training loop passes A = teacher − student; only the log π_θ factor may carry gradient."""
    logp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    teacher = torch.tensor([-0.5, -0.5, -0.5])
    loss, _ = sdpo_loss([logp], [teacher - logp], skip=0)
    loss.backward()
    expected = -(teacher - logp.detach()) / 3
    assert torch.allclose(logp.grad, expected)


def test_sequence_mean_baseline_centres_counted_advantages():
    # counted A (skip=1) = [−0.4, 1.2], mean 0.4 → [−0.8, 0.8]
    # loss = −[(−0.8)(−2.0) + (0.8)(−0.5)] / 3 = −(1.6 − 0.4) / 3 = −0.4
    logp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    adv = torch.tensor([0.3, -0.4, 1.2])
    loss, diag = sdpo_loss([logp], [adv], skip=1, baseline="sequence_mean")
    assert loss.item() == pytest.approx(-0.4)
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([0.0, 0.8 / 3, -0.8 / 3]))
    assert diag["mean_advantage"] == pytest.approx(0.4)  # diagnostics stay on the raw advantage


def test_sequence_mean_makes_a_constant_advantage_a_no_op():
    """A uniform shift of A (e.g. the template's offset) carries no signal once centred."""
    logp = torch.tensor([-1.0, -2.0, -0.5, -3.0], requires_grad=True)
    loss, _ = sdpo_loss([logp], [torch.full((4,), -0.7)], skip=2, baseline="sequence_mean")
    loss.backward()
    assert loss.item() == pytest.approx(0.0)
    assert torch.count_nonzero(logp.grad) == 0


def test_unknown_baseline_is_rejected():
    with pytest.raises(ValueError):
        sdpo_loss(tensors([-1.0]), tensors([1.0]), baseline="neutral")


def test_informativeness_weights_give_a_weighted_mean_and_silence_zero_weight_triples():
    # per-interaction terms with skip = 1: a = −[(−0.4)(−2.0) + (1.2)(−0.5)] / 3 = −0.2/3, b = −(0.5 · −3.0) / 2 = 0.75
    logp = [torch.tensor([-1.0, -2.0, -0.5], requires_grad=True), torch.tensor([-0.1, -3.0], requires_grad=True)]
    adv = tensors([0.3, -0.4, 1.2], [2.0, 0.5])
    loss, _ = sdpo_loss(logp, adv, skip=1, weights=torch.tensor([0.9, 0.1]))
    assert loss.item() == pytest.approx((0.9 * (-0.2 / 3) + 0.1 * 0.75) / 1.0)
    loss, _ = sdpo_loss(logp, adv, skip=1, weights=torch.tensor([1.0, 0.0]))
    loss.backward()
    assert logp[1].grad.abs().sum().item() == 0.0  # a zero-weight triple teaches nothing
    assert logp[0].grad.abs().sum().item() > 0.0


def _partition_kl(p: torch.Tensor, q: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """KL between the coarse distributions [top-k tokens..., everything else], computed the plain way."""
    coarse = lambda d: torch.cat([d.gather(-1, top), 1 - d.gather(-1, top).sum(-1, keepdim=True)], -1)  # noqa: E731
    cp, cq = (coarse(d) if top.shape[-1] < d.shape[-1] else d.gather(-1, top) for d in (p, q))  # no tail when k = vocabulary
    return (cp * (cp.log() - cq.log())).sum(-1)


@pytest.mark.parametrize("k", [7, 3])
def test_topk_forward_kl_is_the_kl_over_topk_plus_a_tail_bucket_with_gradient_q_minus_p(k):
    """k = vocabulary: the full forward KL, whose gradient in the student's logits is (q − p) / |y|."""
    from sdpo_platform.loss import topk_forward_kl

    torch.manual_seed(0)
    vocab, n = 7, 4
    p = torch.softmax(torch.randn(n, vocab) * 2, -1)
    logits = torch.randn(n, vocab, requires_grad=True)
    q = torch.softmax(logits, -1)
    top_lp, top = p.log().topk(k, -1)
    tail = (1 - top_lp.exp().sum(-1)).clamp(min=0) if k < vocab else torch.zeros(n)  # nothing outside the vocabulary
    log_q = torch.log_softmax(logits, -1)
    student_topk, student_tail = log_q.gather(-1, top), logsumexp_outside(log_q, top)
    loss, diagnostics = topk_forward_kl([student_topk], [student_tail], [top_lp], [tail], skip=0)

    expected = _partition_kl(p, q, top)
    assert loss.item() == pytest.approx(expected.sum().item() / n, rel=1e-5)
    assert diagnostics["kl_per_token"] == pytest.approx(expected.mean().item(), rel=1e-5)
    loss.backward()
    if k == vocab:
        torch.testing.assert_close(logits.grad, (q - p).detach() / n, atol=1e-6, rtol=1e-5)
        assert loss.item() == pytest.approx(torch.nn.functional.kl_div(q.log(), p, reduction="sum").item() / n, rel=1e-5)


def test_topk_forward_kl_is_zero_at_the_teacher_skips_tokens_and_never_moves_the_teacher():
    from sdpo_platform.loss import topk_forward_kl

    torch.manual_seed(1)
    log_p = torch.log_softmax(torch.randn(5, 50), -1)
    top_lp, top = log_p.topk(4, -1)
    tail = 1 - top_lp.exp().sum(-1)
    teacher = top_lp.clone().requires_grad_(True)
    outside = logsumexp_outside(log_p, top)
    loss, diagnostics = topk_forward_kl([log_p.gather(-1, top)], [outside], [teacher], [tail], skip=0)
    assert abs(loss.item()) < 1e-6 and diagnostics["student_topk_mass"] == pytest.approx(float(top_lp.exp().sum(-1).mean()), rel=1e-5)
    student = torch.log_softmax(torch.randn(5, 50), -1).requires_grad_(True)
    skipped, _ = topk_forward_kl([student.gather(-1, top)], [outside], [teacher], [tail], skip=5)
    skipped.backward()
    assert skipped.item() == 0.0 and teacher.grad is None  # all tokens skipped; the teacher is a constant


def test_a_confident_student_still_feels_the_tail():
    """Once the top-k hold nearly all the student's mass, 1 − Σ top-k cancels in float32: the tail term
    must still pull, with gradient −m_T spread over the tail logits (softmax of the tail)."""
    from sdpo_platform.loss import topk_forward_kl

    logits = torch.tensor([[30.0, 0.0, -2.0, -3.0]], requires_grad=True)  # top-1 holds 1 − 1e-13 of the mass
    top = torch.tensor([[0]])
    log_q = torch.log_softmax(logits, -1)
    teacher_top, teacher_tail = torch.tensor([[0.8]]).log(), torch.tensor([0.2])
    loss, _ = topk_forward_kl([log_q.gather(-1, top)], [logsumexp_outside(log_q, top)], [teacher_top], [teacher_tail], skip=0)
    loss.backward()
    q = torch.softmax(logits.detach().double(), -1)
    exact = 0.8 * (0.8 / q[0, 0]).log() + 0.2 * (0.2 / q[0, 1:].sum()).log()
    assert loss.item() == pytest.approx(exact.item(), rel=1e-4)
    assert logits.grad[0, 1:].sum().item() == pytest.approx(-0.2, rel=1e-3)  # (q − p) summed over the tail


def test_eos_advantage_counts_only_responses_that_end_with_eos():
    """A response cut at the length limit ends mid-answer: its last advantage says nothing about stopping."""
    logp = tensors([-1.0, -2.0, -0.5], [-0.1, -3.0], [-0.2, -0.4])
    adv = tensors([0.3, -0.4, 1.2], [2.0, 0.5], [0.1, -0.9])
    _, diag = sdpo_loss(logp, adv, ends_with_eos=[True, False, True])
    assert diag["eos_advantage"] == pytest.approx((1.2 - 0.9) / 2)
    _, diag = sdpo_loss(logp, adv, ends_with_eos=[False, False, False])
    assert "eos_advantage" not in diag and diag["tokens"] == 1.0  # the loss's other diagnostics are unchanged


def test_the_outside_mass_matches_the_masked_logsumexp_and_keeps_no_masked_copy_for_backward():
    """Value and gradient equal the plain masked logsumexp; autograd holds no second [rows, vocab] tensor."""
    torch.manual_seed(2)
    logits = torch.randn(6, 40, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 40, (6, 5))
    reference = lambda lp: torch.logsumexp(lp.scatter(-1, ids, OUTSIDE_MASK), -1)
    ours = lambda lp: logsumexp_outside(lp, ids)
    weights = torch.randn(6, dtype=torch.float64)

    def value_and_gradient(f):
        logits.grad = None
        value = f(torch.log_softmax(logits, -1))
        (value * weights).sum().backward()
        return value.detach(), logits.grad.clone()

    for got, expected in zip(value_and_gradient(ours), value_and_gradient(reference)):
        torch.testing.assert_close(got, expected)
    assert torch.autograd.gradcheck(lambda x: logsumexp_outside(x, ids), (logits.detach().clone().requires_grad_(True),))
    for shape in ((40,), (2, 3, 40)):  # any number of leading dimensions, as logsumexp takes
        values, at = torch.randn(*shape, dtype=torch.float64, requires_grad=True), torch.randint(0, 40, (*shape[:-1], 5))
        logsumexp_outside(values, at).sum().backward()
        expected = torch.autograd.grad(torch.logsumexp(values.scatter(-1, at, OUTSIDE_MASK), -1).sum(), values)[0]
        torch.testing.assert_close(values.grad, expected)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):  # refused, never a wrong second derivative
        x = logits.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(logsumexp_outside(x, ids).sum(), x, create_graph=True)
        grad.sum().backward()

    def vocab_sized_bytes_saved(f) -> int:
        saved = {}
        def pack(t):
            if t.dim() == 2 and t.shape[-1] == 40 and t.dtype.is_floating_point:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            f(torch.log_softmax(logits, -1))
        return sum(saved.values())
    one_copy = 6 * 40 * 8
    assert vocab_sized_bytes_saved(reference) == 2 * one_copy  # the log-softmax and the masked copy
    assert vocab_sized_bytes_saved(ours) == one_copy  # the log-softmax only


def test_reference_kl_is_the_exact_kl_to_the_reference_over_the_counted_tokens():
    """KL(π_θ ‖ π_ref) summed over the vocabulary at each position, (1/|y|) over positions ≥ skip, mean over
    interactions; checked against torch's own kl_div, with no gradient into the reference."""
    import torch.nn.functional as F

    from sdpo_platform.loss import reference_kl

    torch.manual_seed(0)
    logits = [torch.randn(n, 11, requires_grad=True) for n in (5, 3)]
    references = [torch.log_softmax(torch.randn(n, 11), -1).requires_grad_() for n in (5, 3)]
    students = [torch.log_softmax(x, -1) for x in logits]
    penalty, token_kl = reference_kl(students, references, skip=2)
    per_token = [F.kl_div(r, s, log_target=True, reduction="none").sum(-1) for s, r in zip(students, references)]
    expected = torch.stack([kl[2:].sum() / kl.numel() for kl in per_token]).mean()
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-6)
    assert token_kl == pytest.approx(torch.cat([kl[2:] for kl in per_token]).mean().item(), rel=1e-6)
    penalty.backward()
    assert all(r.grad is None for r in references) and all(x.grad.abs().sum() > 0 for x in logits)
    zero, _ = reference_kl([r.detach() for r in references], references, skip=0)
    assert zero.item() == pytest.approx(0.0, abs=1e-7)  # the student at the reference pays nothing
