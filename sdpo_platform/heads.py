"""The LM head as the model's own forward applies it, for code that runs the head on chosen positions only.

Scoring and training run the decoder, then the head only where a response token is predicted. Some
architectures post-process the head's output in their forward, and skipping that scores silently wrong
(1.6–6.9 nats per token on the tiny models of the tests): Gemma2/Gemma3 cap the logits softly
(`final_logit_softcapping`: c·tanh(z/c)), the Granite family divides them (`logits_scaling`), Cohere
multiplies them (`logit_scale`). `lm_logits` applies those, in that model's dtype as its forward does.
An architecture with another post-processing is caught by `check_lm_logits`, once per model object: it
compares `lm_logits` with the model's own forward on a few tokens and raises rather than score wrong.
"""

from __future__ import annotations

import weakref

import torch

GUARD_TOKENS = 16  # tokens the guard runs through both paths (the longer, the more logits it compares)
_checked: weakref.WeakSet = weakref.WeakSet()  # model objects whose head `check_lm_logits` already verified


def lm_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Logits for decoder hidden states [..., hidden], equal to what `model(...)` returns for them."""
    config = model.config
    logits = model.get_output_embeddings()(hidden)
    if getattr(config, "logit_scale", None) is not None:  # Cohere, Cohere2
        logits = logits * config.logit_scale
    if getattr(config, "logits_scaling", None) is not None:  # Granite, GraniteMoe*
        logits = logits / config.logits_scaling
    if getattr(config, "final_logit_softcapping", None) is not None:  # Gemma2, Gemma3 (text)
        cap = config.final_logit_softcapping
        logits = torch.tanh(logits / cap) * cap
    return logits


def check_lm_logits(model, token_ids: list[int]) -> None:
    """Raise if `lm_logits` differs from the model's own forward on `token_ids` (its first `GUARD_TOKENS`).

    Runs once per model object (later calls return at once), in eval mode and without gradients, so an
    architecture whose forward post-processes its logits in a way `lm_logits` does not know fails loudly.
    The two paths share the decoder and the head's matmul, so they agree to rounding; the tolerance
    allows a few roundings of 16-bit logits (2⁻⁸ of their size each), nothing like a real rescaling or cap.
    """
    if model in _checked:
        return
    ids = torch.tensor([list(token_ids)[:GUARD_TOKENS]], device=next(model.parameters()).device)
    if ids.shape[1] == 0:
        raise ValueError("check_lm_logits needs at least one token")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = model(input_ids=ids, logits_to_keep=ids.shape[1]).logits.float()
            got = lm_logits(model, model.get_decoder()(input_ids=ids).last_hidden_state).float()
    finally:
        model.train(was_training)
    wide = model.get_output_embeddings().weight.element_size() >= 4  # float32 head: agreement to ~1e-6
    tolerance = 1e-4 + 1e-5 * float(expected.abs().max()) if wide else 1e-2 + 2**-6 * float(expected.abs().max())
    gap = float((torch.log_softmax(got, -1) - torch.log_softmax(expected, -1)).abs().max()) if got.shape == expected.shape else float("inf")
    if not gap <= tolerance:
        raise NotImplementedError(
            f"{type(model).__name__} (model_type {model.config.model_type!r}): its forward post-processes the LM head's "
            f"logits in a way sdpo_platform.heads.lm_logits does not reproduce (log-probs differ by up to {gap:.3g} > "
            f"{tolerance:.3g}); teach lm_logits that step before scoring or training with this model"
        )
    _checked.add(model)
