"""The scoring engine: log π of each response token after several prompts that share a prefix.

Teacher and student prompts are the same tokens up to where the hindsight block is inserted into the
last user turn, so the engine runs that common prefix once, copies its KV cache into one row per
branch (student, teacher, optionally the neutral-follow-up teacher) and runs only the branch
suffixes plus the response. The LM head and the float32 log-softmax are applied only at the positions
that predict response tokens, in chunks, so no float32 [batch, seq, vocab] tensor ever exists.

Rows are sorted by length and packed under a token budget (prefix + every branch suffix, padded), so
little compute goes to padding. Prefixes are right-padded and run with a plain causal mask (a real
token never sees the padding after it); the suffix pass masks those pad slots and continues each row's
position ids from its own prefix length, which makes every row exact, whatever its batch neighbours.
A batch of one job (the CPU default: batching does not pay on a CPU, padding does cost) has no padding
at all: each branch continues from its own copy of the prefix cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

GPU_TOKEN_BUDGET = 16384  # auto budget on accelerators; on CPU each interaction runs alone (no padding)
HEAD_CHUNK = 256  # response positions per LM-head chunk: 256 x 49k vocab x 4 bytes = 50 MB on SmolLM2


@dataclass(frozen=True)
class BranchJob:
    """One response scored after each prompt in `prompts` (the same response ids for every branch)."""

    prompts: tuple[list[int], ...]
    response_ids: list[int]

    def shared_prefix_length(self) -> int:
        """Longest common prefix of all prompts, leaving ≥ 1 prompt token per branch (its last hidden
        state predicts the first response token)."""
        limit = min(len(p) for p in self.prompts) - 1
        first = self.prompts[0]
        n = 0
        while n < limit and all(p[n] == first[n] for p in self.prompts[1:]):
            n += 1
        return n

    def sequence_tokens(self) -> int:
        """Tokens a one-sequence-at-a-time scorer would run: every prompt plus the response, per branch."""
        return sum(len(p) + len(self.response_ids) for p in self.prompts)


@dataclass
class BranchScores:
    """Per-branch log-probs of the response tokens (float64), plus the top-k of one branch if asked."""

    logprobs: list[np.ndarray]
    topk_ids: np.ndarray | None = None  # [n_tokens, k] int
    topk_logprobs: np.ndarray | None = None  # [n_tokens, k] float32, descending
    tail_mass: np.ndarray | None = None  # [n_tokens] probability outside the top-k


@dataclass
class ScoringProgress:
    """Where a scoring run stands; `tokens` counts sequence tokens (see `BranchJob.sequence_tokens`)."""

    interactions_done: int
    interactions_total: int
    tokens_done: int
    elapsed_s: float
    extra: dict = field(default_factory=dict)

    @property
    def interactions_per_s(self) -> float:
        return self.interactions_done / max(self.elapsed_s, 1e-9)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_done / max(self.elapsed_s, 1e-9)

    @property
    def eta_s(self) -> float:
        rate = self.interactions_per_s
        return (self.interactions_total - self.interactions_done) / rate if rate > 0 else float("inf")


ProgressCallback = Callable[[ScoringProgress], None]


def resolve_token_budget(token_budget: int | None, device: torch.device) -> int:
    """An explicit budget as is; None → one job per batch on CPU, `GPU_TOKEN_BUDGET` elsewhere."""
    if token_budget is not None:
        return token_budget
    return 0 if torch.device(device).type == "cpu" else GPU_TOKEN_BUDGET


def plan_batches(jobs: list[BranchJob], token_budget: int) -> list[list[int]]:
    """Job indices in length-sorted batches whose padded cost (prefix + branches × suffix) fits the budget.

    A single job larger than the budget still runs, alone.
    """
    prefix = [j.shared_prefix_length() for j in jobs]
    suffix = [max(len(p) for p in j.prompts) - s + len(j.response_ids) for j, s in zip(jobs, prefix)]
    order = sorted(range(len(jobs)), key=lambda i: (prefix[i] + suffix[i], suffix[i]))
    batches: list[list[int]] = []
    for i in order:
        if batches:
            rows = batches[-1] + [i]
            cost = len(rows) * (max(prefix[r] for r in rows) + len(jobs[i].prompts) * max(suffix[r] for r in rows))
            if cost <= token_budget:
                batches[-1].append(i)
                continue
        batches.append([i])
    return batches


def score_jobs(
    model,
    jobs: list[BranchJob],
    pad_id: int,
    token_budget: int | None = None,
    top_k: int = 0,
    topk_branch: int = 1,
    progress: ProgressCallback | None = None,
) -> list[BranchScores]:
    """Scores for each job, in input order. Every job must have the same number of branches.

    `token_budget` bounds each batch's padded tokens (see `resolve_token_budget` for None).
    `top_k > 0` also returns, for branch `topk_branch` (the teacher in `targets`), the k most likely
    token ids per response position with their log-probs and the probability mass outside them.
    The model runs in eval mode under `torch.inference_mode` and its mode is restored after.
    """
    if not jobs:
        return []
    if len({len(j.prompts) for j in jobs}) != 1:
        raise ValueError("all jobs need the same number of branches")
    results: list[BranchScores | None] = [None] * len(jobs)
    started, done, tokens = time.monotonic(), 0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in plan_batches(jobs, resolve_token_budget(token_budget, next(model.parameters()).device)):
                scored = _score_batch(model, [jobs[i] for i in batch], pad_id, top_k, topk_branch)
                for i, result in zip(batch, scored):
                    results[i] = result
                done += len(batch)
                tokens += sum(jobs[i].sequence_tokens() for i in batch)
                if progress is not None:
                    progress(ScoringProgress(done, len(jobs), tokens, time.monotonic() - started))
    finally:
        model.train(was_training)
    return results


def _score_batch(model, jobs: list[BranchJob], pad_id: int, top_k: int, topk_branch: int) -> list[BranchScores]:
    """Hidden states at the response-predicting positions of every (job, branch), then the head on those only."""
    states = _single_job_states(model, jobs[0]) if len(jobs) == 1 else _padded_batch_states(model, jobs, pad_id)
    n_branches = len(jobs[0].prompts)
    targets = [t for job in jobs for _ in job.prompts for t in job.response_ids]
    wants_topk = [top_k > 0 and b == topk_branch for job in jobs for b in range(n_branches) for _ in job.response_ids]
    token_lp, top_ids, top_lp = _head_logprobs(model.get_output_embeddings(), states, targets, wants_topk, top_k)

    results, offset, topk_offset = [], 0, 0
    for job in jobs:
        n = len(job.response_ids)
        result = BranchScores(logprobs=[token_lp[offset + b * n : offset + (b + 1) * n] for b in range(n_branches)])
        offset += n_branches * n
        if top_k > 0:
            lp = top_lp[topk_offset : topk_offset + n]
            result.topk_ids = top_ids[topk_offset : topk_offset + n]
            result.topk_logprobs = lp.numpy().astype(np.float32)
            result.tail_mass = (-torch.expm1(torch.logsumexp(lp, dim=-1))).clamp(min=0.0).numpy().astype(np.float32)
            topk_offset += n
        results.append(result)
    return results


def _single_job_states(model, job: BranchJob) -> torch.Tensor:
    """One job, no padding at all: the prefix once, then each branch from its own copy of the prefix cache."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    decoder = model.get_decoder()
    n = job.shared_prefix_length()
    snapshot = None
    if n > 0:
        cache = DynamicCache(config=model.config)
        decoder(input_ids=torch.tensor([job.prompts[0][:n]], device=device), cache=cache, use_cache=True)
        snapshot = [(layer.keys, layer.values) for layer in cache.layers]  # updates concatenate: never mutated
    states = []
    for prompt in job.prompts:
        suffix = torch.tensor([list(prompt[n:]) + list(job.response_ids)], device=device)
        branch_cache = DynamicCache(ddp_cache_data=snapshot, config=model.config) if snapshot else None
        positions = n + torch.arange(suffix.shape[1], device=device)[None]
        hidden = decoder(input_ids=suffix, position_ids=positions, cache=branch_cache, use_cache=branch_cache is not None).last_hidden_state
        tail = len(prompt) - n
        states.append(hidden[0, tail - 1 : tail - 1 + len(job.response_ids)])
    return torch.cat(states)


