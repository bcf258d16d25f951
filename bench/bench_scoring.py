"""Teacher/student scoring: the prefix-sharing engine vs the naive way, same interactions, same run.

Naive = per interaction, two full forwards (student prompt + response, teacher prompt + response), full
logits and a float32 log-softmax at every position, then the response positions picked out.
Engine = `sdpo_platform.targets.compute_targets` (a prefix tree over the chunk's sequences run once: the
teacher/student shared prefix, and a conversation's earlier turns inside its later ones; LM head only at
response positions; token-budget batches; teacher top-k included as configured).

The interactions are real ShareGPT conversations run through the platform's own ingest → cleaning →
interaction extraction on a temporary warehouse, taken in the order the platform scores them (whole
conversations, as `select_for_scoring` groups them into shards). Prompts are cut at
`targets.max_prompt_tokens`, responses at `targets.max_response_tokens`, contexts at the interaction
stage's `max_context_messages` (the platform defaults, or the flags below).

    python bench/bench_scoring.py --n 256 --threads 1     # figures in docs/BENCHMARKS.md

The methods run interleaved in chunks of whole conversations (order rotated) so both see the same load
on a shared machine; `--threads 1` makes the CPU seconds a robust measure of work.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def real_interactions(n: int, records: int, max_context_messages: int | None = None):
    """The first `n` informative ShareGPT interactions (both splits) in the order the platform scores them
    (whole conversations, turns in order), extracted by the platform into a temp warehouse."""
    from sdpo_platform import warehouse
    from sdpo_platform.cleaning import build_conversations
    from sdpo_platform.config import InteractionConfig, TargetsConfig
    from sdpo_platform.ingest import ingest_inbox
    from sdpo_platform.interactions import extract_interactions
    from sdpo_platform.sharegpt import write_sharegpt_slice
    from sdpo_platform.selection import select_for_scoring

    # Record ids (hence conversation and interaction ids, and which interactions are chosen) hash the source
    # file's path: a fixed path keeps the chosen interactions the same from run to run.
    inbox = REPO / ".bench" / f"sharegpt-{records}"
    if not (inbox / "sharegpt.jsonl").exists():
        write_sharegpt_slice(inbox / "sharegpt.jsonl", records)
    with tempfile.TemporaryDirectory() as tmp:
        con = warehouse.connect(Path(tmp) / "warehouse.duckdb")
        try:
            ingest_inbox(con, inbox)
            build_conversations(con)
            window = {} if max_context_messages is None else {"max_context_messages": max_context_messages}
            extract_interactions(con, InteractionConfig(**window))
            frame = con.sql("SELECT * FROM interactions ORDER BY interaction_id").df()
        finally:
            con.close()
    chosen = select_for_scoring(frame, TargetsConfig(max_train=10**9, max_validation=10**9))
    if len(chosen) < n:
        raise SystemExit(f"only {len(chosen)} informative interactions in {records} records; raise --records")
    return chosen.head(n).reset_index(drop=True)


def export_jobs(path: Path, jobs, tokenizer, cfg) -> None:
    """The encoded interactions as plain id lists: the GPU machine needs neither the data nor the tokenizer."""
    import gzip
    import json

    payload = {
        "source": "ShareGPT via the platform's ingest -> cleaning -> interactions, encoded by targets.encode_interactions",
        "tokenizer_vocab": len(tokenizer),
        "pad_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        "max_prompt_tokens": cfg.max_prompt_tokens,
        "max_response_tokens": cfg.max_response_tokens,
        "jobs": [{"prompts": [list(p) for p in j.prompts], "response_ids": list(j.response_ids)} for j in jobs],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt") as f:
        json.dump(payload, f)
    print(f"wrote {len(jobs)} jobs to {path}")


def conversation_chunks(conversation_ids: list[str], size: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges of at least `size` rows that never split a conversation (rows grouped by it)."""
    chunks, start = [], 0
    for stop in range(1, len(conversation_ids) + 1):
        if stop == len(conversation_ids) or (stop - start >= size and conversation_ids[stop] != conversation_ids[stop - 1]):
            chunks.append((start, stop))
            start = stop
    return chunks


