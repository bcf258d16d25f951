"""The scoring engine: log π of each response token after several prompts, running shared tokens once.

Scoring needs, per interaction, the response after the student prompt and after each teacher prompt.
Those sequences share a lot: teacher and student agree up to where the hindsight block enters the last
user turn, and while the context window still holds a conversation's first message, turn k's prompt +
response is the start of turn k+1's prompt. The engine builds a prefix tree over every sequence of a
group (`prefix_tree`, by token equality), cuts it into chains along its heaviest paths (a conversation's
latest student sequence, with the teacher branches hanging off it), and runs each chain once, level by
level, on top of its parent chain's KV cache up to where it branches off; a sequence that is a prefix of
another costs nothing beyond reading its positions. The LM head (`heads.lm_logits`: the head as the
model's forward applies it, logit scaling and soft-capping included) and the float32 log-softmax are
applied only at the positions that predict response tokens, in chunks, so no float32 [batch, seq, vocab]
tensor ever exists.

Each level is batched under a token budget (rows × (longest cached prefix + longest chain)) and sorted by
chain length, so little compute goes to padding: chains are right-padded (a real token never sees the
padding after it), their cached prefixes padded to a common width and masked, position ids
continuing from each chain's own start. Every row is exact, whatever its batch neighbours (in float32;
in bf16 another batch shape rounds differently: mean |Δ| 0.009 between budgets, docs/BENCHMARKS.md). On a CPU
(budget 0: batching does not pay there, padding does cost) every chain runs alone, with no padding.
Models with windowed attention (Mistral, Gemma 2/3, Phi-3, Qwen2 sliding, Llama 4 chunked) keep only
the window in their cache and count padded cache slots as positions, so a group with a sequence that
reaches the window runs each sequence whole instead (`attention_window`), and a batch's padded width
stays below the window.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from sdpo_platform.heads import check_lm_logits, lm_logits
from sdpo_platform.prefix_tree import build_prefix_tree, common_prefix_length, heavy_chains
from sdpo_platform.progress import ProgressCallback, ScoringProgress

# Bumped whenever `score_jobs` returns other numbers for the same jobs, so that stored target shards are
# rescored rather than reused or mixed with new ones (2: the teacher's tail mass is summed over the tokens
# outside the top-k, no longer 1 − Σ top-k, which read 0 where the teacher is confident).
SCORING_VERSION = 2
GPU_TOKEN_BUDGET = 65536  # auto budget on accelerators; on CPU each chain runs alone (no padding)
PREFIX_CACHE_BUDGETS = 2  # prompt tokens whose KV cache a group may hold, in token budgets (16 GB for a 3B Llama at 65k)
CPU_GROUP_TOKENS = 16384  # the same bound with budget 0 (CPU): ~750 MB of SmolLM2-135M cache at most
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
        """Leading prompt ids all branches share (run once by the engine, whatever else it shares)."""
        return common_prefix_length(*self.prompts)

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


def resolve_token_budget(token_budget: int | None, device: torch.device) -> int:
    """An explicit budget as is; None → one job per batch on CPU, `GPU_TOKEN_BUDGET` elsewhere."""
    if token_budget is not None:
        return token_budget
    return 0 if torch.device(device).type == "cpu" else GPU_TOKEN_BUDGET


def plan_batches(jobs: list[BranchJob], token_budget: int) -> list[list[int]]:
    """Job indices in groups scored together, one prefix tree per group.

    Jobs are ordered by their first prompt, so the turns of a conversation, and any jobs that start
    alike, sit next to each other. A group closes when its first prompts, counting only the ids each
    does not share with the one before it, would pass `PREFIX_CACHE_BUDGETS` token budgets
    (`CPU_GROUP_TOKENS` when the budget is 0, on CPU). That is about the most KV cache the tree holds
    at once: only nodes with children keep theirs, and those lie within the first prompts (the
    student's, which a conversation's later turns extend), apart from the shared start of the others.
    """
    order = sorted(range(len(jobs)), key=lambda i: jobs[i].prompts[0])
    cap = token_budget * PREFIX_CACHE_BUDGETS if token_budget > 0 else CPU_GROUP_TOKENS
    groups: list[list[int]] = []
    held = 0
    for k, i in enumerate(order):
        prompt = jobs[i].prompts[0]
        new = len(prompt) - (common_prefix_length(prompt, jobs[order[k - 1]].prompts[0]) if k else 0)
        if groups and held + new <= cap:
            groups[-1].append(i)
            held += new
        else:
            groups.append([i])
            held = len(prompt)
    return groups


def length_batches(lengths: list[int], token_budget: int, cached: list[int] | None = None, max_width: int | None = None) -> list[list[int]]:
    """Indices sorted by length, cut into batches whose padded size fits the budget and whose real tokens
    fill at least `MIN_FILL` of the padded ones (a long row does not drag many short ones along).

    `cached[i]` is how many cached tokens row i attends to (its prefix): a batch holds every row's cache
    padded to the longest, so the padded size is rows × (longest cache + longest row), which bounds the
    memory of a branch pass as well as its compute. An item larger than the budget still runs, alone.
    `max_width` bounds a batch's padded width (longest cache + longest row) below a windowed model's
    window: its cache and mask count padded slots as positions.
    """
    cached = cached or [0] * len(lengths)
    batches: list[list[int]] = []
    real = longest_cache = 0
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if batches:
            rows, cache = len(batches[-1]) + 1, max(longest_cache, cached[i])
            fits_window = max_width is None or cache + lengths[i] < max_width
            if rows * (cache + lengths[i]) <= token_budget and real + lengths[i] >= MIN_FILL * rows * lengths[i] and fits_window:
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
    token ids per response position with their log-probs and the probability mass outside them; a k
    above the vocabulary is a ValueError before any work (clamping it would return fewer columns than
    asked for). Every prompt needs a token (a BOS at least): nothing predicts a response's first token
    otherwise; every response needs one too. The model runs in eval mode under `torch.inference_mode`
    and its mode is restored after; a model's first use checks that its head is reproduced exactly
    (`heads.check_lm_logits`).
    """
    if not jobs:
        return []
    if len({len(j.prompts) for j in jobs}) != 1:
        raise ValueError("all jobs need the same number of branches")
    empty = next(((i, b) for i, job in enumerate(jobs) for b, prompt in enumerate(job.prompts) if not prompt), None)
    if empty is not None:
        raise ValueError(f"job {empty[0]} has an empty prompt (branch {empty[1]}): a response is scored after at least one token")
    no_response = next((i for i, job in enumerate(jobs) if not job.response_ids), None)
    if no_response is not None:
        raise ValueError(f"job {no_response} has an empty response: there is no token to score")
    if top_k > 0 and not 0 <= topk_branch < len(jobs[0].prompts):
        raise ValueError(f"topk_branch={topk_branch} names no branch: the jobs have {len(jobs[0].prompts)}")
    vocab = model.get_output_embeddings().weight.shape[0]
    if top_k > vocab:
        raise ValueError(f"top_k={top_k} is larger than the model's vocabulary ({vocab} tokens)")
    results: list[BranchScores | None] = [None] * len(jobs)
    started, done, tokens = time.monotonic(), 0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            check_lm_logits(model, list(jobs[0].prompts[0]) + list(jobs[0].response_ids))
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
    token_lp, top_ids, top_lp, tail = _head_logprobs(model, states, targets, wants_topk, top_k)

    results, offset, topk_offset = [], 0, 0
    for job in jobs:
        n = len(job.response_ids)
        result = BranchScores(logprobs=[token_lp[offset + b * n : offset + (b + 1) * n] for b in range(n_branches)])
        offset += n_branches * n
        if top_k > 0:
            result.topk_ids = top_ids[topk_offset : topk_offset + n]
            result.topk_logprobs = top_lp[topk_offset : topk_offset + n]
            result.tail_mass = tail[topk_offset : topk_offset + n]
            topk_offset += n
        results.append(result)
    return results


