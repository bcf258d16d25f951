"""The scoring engine: log π of each response token after several prompts that share a prefix.

Teacher and student prompts are the same tokens up to where the hindsight block is inserted into the
last user turn, so the engine runs that common prefix once, copies its KV cache into one row per
branch (student, teacher, optionally the neutral-follow-up teacher) and runs only the branch
suffixes plus the response. The LM head and the float32 log-softmax are applied only at the positions
that predict response tokens, in chunks, so no float32 [batch, seq, vocab] tensor ever exists.

Two passes per group of jobs, each batched under a token budget (rows × longest row) and sorted by its
own length, so little compute goes to padding even when prefix and suffix lengths disagree: the prefixes
(right-padded, plain causal mask: a real token never sees the padding after it), then every (job,
branch) suffix on top of its job's cached prefix, the cached prefixes zero-padded to a common width and
masked, each row's position ids continuing from its own prefix length. Every row is exact, whatever its
batch neighbours. On a CPU (budget 0: batching does not pay there, padding does cost) every pass runs a
single row, with no padding at all.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from sdpo_platform.hindsight import common_prefix_length

GPU_TOKEN_BUDGET = 65536  # auto budget on accelerators; on CPU each interaction runs alone (no padding)
PREFIX_CACHE_BUDGETS = 2  # prefix tokens whose KV cache a group holds, in token budgets (16 GB for a 3B Llama at 65k)
MIN_FILL = 0.8  # a pass starts a new batch rather than spend more than 20% of its tokens on padding
# float32 logits held at once by the LM head: 64 MB on CPU (256 positions of SmolLM2's 49k vocabulary),
# 1 GiB on accelerators (~1,700 positions of a 152k vocabulary), where larger matmuls pay.
HEAD_CHUNK_BYTES = {"cpu": 64 * 2**20, "accelerator": 2**30}


@dataclass(frozen=True)
class BranchJob:
    """One response scored after each prompt in `prompts` (the same response ids for every branch)."""

    prompts: tuple[list[int], ...]
    response_ids: list[int]

    def shared_prefix_length(self) -> int:
        """Longest common prefix of all prompts, leaving ≥ 1 prompt token per branch (its last hidden
        state predicts the first response token)."""
        return min(common_prefix_length(*self.prompts), min(len(p) for p in self.prompts) - 1)

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
    """Job indices in length-sorted groups scored together. A group's shared prefixes, whose KV cache is
    held while its branches run, add up to at most `PREFIX_CACHE_BUDGETS` token budgets.

    Within a group the prefix pass and the branch pass are batched separately, each sorted by its own
    length (see `_group_states`), so padding stays small even when prefix and suffix lengths disagree.
    A budget of 0 scores each job alone.
    """
    prefix = [j.shared_prefix_length() for j in jobs]
    order = sorted(range(len(jobs)), key=lambda i: (prefix[i], jobs[i].sequence_tokens()))
    groups: list[list[int]] = []
    held = 0
    for i in order:
        if groups and token_budget > 0 and held + prefix[i] <= token_budget * PREFIX_CACHE_BUDGETS:
            groups[-1].append(i)
            held += prefix[i]
        else:
            groups.append([i])
            held = prefix[i]
    return groups


def length_batches(lengths: list[int], token_budget: int, cached: list[int] | None = None) -> list[list[int]]:
    """Indices sorted by length, cut into batches whose padded size fits the budget and whose real tokens
    fill at least `MIN_FILL` of the padded ones (a long row does not drag many short ones along).

    `cached[i]` is how many cached tokens row i attends to (its prefix): a batch holds every row's cache
    padded to the longest, so the padded size is rows × (longest cache + longest row), which bounds the
    memory of a branch pass as well as its compute. An item larger than the budget still runs, alone.
    """
    cached = cached or [0] * len(lengths)
    batches: list[list[int]] = []
    real = longest_cache = 0
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if batches:
            rows, cache = len(batches[-1]) + 1, max(longest_cache, cached[i])
            if rows * (cache + lengths[i]) <= token_budget and real + lengths[i] >= MIN_FILL * rows * lengths[i]:
                batches[-1].append(i)
                real, longest_cache = real + lengths[i], cache
                continue
        batches.append([i])
        real, longest_cache = lengths[i], cached[i]
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

    `token_budget` bounds each forward pass's padded tokens (see `length_batches`; `resolve_token_budget` for None).
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
            budget = resolve_token_budget(token_budget, next(model.parameters()).device)
            for group in plan_batches(jobs, budget):
                scored = _score_group(model, [jobs[i] for i in group], pad_id, budget, top_k, topk_branch)
                for i, result in zip(group, scored):
                    results[i] = result
                done += len(group)
                tokens += sum(jobs[i].sequence_tokens() for i in group)
                if progress is not None:
                    progress(ScoringProgress(done, len(jobs), tokens, time.monotonic() - started))
    finally:
        model.train(was_training)
    return results


def _score_group(model, jobs: list[BranchJob], pad_id: int, token_budget: int, top_k: int, topk_branch: int) -> list[BranchScores]:
    """Hidden states at the response-predicting positions of every (job, branch), then the head on those only."""
    states = _group_states(model, jobs, pad_id, token_budget)
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


def _group_states(model, jobs: list[BranchJob], pad_id: int, token_budget: int) -> torch.Tensor:
    """Hidden states predicting each response token, rows in (job, branch, token) order.

    Pass 1 runs the shared prefixes, batched by prefix length, and keeps each job's KV cache. Pass 2 runs
    every (job, branch) suffix + response, batched by suffix length, on top of its job's cached prefix.
    Inputs are assembled on the host and moved once per pass.
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    decoder = model.get_decoder()
    prefix_lengths = [j.shared_prefix_length() for j in jobs]

    prefix_cache: list[list[tuple[torch.Tensor, torch.Tensor]] | None] = [None] * len(jobs)
    with_prefix = [i for i, n in enumerate(prefix_lengths) if n > 0]
    for batch in length_batches([prefix_lengths[i] for i in with_prefix], token_budget):
        members = [with_prefix[k] for k in batch]
        width = max(prefix_lengths[i] for i in members)
        ids = torch.full((len(members), width), pad_id, dtype=torch.long)
        for row, i in enumerate(members):
            ids[row, : prefix_lengths[i]] = torch.tensor(jobs[i].prompts[0][: prefix_lengths[i]])
        cache = DynamicCache(config=model.config)
        decoder(input_ids=ids.to(device), cache=cache, use_cache=True)  # causal: a real token never sees the pads after it
        for row, i in enumerate(members):
            n = prefix_lengths[i]
            prefix_cache[i] = [(layer.keys[row : row + 1, :, :n], layer.values[row : row + 1, :, :n]) for layer in cache.layers]

    branches = [(i, b) for i, job in enumerate(jobs) for b in range(len(job.prompts))]
    suffixes = [list(jobs[i].prompts[b][prefix_lengths[i] :]) + list(jobs[i].response_ids) for i, b in branches]
    states: list[torch.Tensor | None] = [None] * len(branches)
    for batch in length_batches([len(s) for s in suffixes], token_budget, cached=[prefix_lengths[i] for i, _ in branches]):
        owners = [branches[r][0] for r in batch]
        width = max(prefix_lengths[i] for i in owners)
        suffix_width = max(len(suffixes[r]) for r in batch)
        ids = torch.full((len(batch), suffix_width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width + suffix_width), dtype=torch.long)
        positions = torch.zeros((len(batch), suffix_width), dtype=torch.long)
        for row, (r, i) in enumerate(zip(batch, owners)):
            ids[row, : len(suffixes[r])] = torch.tensor(suffixes[r])
            mask[row, : prefix_lengths[i]] = 1  # prefix pad slots (shorter prefixes) stay masked
            mask[row, width : width + len(suffixes[r])] = 1
            positions[row] = prefix_lengths[i] + torch.arange(suffix_width)
        cache = _stacked_prefix_cache(model, [prefix_cache[i] for i in owners], width) if width > 0 else None
        hidden = decoder(
            input_ids=ids.to(device),
            # right-padded suffixes need no mask (causal); prefixes shorter than `width` do
            attention_mask=mask.to(device) if any(prefix_lengths[i] < width for i in owners) else None,
            position_ids=positions.to(device),
            cache=cache,
            use_cache=cache is not None,
        ).last_hidden_state
        for row, r in enumerate(batch):
            i, b = branches[r]
            tail = len(jobs[i].prompts[b]) - prefix_lengths[i]
            states[r] = hidden[row, tail - 1 : tail - 1 + len(jobs[i].response_ids)]
    return torch.cat(states)


