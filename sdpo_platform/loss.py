"""The SDPO loss (paper eq. 4), written as the formula, with the diagnostics that say whether it works.

    L = mean over interactions of (1/|y|) Σ_{i ≥ skip} −stopgrad(A_i) · log π_θ(y_i | x, y_<i)

The advantage is detached here, so whatever the caller passes, gradients flow only through the
student log-probs. |y| is the full response length (skipped tokens included), as in the paper.
"""

from __future__ import annotations

from typing import Literal

import torch

Baseline = Literal["none", "sequence_mean"]


def sdpo_loss(
    student_logprobs: list[torch.Tensor],
    advantages: list[torch.Tensor],
    skip: int = 2,
    baseline: Baseline = "none",
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """SDPO loss over a batch of interactions (one 1-D tensor per response) and its diagnostics.

    `sequence_mean` subtracts each sequence's mean advantage over the counted tokens: on the model's
    own samples E[A] = −KL < 0, so without it the loss is an unlikelihood penalty on every token.
    Diagnostics use the raw advantages (before any baseline), over the counted tokens i ≥ skip, except
    `eos_advantage`, the advantage on the last token (EOS): does the follow-up want the answer to stop?
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
    terms = torch.stack(per_interaction)
    if weights is None:
        loss = terms.mean()
    else:
        weights = weights.detach().to(terms.dtype)
        loss = (weights * terms).sum() / weights.sum().clamp_min(1e-12)

    counted = torch.cat([adv.detach()[skip:].float() for adv in advantages])
    diagnostics = {
        "mean_advantage": counted.mean().item() if counted.numel() else 0.0,
        "mean_abs_advantage": counted.abs().mean().item() if counted.numel() else 0.0,
        "eos_advantage": torch.stack([adv.detach()[-1].float() for adv in advantages]).mean().item(),
        "positive_fraction": (counted > 0).float().mean().item() if counted.numel() else 0.0,
        "tokens": float(counted.numel()),
    }
    return loss, diagnostics
