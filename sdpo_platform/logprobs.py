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
    results = []
    for row, (p, r) in enumerate(zip(prompts, responses)):
        start = len(p) - 1
        logits = lm_logits(model, hidden[row, start : start + len(r)]).float()
        targets = torch.tensor(r, device=device)
        results.append(torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1))
    return results
