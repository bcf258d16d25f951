"""The prefix-tree engine equals one-sequence-at-a-time full forwards, whatever the batching and sharing."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sdpo_platform.config import TargetsConfig
from sdpo_platform.hindsight import encode_interaction
from sdpo_platform.logprobs import response_logprobs
from sdpo_platform.prefix_tree import build_prefix_tree, heavy_chains
from sdpo_platform.scoring import CPU_GROUP_TOKENS, MIN_FILL, PREFIX_CACHE_BUDGETS, BranchJob, length_batches, plan_batches, score_jobs


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def hindsight_jobs(tok, n: int, neutral: bool = False) -> list[BranchJob]:
    cfg = TargetsConfig()
    jobs = []
    for i in range(n):
        context = [{"role": "user", "content": f"Question {i}: " + "tell me more " * (i % 4)}]
        if i % 2:
            context = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello! " * i}] + context
        followup = "No, that's wrong." * (1 + i % 3)
        enc = encode_interaction(tok, context, "An answer. " * (1 + i % 5), followup, cfg.template, cfg.max_prompt_tokens, 24, ("OK.",) if neutral else ())
        jobs.append(BranchJob((enc.student_prompt_ids, enc.teacher_prompt_ids, *enc.other_teacher_prompt_ids), enc.response_ids))
    return jobs


def reference(model, job: BranchJob) -> list[np.ndarray]:
    with torch.inference_mode():
        return [response_logprobs(model, p, job.response_ids).double().numpy() for p in job.prompts]


@pytest.mark.parametrize("budget", [1, 400, 100_000])  # one job per batch, mixed batches, everything at once
def test_engine_equals_full_forward_one_at_a_time(tiny, budget):
    model, tok = tiny
    jobs = hindsight_jobs(tok, 7, neutral=True)
    assert all(0 < j.shared_prefix_length() < len(j.prompts[0]) for j in jobs)  # something is really shared
    scores = score_jobs(model, jobs, tok.pad_token_id, token_budget=budget)
    for job, got in zip(jobs, scores):
        for branch, expected in zip(got.logprobs, reference(model, job)):
            np.testing.assert_allclose(branch, expected, atol=1e-4)


@pytest.mark.parametrize("budget", [1, 100_000])
def test_no_common_prefix_and_prompt_that_is_a_prefix_of_another(tiny, budget):
    model, tok = tiny
    jobs = [
        BranchJob(([5, 6, 7], [8, 6, 7, 9]), [10, 11]),  # differ at token 0: nothing shared
        BranchJob(([5, 6, 7], [5, 6, 7, 9, 9]), [12]),  # student prompt is a prefix of the teacher's
        BranchJob(([5, 6, 7, 3], [5, 6, 7, 3]), [13, 14, 15]),  # identical prompts
    ]
    assert [j.shared_prefix_length() for j in jobs] == [0, 3, 4]
    scores = score_jobs(model, jobs, tok.pad_token_id, token_budget=budget)
    for job, got in zip(jobs, scores):
        for branch, expected in zip(got.logprobs, reference(model, job)):
            np.testing.assert_allclose(branch, expected, atol=1e-4)
    np.testing.assert_allclose(scores[2].logprobs[0], scores[2].logprobs[1], atol=1e-6)


def test_topk_is_the_teachers_most_likely_tokens_with_tail_mass(tiny):
    model, tok = tiny
    jobs = hindsight_jobs(tok, 3)
    scores = score_jobs(model, jobs, tok.pad_token_id, top_k=5, topk_branch=1)
    for job, got in zip(jobs, scores):
        ids = torch.tensor([list(job.prompts[1]) + list(job.response_ids)])
        with torch.inference_mode():
            full = torch.log_softmax(model(ids).logits[0, len(job.prompts[1]) - 1 : -1].float(), dim=-1)
        expected_lp, expected_ids = full.topk(5, dim=-1)
        assert got.topk_ids.shape == (len(job.response_ids), 5)
        np.testing.assert_array_equal(got.topk_ids, expected_ids.numpy())
        np.testing.assert_allclose(got.topk_logprobs, expected_lp.numpy(), atol=1e-4)
        np.testing.assert_allclose(got.tail_mass, 1 - expected_lp.exp().sum(-1).numpy(), atol=1e-4)
        assert (got.topk_logprobs[:, 0] >= got.logprobs[1] - 1e-6).all()  # the top-1 is at least the sampled token


def test_tail_mass_keeps_its_precision_when_the_teacher_is_confident(tiny_model_dir):
    """A peaked teacher leaves ~1e-9..1e-5 outside its top-k: 1 − Σ top-k reads 0 or noise there in float32;
    the stored tail must match a float64 sum over the other tokens to its own precision."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.norm.weight.mul_(100.0)  # sharpens every logit the head sees
    jobs = hindsight_jobs(tok, 2)
    scores = score_jobs(model, jobs, tok.pad_token_id, top_k=5, topk_branch=1)
    tails, expected = [], []
    for job, got in zip(jobs, scores):
        ids = torch.tensor([list(job.prompts[1]) + list(job.response_ids)])
        with torch.inference_mode():
            full = torch.log_softmax(model(ids).logits[0, len(job.prompts[1]) - 1 : -1].double(), dim=-1)
        outside = full.scatter(-1, torch.from_numpy(got.topk_ids).long(), float("-inf"))
        expected.append(outside.logsumexp(-1).exp().numpy())
        tails.append(got.tail_mass)
    tails, expected = np.concatenate(tails), np.concatenate(expected)
    assert expected.min() < 1e-8 and expected.max() > 1e-6  # the set really reaches below float32's 1 − Σ
    np.testing.assert_allclose(tails, expected, rtol=1e-4)


