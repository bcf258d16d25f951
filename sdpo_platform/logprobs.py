"""Log-probabilities of a response under a prompt: the one primitive teacher, student and eval share.

`response_logprobs` returns log π(y_i | prompt, y_<i) for each response token, computing the LM head
only at the positions that predict response tokens. `batch_response_logprobs` runs the decoder, then the
head on those positions through `heads.lm_logits`, which applies the head as the model's forward does
(logit scaling and soft-capping included).
"""

from __future__ import annotations

import torch

from sdpo_platform.heads import check_lm_logits, lm_logits


def response_logprobs(model, prompt_ids: list[int], response_ids: list[int]) -> torch.Tensor:
    """Per-token log-probs of `response_ids` given `prompt_ids`, shape [len(response_ids)].

    Gradients flow when called outside `no_grad`. Positions predicting y_i are
    len(prompt)-1+i, so the head is applied to the last len(response) hidden states before the end.
    The prompt needs a token (a BOS at least): nothing predicts the response's first token otherwise.
    """
    if not prompt_ids:
        raise ValueError("empty prompt: a response is scored after at least one token")
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt_ids) + list(response_ids)], device=device)
    out = model(input_ids=ids, logits_to_keep=len(response_ids) + 1)
    logits = out.logits[0, :-1].float()  # predicts positions len(prompt) .. end
    targets = torch.tensor(response_ids, device=device)
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def batch_response_logprobs(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int = 0) -> list[torch.Tensor]:
    """Right-padded batch version of `response_logprobs`; returns one tensor per row.

    Right padding keeps position ids identical to the unbatched call, so results match it. A model's
    first use checks that `lm_logits` reproduces its forward (`heads.check_lm_logits`).
    """
    return [_sampled(log_probs, r) for log_probs, r in zip(_response_log_softmax(model, prompts, responses, pad_id), responses)]


def batch_response_logprobs_at(
    model, prompts: list[list[int]], responses: list[list[int]], ids: list[torch.Tensor], pad_id: int = 0
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """`batch_response_logprobs` plus, per row, the log-probs of the token ids `ids[row]` ([len(response), k])
    at each response position, and the log of the probability outside them ([len(response)]): the student's
    side of a top-k loss over the teacher's top-k ids.

    The outside mass is summed over the other tokens' own log-probs, not taken as 1 − Σ top-k, which
    cancels to nothing (and loses its gradient) once the top-k hold nearly all the mass.
    """
    sampled, chosen, outside = [], [], []
    for log_probs, r, at in zip(_response_log_softmax(model, prompts, responses, pad_id), responses, ids, strict=True):
        at = at.to(log_probs.device)
        sampled.append(_sampled(log_probs, r))
        chosen.append(log_probs.gather(-1, at))
        outside.append(logsumexp_outside(log_probs, at))
    return sampled, chosen, outside


def batch_response_log_softmax(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int = 0) -> list[torch.Tensor]:
    """Per row, the whole float32 log-softmax [len(response), vocab] at the positions predicting the response
    (what `batch_response_logprobs` picks the sampled tokens from): for a loss over the whole vocabulary."""
    return list(_response_log_softmax(model, prompts, responses, pad_id))


def sampled_logprobs(log_softmax: list[torch.Tensor], responses: list[list[int]]) -> list[torch.Tensor]:
    """Each row's log-probs of its response tokens, picked from `batch_response_log_softmax`'s rows."""
    return [_sampled(log_probs, r) for log_probs, r in zip(log_softmax, responses, strict=True)]


OUTSIDE_MASK = -1e4  # a masked log-prob: exp() is 0 in float32, yet a top-k covering the vocabulary stays finite


def logsumexp_outside(log_probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log Σ_{v ∉ ids[..., :]} exp(log_probs[..., v]) over the last dimension, differentiable (once) in `log_probs`.

    The same as `logsumexp(log_probs.scatter(-1, ids, OUTSIDE_MASK))`, but autograd would keep that
    masked [rows, vocab] copy until the backward pass, doubling what a row of training holds beside
    the log-softmax itself; this keeps only `log_probs` (which the log-softmax keeps anyway) and masks
    again in the backward pass.
    """
    return _LogSumExpOutside.apply(log_probs, ids)


class _LogSumExpOutside(torch.autograd.Function):
    @staticmethod
    def forward(ctx, log_probs, ids):
        result = torch.logsumexp(log_probs.scatter(-1, ids, OUTSIDE_MASK), dim=-1)  # the copy is freed here
        ctx.save_for_backward(log_probs, ids, result)
        return result

    @staticmethod
    @torch.autograd.function.once_differentiable  # a second derivative is never needed: say so, not a wrong one
    def backward(ctx, grad):
        log_probs, ids, result = ctx.saved_tensors
        # d/d log_probs[v] = softmax over the tokens outside: exp(log_probs[v] − result), 0 at the ids
        grad_log_probs = (log_probs - result.unsqueeze(-1)).exp_().mul_(grad.unsqueeze(-1)).scatter_(-1, ids, 0.0)
        return grad_log_probs, None


def _sampled(log_probs: torch.Tensor, response: list[int]) -> torch.Tensor:
    """Each position's log-prob of the response token it predicts."""
    return log_probs.gather(-1, torch.tensor(response, device=log_probs.device)[:, None]).squeeze(-1)


def _response_log_softmax(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int):
    """Per row, the float32 log-softmax [len(response), vocab] at the positions predicting the response:
    one right-padded decoder pass, the head only where a response token is predicted."""
    if not all(prompts):
        raise ValueError("empty prompt: a response is scored after at least one token")
    check_lm_logits(model, list(prompts[0]) + list(responses[0]))
    device = next(model.parameters()).device
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(seqs), width), dtype=torch.long, device=device)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq, device=device)
        mask[row, : len(seq)] = 1
    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    for row, (p, r) in enumerate(zip(prompts, responses)):
        start = len(p) - 1
        yield torch.log_softmax(lm_logits(model, hidden[row, start : start + len(r)]).float(), dim=-1)