@dataclass
class _PassCache:
    """The KV cache one forward pass leaves for its rows' child chains: per layer one (keys, values) pair
    [slots, kv heads, head dim] holding each such row's positions from 0 to its last branch point, one
    row after another. The pass's padding is dropped, so no more is held than child chains read, and
    they read their prefixes back with one gather per layer."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    serial: int  # the pass's number in its group: orders a batch's rows by parent pass, the same every run


def _group_states(model, jobs: list[BranchJob], pad_id: int, token_budget: int) -> torch.Tensor:
    """Hidden states predicting each response token, rows in (job, branch, token) order.

    A (job, branch) sequence is the prompt + the response without its last token (which predicts
    nothing); it reads positions len(prompt) - 1 onwards. The prefix tree is cut into chains
    (`heavy_chains`), which run level by level, batched under the budget, each on top of its parent
    chain's KV cache up to where it branches off. A chain keeps the hidden states from the first
    position any sequence through it reads, and its KV cache up to its last branch point, only until
    its child chains ran.
    Caches and hidden states move a whole pass at a time, never row by row: on an accelerator every
    copy is a kernel launch, and per-row, per-layer copies once issued twice as many as the model itself.
    """
    device = next(model.parameters()).device
    sequences = [list(p) + list(job.response_ids[:-1]) for job in jobs for p in job.prompts]
    reads_from = [len(p) - 1 for job in jobs for p in job.prompts]
    window = attention_window(model)
    if window is not None and max(map(len, sequences)) >= window - 1:
        return _unshared_states(model, sequences, reads_from, pad_id, device, token_budget)
    tree = build_prefix_tree(sequences)
    chains = heavy_chains(tree)
    start = [tree.start[c[0]] for c in chains.nodes]
    end = [tree.end[c[-1]] for c in chains.nodes]
    keep_from: list[int | None] = [None] * len(chains)
    for q, first in enumerate(reads_from):
        for node in tree.path(tree.leaf[q]):
            if tree.end[node] > first:
                c, read = chains.chain_of[node], max(tree.start[node], first)
                keep_from[c] = read if keep_from[c] is None else min(keep_from[c], read)

    cached_until = [0] * len(chains)  # positions of a chain's cache its child chains read: up to the last branch point
    for c, parent in enumerate(chains.parent):
        if parent >= 0:
            cached_until[parent] = max(cached_until[parent], start[c])
    caches: dict[int, tuple[_PassCache, int]] = {}  # chain → its pass's cache, and the slot of its position 0 there
    kept: list[torch.Tensor] = []  # per pass, the hidden states its chains keep
    kept_at = [0] * len(chains)  # position p of chain c is row kept_at[c] + p of torch.cat(kept)
    n_kept = passes = 0
    for level in range(1, max(chains.level, default=0) + 1):
        members = [c for c in range(len(chains)) if chains.level[c] == level]
        widths = [end[c] - start[c] for c in members]
        for batch in length_batches(widths, token_budget, cached=[start[c] for c in members], max_width=window and window - 1):
            rows = [members[k] for k in batch]
            parents = None
            if level > 1:  # rows whose parents ran in the same pass sit together: one gather per parent pass
                rows.sort(key=lambda c: caches[chains.parent[c]][0].serial)
                parents = [caches[chains.parent[c]] for c in rows]
            tokens = [sequences[tree.source[chains.nodes[c][-1]]][start[c] : end[c]] for c in rows]
            hidden, cache, slot0 = _run_rows(model, tokens, [start[c] for c in rows], parents, pad_id, device, [cached_until[c] for c in rows], serial=passes)
            passes += 1
            spans = []
            for row, c in enumerate(rows):
                if keep_from[c] is not None:
                    spans.append((row, keep_from[c] - start[c], end[c] - start[c]))
                    kept_at[c], n_kept = n_kept - keep_from[c], n_kept + end[c] - keep_from[c]
            if spans:
                kept.append(_gather_spans(hidden, spans))
            for row, c in enumerate(rows):
                if cached_until[c]:
                    caches[c] = (cache, slot0[row])
        caches = {c: cache for c, cache in caches.items() if chains.level[c] == level}  # the previous level's children all ran

    reads = [
        np.arange(max(tree.start[node], first), tree.end[node]) + kept_at[chains.chain_of[node]]
        for q, first in enumerate(reads_from)
        for node in tree.path(tree.leaf[q])
        if tree.end[node] > first
    ]
    every = torch.cat(kept)
    kept.clear()
    return every.index_select(0, torch.from_numpy(np.concatenate(reads)).to(device))


def _gather_spans(hidden: torch.Tensor, spans: list[tuple[int, int, int]]) -> torch.Tensor:
    """Rows (row, first, stop) of hidden [rows, width, size]: positions [first, stop) of each, one after another."""
    width = hidden.shape[1]
    index = np.concatenate([row * width + np.arange(first, stop) for row, first, stop in spans])
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, torch.from_numpy(index).to(hidden.device))


def attention_window(model) -> int | None:
    """How many recent tokens a model's windowed layers attend to; None when every layer sees the whole sequence.

    Sliding-window (Mistral, Gemma 2/3, Phi-3, Qwen2 with `use_sliding_window`) and chunked (Llama 4)
    layers keep a KV cache of the window only, so a cache cut at a branch point, or continued past the
    window, is no longer the prefix the engine takes it for.
    """
    config = model.config.get_text_config()
    layer_types = getattr(config, "layer_types", None) or []
    if "chunked_attention" in layer_types:
        return int(config.attention_chunk_size)
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    if layer_types and "sliding_attention" not in layer_types:
        return None
    return int(window)


def _unshared_states(model, sequences: list[list[int]], reads_from: list[int], pad_id: int, device, token_budget: int) -> torch.Tensor:
    """`_group_states` for sequences that outgrow a windowed model's cache: each sequence runs whole from
    position 0 (right-padded in length batches, no cache kept), as the model's own forward would run it."""
    parts, order = [], []
    for batch in length_batches([len(s) for s in sequences], token_budget):
        hidden, _, _ = _run_rows(model, [sequences[q] for q in batch], [0] * len(batch), None, pad_id, device, [0] * len(batch))
        parts.append(_gather_spans(hidden, [(row, reads_from[q], len(sequences[q])) for row, q in enumerate(batch)]))
        order.extend(batch)
    lengths = np.array([len(sequences[q]) - reads_from[q] for q in order])
    offsets = dict(zip(order, np.cumsum(lengths) - lengths))
    index = np.concatenate([offsets[q] + np.arange(len(sequences[q]) - reads_from[q]) for q in range(len(sequences))])
    return torch.cat(parts).index_select(0, torch.from_numpy(index).to(device))