def conversation_jobs(tok, turns: int, conversations: int = 2) -> list[BranchJob]:
    """Every interaction of a few multi-turn conversations, context window wide enough to keep the first
    message: turn k's prompt + response starts turn k+1's prompt."""
    cfg = TargetsConfig()
    jobs = []
    for c in range(conversations):
        messages = []
        for t in range(turns + 1):
            messages.append({"role": "user", "content": f"Conversation {c}, question {t}: " + "why? " * t})
            messages.append({"role": "assistant", "content": f"Answer {t}. " + "Because. " * (t + c)})
        for t in range(turns):
            context, response, followup = messages[: 2 * t + 1], messages[2 * t + 1]["content"], messages[2 * t + 2]["content"]
            enc = encode_interaction(tok, context, response, followup, cfg.template, 10_000, 64)
            jobs.append(BranchJob((enc.student_prompt_ids, enc.teacher_prompt_ids), enc.response_ids))
    return jobs


@pytest.mark.parametrize("budget", [0, 1, 300, 100_000])
def test_turns_of_a_conversation_share_their_tokens_and_stay_exact(tiny, budget):
    model, tok = tiny
    jobs = conversation_jobs(tok, turns=4)
    sequences = [list(p) + j.response_ids[:-1] for j in jobs for p in j.prompts]
    student = sequences[0::2]
    assert student[1][: len(student[0])] == student[0]  # turn 1's student sequence starts turn 2's: really shared
    tree = build_prefix_tree(sequences)
    per_job_sharing = sum(j.shared_prefix_length() + sum(len(s) - j.shared_prefix_length() for s in sequences[2 * k : 2 * k + 2]) for k, j in enumerate(jobs))
    assert tree.tokens() < 0.75 * per_job_sharing  # the tree runs far less than teacher/student sharing alone
    scores = score_jobs(model, jobs, tok.pad_token_id, token_budget=budget)
    for job, got in zip(jobs, scores):
        for branch, expected in zip(got.logprobs, reference(model, job)):
            np.testing.assert_allclose(branch, expected, atol=1e-4)


