"""The SDPO loss (paper eq. 4), written as the formula, with the diagnostics that say whether it works.

    L = mean over interactions of (1/|y|) Σ_{i ≥ skip} −stopgrad(A_i) · log π_θ(y_i | x, y_<i)

The advantage is detached here, so whatever the caller passes, gradients flow only through the
student log-probs. |y| is the full response length (skipped tokens included), as in the paper.

The optional top-k forward KL (the earlier SDPO paper's full-logit variant, DESIGN.md) matches the
student to the frozen teacher over the teacher's top-k tokens plus one bucket for the rest:

    L = mean over interactions of (1/|y|) Σ_{i ≥ skip} [ Σ_{v ∈ topk_i} p_T(v) (log p_T(v) − log π_θ(v))
                                                        + m_T (log m_T − log (1 − Σ_{v ∈ topk_i} π_θ(v))) ]

with m_T the teacher's tail mass; the student's tail is summed over the other tokens, since the difference
1 − Σ cancels in float32 once the top-k hold nearly all the mass. It is KL(teacher ‖ student) on that
partition of the vocabulary: forward, not reverse (top-k reverse KL is known to be unstable), and exact
when k covers the vocabulary.

The optional penalty towards a reference model (DESIGN.md: "no KL to a reference model, available as an
option, default 0"), added to the SDPO loss with weight β (`training.kl_coef`):

    β · mean over interactions of (1/|y|) Σ_{i ≥ skip} Σ_v π_θ(v | x, y_<i) (log π_θ(v | x, y_<i) − log π_ref(v | x, y_<i))

the exact KL(π_θ ‖ π_ref) over the whole vocabulary at the logged response's positions. The responses are
logged, not sampled from π_θ, so a one-token estimator of it would be biased; π_ref is the round's base
(the LoRA adapter disabled).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

Baseline = Literal["none", "sequence_mean"]


def sdpo_loss(
    student_logprobs: list[torch.Tensor],
    advantages: list[torch.Tensor],
    skip: int = 2,
    baseline: Baseline = "none",
    weights: torch.Tensor | None = None,
    ends_with_eos: list[bool] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """SDPO loss over a batch of interactions (one 1-D tensor per response) and its diagnostics.

    `sequence_mean` subtracts each sequence's mean advantage over the counted tokens: on the model's
    own samples E[A] = −KL < 0, so without it the loss is an unlikelihood penalty on every token.
    Diagnostics use the raw advantages (before any baseline): `advantage_diagnostics`.
    `weights` (one per interaction, e.g. informativeness) turn the mean over interactions into the
    weighted mean Σ w_n L_n / Σ w_n, so a weakly informative triple teaches proportionally less.
    """
    if baseline not in ("none", "sequence_mean"):
        raise ValueError(f"unknown baseline {baseline!r}")
    per_interaction = []
    for logp, adv in zip(student_logprobs, advantages, strict=True):
        a = adv.detach()[skip:]
        if baseline == "sequence_mean" and a.numel() > 0:
            a = a - a.mean()
        per_interaction.append(-(a * logp[skip:]).sum() / logp.numel())
    return _interaction_mean(per_interaction, weights), advantage_diagnostics(advantages, skip, ends_with_eos)


def reference_kl(
    student_log_softmax: list[torch.Tensor], reference_log_softmax: list[torch.Tensor], skip: int = 2, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, float]:
    """The reference-KL penalty (module docstring, without β) over a batch: per interaction the student's and
    the reference's log-softmax [|y|, vocab] at the response positions; the reference side is detached.
    Returns the penalty and the mean KL per counted token, for the logs."""
    per_interaction, token_kl = [], []
    for student, reference in zip(student_log_softmax, reference_log_softmax, strict=True):
        kl = (student.exp() * (student - reference.detach())).sum(-1)[skip:]
        per_interaction.append(kl.sum() / student.shape[0])
        token_kl.append(kl.detach())
    counted = torch.cat(token_kl)
    return _interaction_mean(per_interaction, weights), float(counted.mean()) if counted.numel() else 0.0


def topk_consistent(topk_ids, topk_logprobs, tail_mass, n_tokens: int, vocab_size: int | None = None) -> bool:
    """One row's stored top-k, as the top-k loss reads it: `n_tokens` rows of k ids (inside the vocabulary
    when its size is given) and k finite log-probs ≤ 0, and a tail mass in [0, 1] per token."""
    try:
        ids, logprobs, tail = (np.asarray(list(map(list, topk_ids))), np.asarray(list(map(list, topk_logprobs)), dtype=float),
                               np.asarray(list(tail_mass), dtype=float))
    except (TypeError, ValueError):  # a missing row (None) or ragged lists
        return False
    return bool(
        ids.ndim == 2 and ids.shape[0] == n_tokens and ids.shape[1] > 0 and logprobs.shape == ids.shape and tail.shape == (n_tokens,)
        and (ids >= 0).all() and (vocab_size is None or (ids < vocab_size).all())
        and np.isfinite(logprobs).all() and (logprobs <= 1e-6).all() and ((tail >= 0) & (tail <= 1 + 1e-6)).all()
    )


def topk_forward_kl(
    student_topk_logprobs: list[torch.Tensor],
    student_tail_logprobs: list[torch.Tensor],
    teacher_topk_logprobs: list[torch.Tensor],
    teacher_tail_mass: list[torch.Tensor],
    skip: int = 2,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Top-k forward KL (module docstring) over a batch: per interaction the student's log-probs at the
    teacher's top-k ids [|y|, k] and of everything else [|y|] (`logprobs.batch_response_logprobs_at`),
    the teacher's top-k log-probs [|y|, k] and tail mass [|y|].

    The teacher side is detached (a frozen target). The student's tail is given, not derived as
    log(1 − Σ top-k): that cancels in float32 when the student is confident, just where the tail term
    must pull. Diagnostics: `kl_per_token` (the mean KL over counted tokens) and `student_topk_mass`
    (how much of the student's probability lies on the teacher's top-k: 1 when it has the teacher's support).
    """
    per_interaction, per_token, mass = [], [], []
    rows = zip(student_topk_logprobs, student_tail_logprobs, teacher_topk_logprobs, teacher_tail_mass, strict=True)
    for student, student_tail, teacher, tail in rows:
        s, s_tail = student[skip:], student_tail[skip:]
        t, m = teacher.detach().to(student.dtype)[skip:], tail.detach().to(student.dtype)[skip:]
        kl = (t.exp() * (t - s)).sum(-1) + torch.xlogy(m, m) - m * s_tail
        per_interaction.append(kl.sum() / student.shape[0])
        per_token.append(kl.detach())
        mass.append(torch.logsumexp(s.detach(), dim=-1).exp())
    counted, mass = torch.cat(per_token), torch.cat(mass)
    diagnostics = {
        "kl_per_token": counted.mean().item() if counted.numel() else 0.0,
        "student_topk_mass": mass.mean().item() if mass.numel() else 0.0,
    }
    return _interaction_mean(per_interaction, weights), diagnostics