def _run_rows(model, tokens: list[list[int]], starts: list[int], parents: list | None, pad_id: int, device, keep: list[int], serial: int = 0):
    """One forward pass over rows of tokens, row i at positions starts[i].. after its cached prefix.

    `parents[i]` = (pass cache, slot of position 0) of the chain row i continues (None for all: nothing
    cached before them), whose positions [0, starts[i]) it attends to. Returns the hidden states
    [rows, longest row, hidden] and, when a row has `keep[i]` > 0, the pass's `_PassCache` of positions
    [0, keep[i]) of those rows (numbered `serial`; keep[i] > starts[i]) and each kept row's first slot
    there (else None, {})."""
    from transformers import DynamicCache

    sizes = [len(t) for t in tokens]
    width, row_width = max(starts), max(sizes)
    ids = np.full((len(tokens), row_width), pad_id, dtype=np.int64)
    mask = np.zeros((len(tokens), width + row_width), dtype=np.int64)
    for row, row_tokens in enumerate(tokens):
        ids[row, : sizes[row]] = row_tokens
        mask[row, : starts[row]] = 1  # cache pad slots (shorter prefixes) stay masked
        mask[row, width : width + sizes[row]] = 1
    positions = torch.tensor(starts)[:, None] + torch.arange(row_width)
    if width > 0:
        cache = _prefix_cache(model, parents, starts, device)
    else:
        cache = DynamicCache(config=model.config) if any(keep) else None
    hidden = model.get_decoder()(
        input_ids=torch.from_numpy(ids).to(device),
        # right-padded rows need no mask (causal); cached prefixes shorter than `width` do
        attention_mask=torch.from_numpy(mask).to(device) if min(starts) < width else None,
        position_ids=positions.to(device),
        cache=cache,
        use_cache=cache is not None,
    ).last_hidden_state
    if not any(keep):
        return hidden, None, {}
    # The kept rows' slots in position order, up to keep[r]: the cached prefix, then the pass's own tokens.
    kept = [r for r in range(len(tokens)) if keep[r]]
    lengths = np.array([keep[r] for r in kept])
    slot0 = dict(zip(kept, (np.cumsum(lengths) - lengths).tolist()))
    rows = torch.from_numpy(np.repeat(kept, lengths)).to(device)
    slots = torch.from_numpy(np.concatenate([np.r_[0 : starts[r], width : width + keep[r] - starts[r]] for r in kept])).to(device)
    layers = [(layer.keys[rows, :, slots], layer.values[rows, :, slots]) for layer in cache.layers]
    return hidden, _PassCache(layers=layers, serial=serial), slot0