def test_caches_and_states_move_a_whole_pass_at_a_time():
    """Per row and per layer copies of the KV cache once cost as many kernel launches as the model: the
    engine's own ops must not grow with the rows of a pass. Children whose parents ran in different
    passes (prefixes of 3 and 40 tokens) share one pass and stay exact."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from count_engine_ops import EngineOps  # the benchmark's counter

    model = tiny_architecture("llama")
    jobs = lambda n: [BranchJob(([2 + k, 1, 3, 4], [2 + k, 1, 3, 9, 9]), [7, 8, 9]) for k in range(n)]  # noqa: E731
    score_jobs(model, jobs(1), pad_id=0, token_budget=10**6)  # the head check's forward, once per model
    counts = []
    for n in (4, 32):
        with EngineOps(model) as ops:
            score_jobs(model, jobs(n), pad_id=0, token_budget=10**6, top_k=3)
        counts.append((ops.passes, ops.outside["launch"]))
    assert counts[0] == counts[1] and counts[0][0] == 2  # two passes (prefix chains, then branches) whatever the rows

    short = [BranchJob(([2 + k, 1, 3], [2 + k, 1, 3, 60, 61]), [7, 8, 9]) for k in range(3)]
    long = [BranchJob(([12 + k, 1] + list(range(20, 58)), [12 + k, 1] + list(range(20, 58)) + [60, 61]), [7, 8, 9]) for k in range(3)]
    mixed = short + long
    with EngineOps(model) as ops:
        scores = score_jobs(model, mixed, pad_id=0, token_budget=10**6)
    assert ops.passes == 3  # short and long prefixes in two passes, every branch in one
    for job, got in zip(mixed, scores):
        for branch, expected in zip(got.logprobs, reference(model, job)):
            np.testing.assert_allclose(branch, expected, atol=1e-4)


def test_a_pass_keeps_only_the_positions_its_child_chains_read(monkeypatch):
    """A pass mixing a long cached prefix (no children) with short ones (children) is padded to the long
    one; the cache it leaves must hold the short rows' own positions, up to where their last child
    branches off, or the held cache grows with the longest prefix of every pass rather than with the
    tokens that child chains read."""
    from sdpo_platform import scoring

    model = tiny_architecture("llama")
    common = [1] + list(range(50, 80))  # a 31-token prefix the long jobs share
    short = [BranchJob(([1, 10 + k, 11] + [6] * k, [1, 10 + k, 11] + [6] * k + [9]), [7, 8]) for k in range(6)]  # teacher adds a token
    long = [BranchJob((common + [100 + k, 5, 5], common + [100 + k, 5, 5]), [7, 8]) for k in range(3)]  # identical branches
    held, run_rows = [], scoring._run_rows

    def recording(model, tokens, starts, parents, pad_id, device, keep, serial=0):
        hidden, cache, slot0 = run_rows(model, tokens, starts, parents, pad_id, device, keep, serial)
        if cache is not None:
            held.append((max(starts), cache.layers[0][0].shape[0], sum(keep), sum(s + len(t) for s, t, k in zip(starts, tokens, keep) if k)))
        return hidden, cache, slot0

    monkeypatch.setattr(scoring, "_run_rows", recording)
    jobs = short + long
    for got, job in zip(score_jobs(model, jobs, pad_id=0, token_budget=10**6), jobs):
        for branch, expected in zip(got.logprobs, reference(model, job)):
            np.testing.assert_allclose(branch, expected, atol=1e-4)
    assert any(width >= len(common) for width, _, _, _ in held)  # a padded pass did keep rows
    assert all(slots == needed for _, slots, needed, _ in held)
    assert sum(needed for _, _, needed, _ in held) < sum(real for _, _, _, real in held)  # not past the last branch point


def test_groups_cover_every_job_once_keep_conversations_together_and_bound_the_tokens_held(tiny):
    _, tok = tiny
    jobs = hindsight_jobs(tok, 12) + conversation_jobs(tok, turns=3, conversations=3)
    budget = 60
    groups = plan_batches(jobs, budget)
    assert sorted(i for g in groups for i in g) == list(range(len(jobs)))
    assert any(len(g) > 1 for g in groups)
    for group in groups:  # a group's prompts, counted once where neighbours share them, fit the cap
        prompts = sorted(jobs[i].prompts[0] for i in group)
        unique = len(prompts[0]) + sum(len(b) - next((n for n, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))) for a, b in zip(prompts, prompts[1:]))
        assert len(group) == 1 or unique <= budget * PREFIX_CACHE_BUDGETS
    on_cpu = plan_batches(jobs, 0)  # budget 0 (CPU): groups bounded by CPU_GROUP_TOKENS, here one
    assert len(on_cpu) == 1 and sum(len(p) for j in jobs for p in j.prompts) < CPU_GROUP_TOKENS
    conversation = list(range(12, 15))  # the three turns of the first conversation are scored together
    assert any(set(conversation) <= set(g) for g in plan_batches(jobs, 400))


def test_prefix_tree_rebuilds_every_sequence_and_counts_each_shared_token_once():
    rng = np.random.default_rng(0)
    base = [list(rng.integers(0, 5, size=rng.integers(0, 12))) for _ in range(15)]
    sequences = base + [b + [7, 7] for b in base[:5]] + [base[3][:4], base[3], []]  # extensions, prefixes, duplicates, empty
    tree = build_prefix_tree(sequences)
    for q, seq in enumerate(sequences):
        path = tree.path(tree.leaf[q])
        rebuilt = [t for n in path for t in sequences[tree.source[n]][tree.start[n] : tree.end[n]]]
        assert rebuilt == seq and tree.end[tree.leaf[q]] == len(seq)
    trie: dict = {}
    for seq in sequences:  # a naive token-per-node trie: its node count is the tokens to run
        node = trie
        for t in seq:
            node = node.setdefault(t, {})
    count = lambda node: sum(1 + count(child) for child in node.values())  # noqa: E731
    assert tree.tokens() == count(trie)
    assert all(tree.start[n] == tree.end[tree.parent[n]] < tree.end[n] for n in range(1, len(tree)))

    chains = heavy_chains(tree)  # every node in one chain; a chain is a path; it hangs off its parent chain
    assert sorted(n for c in chains.nodes for n in c) == list(range(1, len(tree)))
    for c, nodes in enumerate(chains.nodes):
        assert all(tree.parent[b] == a for a, b in zip(nodes, nodes[1:])) and nodes[-1] not in tree.parent  # ends at a leaf
        above = tree.parent[nodes[0]]
        assert chains.parent[c] == (chains.chain_of[above] if above else -1)
        assert chains.level[c] == (chains.level[chains.parent[c]] + 1 if chains.parent[c] >= 0 else 1)
    assert max(chains.level) <= 1 + np.log2(tree.tokens())  # heaviest paths: a light edge halves the tokens below
    assert len(chains) < len(tree) - 1  # fewer passes than nodes


def test_length_batches_are_sorted_and_fit_the_budget():
    lengths = [5, 40, 7, 6, 39, 100, 8]
    batches = length_batches(lengths, 80)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(flat)
    assert all(len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 80 for b in batches)
    assert [5] in batches  # the 100-token item is over the budget and runs alone
    assert batches[0] == [0, 3, 2, 6]  # 4 rows × 8 ≤ 80; the next (39) would need 5 × 39
    assert all(sum(lengths[i] for i in b) >= MIN_FILL * len(b) * max(lengths[i] for i in b) for b in batches)
    assert length_batches([10, 10, 10, 40], 1000) == [[0, 1, 2], [3]]  # 4 × 40 would be 56% padding
    # rows attending to cached prefixes: the padded size counts the longest cache too
    assert length_batches([10, 10, 10], 60, cached=[0, 5, 30]) == [[0, 1], [2]]  # 3 × (30 + 10) > 60


def test_progress_reports_interactions_and_tokens(tiny):
    model, tok = tiny
    jobs = hindsight_jobs(tok, 6)
    seen = []
    score_jobs(model, jobs, tok.pad_token_id, token_budget=20, progress=seen.append)
    assert len(seen) > 1 and seen[-1].interactions_done == seen[-1].interactions_total == 6
    assert seen[-1].tokens_done == sum(j.sequence_tokens() for j in jobs)
    assert seen[-1].eta_s == 0 and seen[-1].tokens_per_s > 0


@pytest.mark.slow
def test_engine_equals_full_forward_on_the_default_model(sdpo_home):
    from sdpo_platform.models import load_model

    model, tok = load_model("default", device="cpu")
    jobs = hindsight_jobs(tok, 4)
    scores = score_jobs(model, jobs, tok.pad_token_id, token_budget=2048, top_k=20)
    for job, got in zip(jobs, scores):
        for branch, expected in zip(got.logprobs, reference(model, job)):
            np.testing.assert_allclose(branch, expected, atol=1e-4)


def test_progress_logger_writes_about_every_tenth_with_rates_and_eta():
    from sdpo_platform.progress import ScoringProgress, progress_logger

    lines = []
    log = progress_logger(lines.append, every=0.25)
    for done in range(1, 101):
        log(ScoringProgress(done, 100, done * 50, elapsed_s=done / 10))
    assert len(lines) == 5  # 0.25, 0.5, 0.75, 1.0 and the first report
    assert "100/100 interactions" in lines[-1] and "500 tokens/s" in lines[-1] and "ETA 0s" in lines[-1]


def tiny_architecture(name: str):
    """A tiny random float32 model of an architecture; large init so the logits reach soft-capping range."""
    import transformers

    common = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, initializer_range=0.5)
    config_class, model_class, extra = {
        "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
        "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8, "final_logit_softcapping": 5.0}),
        "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 8, "final_logit_softcapping": 5.0}),
        "granite": ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 8.0}),
        "cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.0625}),
        # windowed attention: every layer, every other layer, and Qwen2's opt-in
        "mistral-window8": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 8}),
        "gemma3-window8": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 8, "sliding_window": 8, "sliding_window_pattern": 2}),
        "qwen2-window8": ("Qwen2Config", "Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0}),
    }[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**common, **extra)
    return getattr(transformers, model_class)(config).eval()


POSTPROCESSING = {"gemma2", "gemma3", "granite", "cohere"}  # soft-capping, logits_scaling, logit_scale


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma2", "gemma3", "granite", "cohere"])
def test_engine_and_training_logprobs_apply_the_models_logit_postprocessing(name):
    from sdpo_platform.logprobs import batch_response_logprobs

    model = tiny_architecture(name)
    jobs = [
        BranchJob(([5, 6, 7, 8], [5, 6, 7, 9, 10]), [11, 12, 13, 2]),
        BranchJob(([5, 6, 7, 8, 20, 21], [30, 31]), [40, 41, 42]),
        BranchJob(([5, 6], [5, 6, 7, 9, 10, 11, 12]), [50]),
    ]
    expected = [reference(model, job) for job in jobs]
    with torch.inference_mode():
        states = model.get_decoder()(input_ids=torch.tensor([jobs[0].prompts[0] + jobs[0].response_ids])).last_hidden_state
        head_only = torch.log_softmax(model.get_output_embeddings()(states[0, 3:-1]), -1).gather(-1, torch.tensor(jobs[0].response_ids)[:, None])
    assert (float((head_only[:, 0] - torch.from_numpy(expected[0][0])).abs().max()) > 0.1) == (name in POSTPROCESSING)  # the forward really post-processes
    for budget in (1, 100_000):  # alone and batched with padding
        for job, got, want in zip(jobs, score_jobs(model, jobs, pad_id=0, token_budget=budget, top_k=3), expected):
            for branch, reference_branch in zip(got.logprobs, want):
                np.testing.assert_allclose(branch, reference_branch, atol=1e-4)
    prompts = [p for job in jobs for p in job.prompts]
    responses = [job.response_ids for job in jobs for _ in job.prompts]
    with torch.no_grad():
        batched = batch_response_logprobs(model, prompts, responses, pad_id=0)
    for got, want in zip(batched, [b for e in expected for b in e]):
        np.testing.assert_allclose(got.double().numpy(), want, atol=1e-4)


def test_an_unknown_logit_postprocessing_fails_loudly_once_per_model(tiny_model_dir):
    from transformers import LlamaForCausalLM

    from sdpo_platform.logprobs import batch_response_logprobs

    class DoubledLogitsLlama(LlamaForCausalLM):  # a future architecture whose forward scales its logits
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    job = BranchJob(([5, 6, 7], [5, 6, 8]), [9, 10])
    strange = DoubledLogitsLlama.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with pytest.raises(NotImplementedError, match="DoubledLogitsLlama"):
        score_jobs(strange, [job], pad_id=0)
    with pytest.raises(NotImplementedError, match="DoubledLogitsLlama"):
        batch_response_logprobs(strange, [[5, 6, 7]], [[9, 10]])
    assert strange.training is False  # the guard restored the mode it found

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    forward, calls = model.forward, []
    model.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)  # the engine itself never calls the full forward
    for _ in range(3):
        score_jobs(model, [job], pad_id=0)
    batch_response_logprobs(model, [[5, 6, 7]], [[9, 10]])
    assert len(calls) == 1  # checked on first use only, not per call or per batch


def test_top_k_above_the_vocabulary_fails_up_front(tiny):
    model, tok = tiny
    vocab = model.get_output_embeddings().weight.shape[0]
    job = BranchJob(([5, 6, 7], [5, 6, 8]), [9, 10])
    with pytest.raises(ValueError, match=f"top_k={vocab + 1} is larger than the model's vocabulary"):
        score_jobs(model, [job], tok.pad_token_id, top_k=vocab + 1)
    assert score_jobs(model, [job], tok.pad_token_id, top_k=vocab)[0].topk_ids.shape == (2, vocab)  # all of it: allowed


def test_an_empty_prompt_or_response_or_a_missing_topk_branch_fails_up_front(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="job 1 has an empty prompt"):
        score_jobs(model, [BranchJob(([5, 6, 7], [5, 6, 8]), [9, 10]), BranchJob(([5], []), [9, 10])], tok.pad_token_id)
    with pytest.raises(ValueError, match="empty prompt"):
        response_logprobs(model, [], [9, 10])
    with pytest.raises(ValueError, match="job 1 has an empty response"):
        score_jobs(model, [BranchJob(([5, 6, 7], [5, 6, 8]), [9, 10]), BranchJob(([5], [6]), [])], tok.pad_token_id)
    with pytest.raises(ValueError, match="topk_branch=2 names no branch: the jobs have 2"):
        score_jobs(model, [BranchJob(([5, 6, 7], [5, 6, 8]), [9, 10])], tok.pad_token_id, top_k=3, topk_branch=2)


@pytest.mark.parametrize("name", ["mistral-window8", "gemma3-window8", "qwen2-window8"])
def test_windowed_attention_stays_exact_past_the_window(name):
    """Windowed layers cache only the last W tokens, so branching off a cut cache would be wrong: sequences
    that reach the window run whole; shorter ones still share their prefix."""
    from sdpo_platform.logprobs import batch_response_logprobs
    from sdpo_platform.scoring import attention_window

    model = tiny_architecture(name)
    assert attention_window(model) == 8 and attention_window(tiny_architecture("llama")) is None
    prefix = list(range(10, 40))
    long_jobs = [
        BranchJob((prefix + [50, 51], prefix + [60, 61, 62]), [70, 71, 72, 73]),
        BranchJob((prefix + [50, 51, 70, 71, 72, 73, 80], prefix[:5] + [90]), [91, 92]),
        BranchJob((prefix[:3], prefix[:4]), [93, 94, 95]),  # 6 and 7 positions next to 36-position neighbours
    ]
    short_jobs = [BranchJob(([5, 6, 7], [5, 6, 9]), [11, 12]), BranchJob(([5, 6, 7, 8], [5, 6]), [13])]
    for jobs in (long_jobs, short_jobs):
        expected = [reference(model, job) for job in jobs]
        for budget in (0, 1, 100_000):
            for got, want in zip(score_jobs(model, jobs, pad_id=0, token_budget=budget, top_k=3), expected):
                for branch, reference_branch in zip(got.logprobs, want):
                    np.testing.assert_allclose(branch, reference_branch, atol=1e-4)
    prompts = [p for job in long_jobs for p in job.prompts]
    responses = [job.response_ids for job in long_jobs for _ in job.prompts]
    with torch.no_grad():
        batched = batch_response_logprobs(model, prompts, responses, pad_id=0)  # training's padded batches
    for got, want in zip(batched, [b for job in long_jobs for b in reference(model, job)]):
        np.testing.assert_allclose(got.double().numpy(), want, atol=1e-4)


def test_windowed_batches_keep_their_padded_width_below_the_window():
    """Every sequence fits the window, but padding short cached prefixes to a long one would push a batch
    past it: the model's sliding mask counts padded cache slots as positions."""
    import transformers

    torch.manual_seed(0)
    config = transformers.MistralConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, initializer_range=0.5, sliding_window=32)
    model = transformers.MistralForCausalLM(config).eval()
    jobs = [BranchJob(([10 + k] + [100 + k] * 20, [10 + k] + [150 + k] * 20), [3]) for k in range(4)]  # branch at 1
    common = list(range(40, 57))
    jobs.append(BranchJob(([9] + common + [200] * 12, [9] + common + [210] * 12), [3]))  # branch at 18
    assert all(len(p) + len(j.response_ids) - 1 < 31 for j in jobs for p in j.prompts)
    for got, job in zip(score_jobs(model, jobs, pad_id=0, token_budget=100_000), jobs):
        for branch, want in zip(got.logprobs, reference(model, job)):
            np.testing.assert_allclose(branch, want, atol=1e-4)
    assert length_batches([20, 20, 12], 10**6, cached=[1, 1, 18], max_width=31) == [[2], [0, 1]]