def _interaction_mean(per_interaction: list[torch.Tensor], weights: torch.Tensor | None) -> torch.Tensor:
    """The mean over interactions, or Σ w_n L_n / Σ w_n with `weights`."""
    terms = torch.stack(per_interaction)
    if weights is None:
        return terms.mean()
    weights = weights.detach().to(terms.dtype)
    return (weights * terms).sum() / weights.sum().clamp_min(1e-12)


def advantage_diagnostics(advantages: list[torch.Tensor], skip: int = 2, ends_with_eos: list[bool] | None = None) -> dict[str, float]:
    """What the raw advantages say, over the counted tokens i ≥ skip, except `eos_advantage`, the mean
    advantage on the last token of the responses that end with EOS (`ends_with_eos`; all when None): does
    the follow-up want the answer to stop? A batch of responses that were all cut at the length limit has
    no `eos_advantage`."""
    counted = torch.cat([adv.detach()[skip:].float() for adv in advantages])
    diagnostics = {
        "mean_advantage": counted.mean().item() if counted.numel() else 0.0,
        "mean_abs_advantage": counted.abs().mean().item() if counted.numel() else 0.0,
        "positive_fraction": (counted > 0).float().mean().item() if counted.numel() else 0.0,
        "tokens": float(counted.numel()),
    }
    eos = [adv.detach()[-1].float() for adv, ends in zip(advantages, ends_with_eos or [True] * len(advantages), strict=True) if ends]
    if eos:
        diagnostics["eos_advantage"] = torch.stack(eos).mean().item()
    return diagnostics