def _prefix_cache(model, parents: list[tuple[_PassCache, int]], lengths: list[int], device):
    """A DynamicCache holding positions [0, lengths[i]) of each row's parent chain, padded to the longest
    with copies of a real slot (the mask hides them): per layer one gather from each parent pass's cache
    (rows with the same parent pass must be adjacent), or a slice for a single row."""
    from transformers import DynamicCache

    width = max(lengths)
    if len(parents) == 1:
        cache, first = parents[0]
        return DynamicCache(ddp_cache_data=[(k[first : first + width].transpose(0, 1)[None], v[first : first + width].transpose(0, 1)[None]) for k, v in cache.layers], config=model.config)
    groups: list[tuple[_PassCache, list[np.ndarray]]] = []
    for (cache, first), length in zip(parents, lengths):
        if not groups or groups[-1][0] is not cache:
            groups.append((cache, []))
        slots = np.full(width, first, dtype=np.int64)  # beyond `length`: the row's position 0, masked
        slots[:length] += np.arange(length)
        groups[-1][1].append(slots)
    index = [torch.from_numpy(np.stack(slots)).to(device) for _, slots in groups]

    def gathered(layer: int, which: int) -> torch.Tensor:  # [rows, kv heads, width, head dim]
        parts = [cache.layers[layer][which][slots] for (cache, _), slots in zip(groups, index)]
        return (parts[0] if len(parts) == 1 else torch.cat(parts)).transpose(1, 2)

    return DynamicCache(ddp_cache_data=[(gathered(layer, 0), gathered(layer, 1)) for layer in range(len(groups[0][0].layers))], config=model.config)


