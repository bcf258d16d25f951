"""The SDPO loss against hand computations, and where its gradient flows."""

from __future__ import annotations

import pytest
import torch

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