def _stacked_prefix_cache(model, caches: list, width: int):
    """One DynamicCache with each row's prefix keys/values, zero-padded to `width` (the mask hides the
    padding; a row without a shared prefix is all padding)."""
    from transformers import DynamicCache

    present = [c for c in caches if c is not None]
    if len(caches) == 1 and present[0][0][0].shape[2] == width:
        return DynamicCache(ddp_cache_data=present[0], config=model.config)  # updates concatenate: never mutated
    layers = []
    for layer in range(len(present[0])):
        shape = present[0][layer][0].shape
        keys = present[0][layer][0].new_zeros((len(caches), shape[1], width, shape[3]))
        values = torch.zeros_like(keys)
        for row, cache in enumerate(caches):
            if cache is not None:
                k, v = cache[layer]
                keys[row, :, : k.shape[2]], values[row, :, : v.shape[2]] = k[0], v[0]
        layers.append((keys, values))
    return DynamicCache(ddp_cache_data=layers, config=model.config)


def _head_logprobs(head, states: torch.Tensor, targets: list[int], wants_topk: list[bool], top_k: int):
    """log π of each target (float64 numpy) and, where asked, the top-k ids and log-probs, chunk by chunk."""
    device = states.device
    targets_t = torch.tensor(targets).to(device)
    wants_t = torch.tensor(wants_topk, dtype=torch.bool).to(device)
    budget = HEAD_CHUNK_BYTES["cpu" if device.type == "cpu" else "accelerator"]
    chunk = max(1, budget // (4 * head.weight.shape[0]))
    token_lp, top_ids, top_lp = [], [], []
    for start in range(0, len(targets), chunk):
        logits = head(states[start : start + chunk]).float()
        normalizer = torch.logsumexp(logits, dim=-1)
        token_lp.append(logits.gather(-1, targets_t[start : start + chunk, None]).squeeze(-1) - normalizer)
        chosen = wants_t[start : start + chunk]
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