def _head_logprobs(model, states: torch.Tensor, targets: list[int], wants_topk: list[bool], top_k: int):
    """log π of each target (float64 numpy) and, where asked, the top-k ids, log-probs (float32) and the
    probability outside them, chunk by chunk. Which rows want a top-k is known up front, so no chunk
    waits on the device to find out."""
    device = states.device
    targets_t = torch.tensor(targets).to(device)
    wanted = np.flatnonzero(wants_topk)
    budget = HEAD_CHUNK_BYTES["cpu" if device.type == "cpu" else "accelerator"]
    chunk = max(1, budget // (4 * model.get_output_embeddings().weight.shape[0]))
    token_lp, top_ids, top_lp, tail_lp = [], [], [], []
    for start in range(0, len(targets), chunk):
        logits = lm_logits(model, states[start : start + chunk]).float()
        normalizer = torch.logsumexp(logits, dim=-1)
        token_lp.append(logits.gather(-1, targets_t[start : start + chunk, None]).squeeze(-1) - normalizer)
        chosen = wanted[(wanted >= start) & (wanted < start + chunk)] - start
        if chosen.size:
            chosen_t = torch.from_numpy(chosen).to(device)
            picked, picked_normalizer = logits.index_select(0, chosen_t), normalizer.index_select(0, chosen_t)
            values, ids = picked.topk(top_k, dim=-1)
            top_ids.append(ids)
            top_lp.append(values - picked_normalizer[:, None])
            # The tail summed over the tokens outside the top-k, not 1 − Σ top-k: that difference cancels in
            # float32 (reads 0 below ~1e-7) exactly where the teacher is confident.
            tail_lp.append(torch.logsumexp(picked.scatter_(-1, ids, float("-inf")), dim=-1) - picked_normalizer)
    if not top_lp:
        return torch.cat(token_lp).double().cpu().numpy(), None, None, None
    tail = torch.cat(tail_lp).exp()
    return torch.cat(token_lp).double().cpu().numpy(), torch.cat(top_ids).cpu().numpy(), torch.cat(top_lp).cpu().numpy(), tail.cpu().numpy()