def naive_scores(model, jobs, device="cpu"):
    """Two full forwards per interaction, float32 log-softmax over every position and the whole vocabulary."""
    import torch

    out = []
    with torch.inference_mode():
        for job in jobs:
            branches = []
            for prompt in job.prompts[:2]:
                ids = torch.tensor([list(prompt) + list(job.response_ids)], device=device)
                logprobs = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)[0]
                positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(job.response_ids), device=device)
                branches.append(logprobs[positions, torch.tensor(job.response_ids, device=device)].double().cpu().numpy())
            out.append(branches)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=256, help="interactions scored by each method")
    parser.add_argument("--records", type=int, default=600, help="ShareGPT records read to find them")
    parser.add_argument("--chunk", type=int, default=8, help="interactions per interleaving round (whole conversations, at least this many)")
    parser.add_argument("--budgets", type=int, nargs="*", default=[], help="extra engine runs with these targets.batch_token_budget values (the default run uses auto)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default); 1 makes CPU seconds robust to a busy machine")
    parser.add_argument("--model-root", default=str(REPO / ".sdpo"), help="data root holding (or receiving) the converted default model")
    parser.add_argument("--export-jobs", metavar="PATH", help="write the tokenized jobs (JSON, gzip if .gz) for bench_scoring_gpu.py and exit")
    parser.add_argument("--max-prompt-tokens", type=int, help="override targets.max_prompt_tokens (default: the platform's)")
    parser.add_argument("--max-response-tokens", type=int, help="override targets.max_response_tokens (default: the platform's)")
    parser.add_argument("--max-context-messages", type=int, help="override interactions.max_context_messages (default: the platform's)")
    args = parser.parse_args()

    import numpy as np
    import pandas as pd
    import torch

    from sdpo_platform.config import TargetsConfig
    from sdpo_platform.models import load_model
    from sdpo_platform.prefix_tree import build_prefix_tree
    from sdpo_platform.targets import compute_targets, encode_interactions

    if args.threads:
        torch.set_num_threads(args.threads)
    interactions = real_interactions(args.n, args.records, args.max_context_messages)
    model, tokenizer = load_model("default", root=Path(args.model_root), device="cpu")
    overrides = {"max_prompt_tokens": args.max_prompt_tokens, "max_response_tokens": args.max_response_tokens}
    cfg = TargetsConfig(**{k: v for k, v in overrides.items() if v is not None})
    _, jobs = encode_interactions(tokenizer, interactions, cfg)
    if args.export_jobs:
        export_jobs(Path(args.export_jobs), jobs, tokenizer, cfg)
        return
    chunks = conversation_chunks(list(interactions["conversation_id"]), args.chunk)
    tokens = sum(j.sequence_tokens() for j in jobs)
    shared = sum(j.shared_prefix_length() for j in jobs)
    pairwise = tokens - shared  # teacher/student prefix sharing alone
    tree = sum(
        build_prefix_tree([list(p) + j.response_ids[:-1] for j in jobs[a:b] for p in j.prompts]).tokens() for a, b in chunks
    )
    response = sum(len(j.response_ids) for j in jobs)
    print(f"{args.n} interactions from {interactions['conversation_id'].nunique()} conversations, {tokens} sequence tokens "
          f"(teacher + student), {response} response tokens per branch; tokens run: teacher/student sharing alone "
          f"{pairwise}, prefix tree {tree} ({tokens / tree:.2f}x fewer than naive); torch threads {torch.get_num_threads()}", flush=True)

    # Interleaved in chunks, rotating the order, so that both methods see the same load on a shared machine.
    budgets = [None] + args.budgets
    methods = ["naive"] + [f"engine-{b}" for b in budgets]
    wall = dict.fromkeys(methods, 0.0)
    cpu = dict.fromkeys(methods, 0.0)
    engine_rows = {b: [] for b in budgets}
    naive = []
    for chunk, (start, stop) in enumerate(chunks):
        part = interactions.iloc[start:stop].reset_index(drop=True)
        for k in range(len(methods)):
            method = methods[(chunk + k) % len(methods)]
            t0, c0 = time.perf_counter(), time.process_time()
            if method == "naive":
                naive += naive_scores(model, jobs[start:stop])
            else:
                budget = None if method == "engine-None" else int(method.split("-")[1])
                engine_rows[budget].append(compute_targets(model, tokenizer, part, cfg.model_copy(update={"batch_token_budget": budget}), "bench"))
            wall[method] += time.perf_counter() - t0
            cpu[method] += time.process_time() - c0
        print(f"  {stop}/{args.n}: " + ", ".join(f"{m} {wall[m]:.0f}s wall {cpu[m]:.0f}s CPU" for m in methods), flush=True)
    naive_s = wall["naive"]
    engines = {b: (pd.concat(engine_rows[b], ignore_index=True), wall[f"engine-{b}"]) for b in budgets}

    print()
    print("| method | wall s | CPU s | tokens/s | interactions/s | speed-up (wall) | speed-up (CPU) | max abs log-prob diff vs naive |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| naive (2 full forwards, full float32 log-softmax) | {naive_s:.1f} | {cpu['naive']:.1f} | {tokens / naive_s:.0f} | {args.n / naive_s:.2f} | 1.00x | 1.00x | - |")
    for budget, (engine, engine_s) in engines.items():
        diff = max(
            float(np.abs(np.asarray(row_lp) - branch).max())
            for (_, row), branches in zip(engine.iterrows(), naive)
            for row_lp, branch in ((row.student_logprobs, branches[0]), (row.teacher_logprobs, branches[1]))
        )
        print(
            f"| engine, budget {budget or 'auto'} (prefix tree, head at response only, top-k {cfg.top_k}) | {engine_s:.1f} | {cpu[f'engine-{budget}']:.1f} "
            f"| {tokens / engine_s:.0f} | {args.n / engine_s:.2f} | {naive_s / engine_s:.2f}x | {cpu['naive'] / cpu[f'engine-{budget}']:.2f}x | {diff:.1e} |"
        )


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