def _padded_batch_states(model, jobs: list[BranchJob], pad_id: int) -> torch.Tensor:
    """Several jobs: right-padded prefixes in one pass, the cache repeated per branch, padded suffixes."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    decoder = model.get_decoder()
    n_branches = len(jobs[0].prompts)
    prefix_lengths = [j.shared_prefix_length() for j in jobs]
    width = max(prefix_lengths)

    cache = None
    if width > 0:
        prefix_ids = torch.full((len(jobs), width), pad_id, dtype=torch.long, device=device)
        for row, (job, n) in enumerate(zip(jobs, prefix_lengths)):
            prefix_ids[row, :n] = torch.tensor(job.prompts[0][:n], device=device)
        cache = DynamicCache(config=model.config)
        decoder(input_ids=prefix_ids, cache=cache, use_cache=True)  # causal: a real token never sees the pads after it
        cache.batch_repeat_interleave(n_branches)  # row = job * n_branches + branch

    suffixes, prompt_tails, owners = [], [], []
    for row, (job, n) in enumerate(zip(jobs, prefix_lengths)):
        for prompt in job.prompts:
            suffixes.append(list(prompt[n:]) + list(job.response_ids))
            prompt_tails.append(len(prompt) - n)
            owners.append(row)
    suffix_width = max(len(s) for s in suffixes)
    suffix_ids = torch.full((len(suffixes), suffix_width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(suffixes), width + suffix_width), dtype=torch.long, device=device)
    positions = torch.zeros((len(suffixes), suffix_width), dtype=torch.long, device=device)
    for row, (suffix, owner) in enumerate(zip(suffixes, owners)):
        suffix_ids[row, : len(suffix)] = torch.tensor(suffix, device=device)
        mask[row, : prefix_lengths[owner]] = 1  # the prefix's pad slots are masked out here
        mask[row, width : width + len(suffix)] = 1
        positions[row] = prefix_lengths[owner] + torch.arange(suffix_width, device=device)
    hidden = decoder(
        input_ids=suffix_ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=cache is not None
    ).last_hidden_state

    rows, cols = [], []
    for row, (tail, owner) in enumerate(zip(prompt_tails, owners)):
        n = len(jobs[owner].response_ids)
        rows += [row] * n
        cols += range(tail - 1, tail - 1 + n)
    return hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]


def _head_logprobs(head, states: torch.Tensor, targets: list[int], wants_topk: list[bool], top_k: int):
    """log π of each target (float64 numpy) and, where asked, the top-k ids and log-probs, chunk by chunk."""
    device = states.device
    targets_t = torch.tensor(targets, device=device)
    wants_t = torch.tensor(wants_topk, dtype=torch.bool, device=device)
    token_lp, top_ids, top_lp = [], [], []
    for start in range(0, len(targets), HEAD_CHUNK):
        logits = head(states[start : start + HEAD_CHUNK]).float()
        normalizer = torch.logsumexp(logits, dim=-1)
        token_lp.append(logits.gather(-1, targets_t[start : start + HEAD_CHUNK, None]).squeeze(-1) - normalizer)
        chosen = wants_t[start : start + HEAD_CHUNK]
        if chosen.any():
            values, ids = logits[chosen].topk(top_k, dim=-1)
            top_ids.append(ids)
            top_lp.append(values - normalizer[chosen, None])
    return (
        torch.cat(token_lp).double().cpu().numpy(),
        torch.cat(top_ids).cpu().numpy() if top_ids else None,
        torch.cat(top_lp).cpu() if top_lp else None,
    )


def progress_logger(log: Callable[[str], None], every: float = 0.1) -> ProgressCallback:
    """A progress callback for long runs that writes a line to `log` every `every` of the work (and at
    the end): interactions and tokens per second and the ETA. Orchestrators pass their logger here."""
    reported = [-1]

    def report(p: ScoringProgress) -> None:
        step = int(p.interactions_done / max(p.interactions_total, 1) / every)
        if step > reported[0] or (p.interactions_done == p.interactions_total and not p.extra):
            reported[0] = step
            log(
                f"hindsight targets: {p.interactions_done}/{p.interactions_total} interactions, "
                f"{p.interactions_per_s:.2f} interactions/s, {p.tokens_per_s:.0f} tokens/s, ETA {p.eta_s:.0f}s"
            )

    return report
