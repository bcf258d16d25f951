"""Hindsight targets: per-token teacher and student log-probs of each logged response, and their gap.

A_i = log π(y_i | x, o, y_<i) − log π(y_i | x, y_<i), scored once with the model that is champion now
(the `frozen` teacher), stored as one Parquet file per target set: (model revision, template hash).
Teacher, student (and optional neutral-follow-up) sequences are scored together in length-sorted
buckets under a padded-token budget, so short sequences do not pay for long ones' padding.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import duckdb
import numpy as np
import pandas as pd
import torch

from sdpo_platform.config import TargetsConfig
from sdpo_platform.hindsight import encode_interaction, template_hash
from sdpo_platform.logprobs import batch_response_logprobs
from sdpo_platform.paths import targets_dir

INPUT_COLUMNS = ("interaction_id", "context", "response", "followup", "split")
TARGET_COLUMNS = (
    "interaction_id", "split", "model_revision", "template_hash",
    "student_prompt_ids", "teacher_prompt_ids", "response_ids",
    "teacher_logprobs", "student_logprobs", "advantages", "neutral_logprobs",
    "n_tokens", "mean_advantage", "mean_abs_advantage", "sum_advantage", "min_advantage", "max_advantage",
)  # fmt: skip
LIST_COLUMNS = ("student_prompt_ids", "teacher_prompt_ids", "response_ids", "teacher_logprobs", "student_logprobs", "advantages", "neutral_logprobs")
TARGETS_FILE = "targets.parquet"

Progress = Callable[[int, int], None]


def compute_targets(
    model,
    tokenizer,
    interactions: pd.DataFrame,
    cfg: TargetsConfig,
    model_revision: str,
    progress: Progress | None = None,
) -> pd.DataFrame:
    """One row of targets per interaction (columns `TARGET_COLUMNS`), in the input's order.

    Advantage statistics cover every response token (EOS included); the trainer applies its own
    `skip_tokens`. `neutral_logprobs` is the teacher's score of y with `cfg.neutral_followup` in
    place of o (None when not configured). `progress(done, total)` counts scored sequences
    (two per interaction, three with a neutral follow-up).
    """
    missing = [c for c in INPUT_COLUMNS if c not in interactions.columns]
    if missing:
        raise ValueError(f"interactions lack columns {missing}")
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer needs a pad token (models.load_model sets one)")

    def encode(followup_column) -> list:
        return [
            encode_interaction(tokenizer, context, response, followup, cfg.template, cfg.max_prompt_tokens, cfg.max_response_tokens)
            for context, response, followup in zip(interactions["context"], interactions["response"], followup_column)
        ]

    encoded = encode(interactions["followup"])
    jobs = [(e.student_prompt_ids, e.response_ids) for e in encoded] + [(e.teacher_prompt_ids, e.response_ids) for e in encoded]
    if cfg.neutral_followup is not None:
        neutral = encode([cfg.neutral_followup] * len(interactions))
        jobs += [(e.teacher_prompt_ids, e.response_ids) for e in neutral]

    scores = score_sequences(model, jobs, tokenizer.pad_token_id, cfg.batch_token_budget, progress)
    n = len(encoded)
    student = scores[:n]
    teacher = scores[n : 2 * n]
    neutral_scores = scores[2 * n :] if cfg.neutral_followup is not None else [None] * n
    advantages = [t - s for t, s in zip(teacher, student)]

    return pd.DataFrame(
        {
            "interaction_id": list(interactions["interaction_id"]),
            "split": list(interactions["split"]),
            "model_revision": model_revision,
            "template_hash": template_hash(cfg.template),
            "student_prompt_ids": [e.student_prompt_ids for e in encoded],
            "teacher_prompt_ids": [e.teacher_prompt_ids for e in encoded],
            "response_ids": [e.response_ids for e in encoded],
            "teacher_logprobs": [t.tolist() for t in teacher],
            "student_logprobs": [s.tolist() for s in student],
            "advantages": [a.tolist() for a in advantages],
            "neutral_logprobs": [None if x is None else x.tolist() for x in neutral_scores],
            "n_tokens": [len(a) for a in advantages],
            "mean_advantage": [float(a.mean()) for a in advantages],
            "mean_abs_advantage": [float(np.abs(a).mean()) for a in advantages],
            "sum_advantage": [float(a.sum()) for a in advantages],
            "min_advantage": [float(a.min()) for a in advantages],
            "max_advantage": [float(a.max()) for a in advantages],
        },
        columns=list(TARGET_COLUMNS),
    )


def score_sequences(model, jobs: list[tuple[list[int], list[int]]], pad_id: int, token_budget: int, progress: Progress | None = None) -> list[np.ndarray]:
    """Response log-probs (float64 arrays) for each `(prompt_ids, response_ids)`, in input order.

    Jobs are sorted by length and packed into buckets whose padded size (rows × longest row) stays
    within `token_budget`; a single longer job still runs, alone. The model is put in eval mode for
    the call (no dropout in targets) and restored after.
    """
    order = sorted(range(len(jobs)), key=lambda j: len(jobs[j][0]) + len(jobs[j][1]))
    buckets: list[list[int]] = []
    for j in order:
        length = len(jobs[j][0]) + len(jobs[j][1])  # ascending, so the newest job is the longest
        if buckets and (len(buckets[-1]) + 1) * length <= token_budget:
            buckets[-1].append(j)
        else:
            buckets.append([j])

    results: list[np.ndarray | None] = [None] * len(jobs)
    was_training = model.training
    model.eval()
    done = 0
    try:
        with torch.inference_mode():
            for bucket in buckets:
                rows = batch_response_logprobs(model, [jobs[j][0] for j in bucket], [jobs[j][1] for j in bucket], pad_id=pad_id)
                for j, row in zip(bucket, rows):
                    results[j] = row.float().cpu().numpy().astype(np.float64)
                done += len(bucket)
                if progress is not None:
                    progress(done, len(jobs))
    finally:
        model.train(was_training)
    return results


def select_for_scoring(interactions_df: pd.DataFrame, cfg: TargetsConfig) -> pd.DataFrame:
    """Informative rows, at most `cfg.max_train` train and `cfg.max_validation` validation rows.

    Rows are chosen by the md5 of their interaction id, so the choice is deterministic, does not
    depend on input order, and a grown table keeps most of an earlier selection.
    """
    missing = [c for c in ("interaction_id", "split", "informative") if c not in interactions_df.columns]
    if missing:
        raise ValueError(f"interactions lack columns {missing}")
    keys = interactions_df[["interaction_id", "split", "informative"]]
    con = duckdb.connect()
    try:
        con.register("interaction_keys", keys)
        chosen = con.execute(
            """
            SELECT interaction_id
            FROM interaction_keys
            WHERE informative
            QUALIFY row_number() OVER (PARTITION BY split ORDER BY md5(interaction_id), interaction_id)
                    <= CASE split WHEN 'train' THEN $max_train WHEN 'validation' THEN $max_validation ELSE 0 END
            ORDER BY split, md5(interaction_id), interaction_id
            """,
            {"max_train": cfg.max_train, "max_validation": cfg.max_validation},
        ).df()
    finally:
        con.close()
    return chosen.merge(interactions_df, on="interaction_id", how="left")


def target_set_id(model_revision: str, template_hash: str) -> str:
    """Folder name of a target set: targets from one model revision under one hindsight template."""
    return f"{model_revision}-{template_hash}"


def write_targets(df: pd.DataFrame, root: Path | None = None) -> Path:
    """Write `df` as `targets/<target_set_id>/targets.parquet`, atomically replacing that set."""
    sets = df[["model_revision", "template_hash"]].drop_duplicates()
    if len(sets) != 1:
        raise ValueError(f"targets must come from exactly one (model_revision, template_hash), got {len(sets)}")
    revision, thash = sets.iloc[0]
    folder = targets_dir(root) / target_set_id(revision, thash)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / TARGETS_FILE
    handle, staging = tempfile.mkstemp(prefix=".targets.", suffix=".parquet", dir=folder)
    os.close(handle)
    try:
        df.to_parquet(staging, index=False)
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.remove(staging)
    return path


def read_targets(path: str | Path) -> pd.DataFrame:
    """A target set (its Parquet file or its folder) with list columns as Python lists."""
    path = Path(path)
    if path.is_dir():
        path = path / TARGETS_FILE
    df = pd.read_parquet(path)
    for column in LIST_COLUMNS:
        if column in df.columns:
            df[column] = df[column].map(lambda value: None if value is None else value.tolist())
    return df
