"""Hindsight targets: per-token teacher and student log-probs of each logged response, and their gap.

A_i = log π(y_i | x, o, y_<i) − log π(y_i | x, y_<i), scored once with the model that is champion now
(the `frozen` teacher). A target set is one folder per (model revision, template, scoring settings and
float precision) under the data root's `targets/`: anything that changes the numbers gives a new set
beside the old ones, so a set id names fixed numbers; new interactions (a new day) grow a set in place.

Inside a set, work is never lost: `inputs.parquet` and `manifest.json` fix the plan (which interactions,
in which shard, with which settings), and each shard is written atomically (temp file + rename) once
scored. Shard boundaries follow content, so a grown plan keeps the shards it did not touch. A killed run
resumes with the shards still missing; a rerun of a complete set does nothing; and any process holding
the model scores pending shards, claiming each first (`shard_claims`) so that workers split a set:

    python -m sdpo_platform.targets SET_DIR [--shards 0 3 7] [--model PATH] [--wait]

The plan is two files, hence two renames, so the manifest carries the sha256 of the inputs file: a
planner rewrites whichever file differs from its plan (a plan killed between the renames is repaired by
the next), and a worker scores only inputs whose digest its manifest names (`read_plan`).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import json
import os
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import duckdb
import numpy as np
import pandas as pd

from sdpo_platform.config import TargetsConfig
from sdpo_platform.hindsight import PROMPT_ENCODING_VERSION, EncodedInteraction, encode_interaction, template_hash
from sdpo_platform.paths import targets_dir
from sdpo_platform.scoring import BranchJob, ProgressCallback, ScoringProgress, score_jobs
from sdpo_platform.shard_claims import CLAIM_TIMEOUT_S, describe, read_claim, try_claim

INPUT_COLUMNS = ("interaction_id", "context", "response", "followup", "split")
TARGET_COLUMNS = (
    "interaction_id", "split", "model_revision", "template_hash",
    "student_prompt_ids", "teacher_prompt_ids", "response_ids",
    "teacher_logprobs", "student_logprobs", "advantages", "neutral_logprobs",
    "n_tokens", "mean_advantage", "mean_abs_advantage", "sum_advantage", "min_advantage", "max_advantage",
    "teacher_topk_ids", "teacher_topk_logprobs", "teacher_tail_mass",
)  # fmt: skip
LIST_COLUMNS = (
    "student_prompt_ids", "teacher_prompt_ids", "response_ids", "teacher_logprobs", "student_logprobs", "advantages",
    "neutral_logprobs", "teacher_topk_ids", "teacher_topk_logprobs", "teacher_tail_mass",
)  # fmt: skip
SCORING_FIELDS = ("template", "max_prompt_tokens", "max_response_tokens", "neutral_followup", "top_k")  # change the numbers
MANIFEST_FILE = "manifest.json"
INPUTS_FILE = "inputs.parquet"
LEGACY_TARGETS_FILE = "targets.parquet"
MAX_SHARD_FACTOR = 4  # no shard passes this many times `shard_size` rows
POLL_S, WAIT_LOG_S = 10.0, 60.0  # while others score the rest: look again / say so this often


@dataclass
class TargetSetResult:
    """What one materialization did: the set's folder, its size, and which process scored its shards."""

    path: str
    target_set: str
    model_revision: str
    template_hash: str
    rows: int
    shards: int
    shards_scored: int  # written by this process
    shards_reused: int  # on disk already when planned
    shards_scored_elsewhere: int = 0  # written by other workers while this one ran


def encode_interactions(tokenizer, interactions: pd.DataFrame, cfg: TargetsConfig) -> tuple[list[EncodedInteraction], list[BranchJob]]:
    """Encoded (x, y, o) rows and their scoring jobs: branches student, teacher[, neutral teacher]."""
    missing = [c for c in INPUT_COLUMNS if c not in interactions.columns]
    if missing:
        raise ValueError(f"interactions lack columns {missing}")

    def encode(followups) -> list[EncodedInteraction]:
        return [
            encode_interaction(tokenizer, _messages(context), response, followup, cfg.template, cfg.max_prompt_tokens, cfg.max_response_tokens)
            for context, response, followup in zip(interactions["context"], interactions["response"], followups)
        ]

    encoded = encode(interactions["followup"])
    branches = [[e.student_prompt_ids, e.teacher_prompt_ids] for e in encoded]
    if cfg.neutral_followup is not None:
        for prompts, neutral in zip(branches, encode([cfg.neutral_followup] * len(interactions))):
            prompts.append(neutral.teacher_prompt_ids)
    jobs = [BranchJob(tuple(prompts), e.response_ids) for prompts, e in zip(branches, encoded)]
    return encoded, jobs


def compute_targets(
    model,
    tokenizer,
    interactions: pd.DataFrame,
    cfg: TargetsConfig,
    model_revision: str,
    progress: ProgressCallback | None = None,
) -> pd.DataFrame:
    """One row of targets per interaction (columns `TARGET_COLUMNS`), in the input's order.

    Advantage statistics cover every response token (EOS included); the trainer applies its own
    `skip_tokens`. `neutral_logprobs` is the teacher's score of y with `cfg.neutral_followup` in
    place of o (None when not configured); the top-k columns are None when `cfg.top_k == 0`.
    """
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer needs a pad token (models.load_model sets one)")
    encoded, jobs = encode_interactions(tokenizer, interactions, cfg)
    scores = score_jobs(model, jobs, tokenizer.pad_token_id, cfg.batch_token_budget, top_k=cfg.top_k, topk_branch=1, progress=progress)
    student = [s.logprobs[0] for s in scores]
    teacher = [s.logprobs[1] for s in scores]
    advantages = [t - s for t, s in zip(teacher, student)]
    with_topk = cfg.top_k > 0
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
            "neutral_logprobs": [s.logprobs[2].tolist() if len(s.logprobs) > 2 else None for s in scores],
            "n_tokens": [len(a) for a in advantages],
            "mean_advantage": [float(a.mean()) for a in advantages],
            "mean_abs_advantage": [float(np.abs(a).mean()) for a in advantages],
            "sum_advantage": [float(a.sum()) for a in advantages],
            "min_advantage": [float(a.min()) for a in advantages],
            "max_advantage": [float(a.max()) for a in advantages],
            "teacher_topk_ids": [s.topk_ids.tolist() if with_topk else None for s in scores],
            "teacher_topk_logprobs": [s.topk_logprobs.tolist() if with_topk else None for s in scores],
            "teacher_tail_mass": [s.tail_mass.tolist() if with_topk else None for s in scores],
        },
        columns=list(TARGET_COLUMNS),
    )


def select_for_scoring(interactions_df: pd.DataFrame, cfg: TargetsConfig) -> pd.DataFrame:
    """Informative rows, at most `cfg.max_train` train and `cfg.max_validation` validation rows.

    Rows are chosen by an md5 of their content (context, response, follow-up; the id where a frame has
    none), so the choice is deterministic, does not depend on input order or on where the log files
    lived (ids hash the source path), and a grown table keeps most of an earlier selection. The chosen
    rows come back grouped by conversation, turns ascending, so a conversation's turns land in the same
    shard, where the scoring engine runs the tokens they share once; conversations come by the day they
    start (`partition_date`, where the frame has one), then by conversation hash, so a new day's
    conversations follow the shards of the days before instead of landing in all of them. The order
    only decides the shards' composition; `bench/bench_scoring.py` takes its fixed set of interactions
    from it.
    """
    missing = [c for c in ("interaction_id", "split", "informative") if c not in interactions_df.columns]
    if missing:
        raise ValueError(f"interactions lack columns {missing}")
    keys = interactions_df[["interaction_id", "split", "informative"]].copy()
    keys["conversation_id"] = interactions_df.get("conversation_id", interactions_df["interaction_id"])
    keys["turn_index"] = interactions_df.get("turn_index", 0)
    keys["day"] = interactions_df.get("partition_date")
    content = [c for c in ("context", "response", "followup") if c in interactions_df.columns]
    for column in content:
        keys[column] = interactions_df[column]
    content_sql = (
        "concat_ws(chr(0), " + ", ".join(f"coalesce(to_json({c})::VARCHAR, '')" for c in content) + ")" if content else "interaction_id"
    )
    con = duckdb.connect()
    try:
        con.register("interaction_keys", keys)
        chosen = con.execute(
            f"""
            WITH keyed AS (
                SELECT *, md5({content_sql}) AS content_key, min(day) OVER (PARTITION BY conversation_id) AS first_day
                FROM interaction_keys WHERE informative
            )
            SELECT interaction_id
            FROM keyed
            QUALIFY row_number() OVER (PARTITION BY split ORDER BY content_key, interaction_id)
                    <= CASE split WHEN 'train' THEN $max_train WHEN 'validation' THEN $max_validation ELSE 0 END
            ORDER BY split, first_day NULLS FIRST, md5(conversation_id), conversation_id, turn_index, interaction_id
            """,
            {"max_train": cfg.max_train, "max_validation": cfg.max_validation},
        ).df()
    finally:
        con.close()
    return chosen.merge(interactions_df, on="interaction_id", how="left")


def scoring_key(cfg: TargetsConfig, dtype: str) -> str:
    """Digest of everything that changes the numbers: the settings, the prompt encoding, the float precision."""
    settings = {name: getattr(cfg, name) for name in SCORING_FIELDS} | {"prompt_encoding": PROMPT_ENCODING_VERSION, "dtype": dtype}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()[:8]


def target_set_id(model_revision: str, template_hash: str, scoring_key: str) -> str:
    """Folder name of a target set: one model revision, one hindsight template, one `scoring_key`."""
    return f"{model_revision}-{template_hash}-{scoring_key}"


def target_set_dir(model_revision: str, cfg: TargetsConfig, dtype: str = "float32", root: Path | None = None) -> Path:
    """Where the target set of this model revision, these settings and this precision lives (it may not exist yet)."""
    return targets_dir(root) / target_set_id(model_revision, template_hash(cfg.template), scoring_key(cfg, dtype))


def shard_numbers(conversations: list, splits: list, shard_size: int) -> list[int]:
    """The shard of each row, with boundaries set by content, so that a grown plan keeps its other shards.

    Rows come grouped by conversation. A shard ends after conversation c when md5(c) mod `shard_size`
    < rows(c) (about every `shard_size` rows) and where the split changes, so adding or removing a
    conversation changes only the shard it falls in (or joins two, or splits one, when it carries a
    boundary); fixed-size shards would shift every later shard. A shard never passes `MAX_SHARD_FACTOR`
    × `shard_size` rows: a longer run is cut into pieces of that size, which moves cuts only up to the
    run's next content boundary.
    """
    cap = MAX_SHARD_FACTOR * shard_size
    out: list[int] = []
    index = length = 0
    previous_split = None
    for (split, conversation), group in itertools.groupby(zip(splits, conversations)):
        n = len(list(group))
        if length and (length + n > cap or split != previous_split):
            index, length = index + 1, 0
        for _ in range(n):
            if length == cap:
                index, length = index + 1, 0
            out.append(index)
            length += 1
        if int(hashlib.md5(str(conversation).encode("utf-8")).hexdigest(), 16) % shard_size < n:
            index, length = index + 1, 0
        previous_split = split
    return out


def plan_target_set(
    interactions: pd.DataFrame,
    cfg: TargetsConfig,
    model_path: str,
    model_revision: str,
    root: Path | None = None,
    dtype: str = "float32",
) -> Path:
    """Fix which interactions go into which shard, scored in which precision; returns the set's folder.

    Shards follow `shard_numbers` over the input order (conversations by `conversation_id` where the
    frame has one). A shard's file name is a digest of its rows and of the settings, so a shard already
    on disk is reused exactly when it would be recomputed identically, wherever the re-plan puts it.
    Files are only rewritten when the plan changes: the inputs when the file on disk is not this
    plan's (its sha256, which the manifest records, differs), then the manifest when it differs
    (inputs first: a kill in between leaves a manifest whose digest the inputs fail, which workers
    refuse and the next plan repairs).
    """
    missing = [c for c in INPUT_COLUMNS if c not in interactions.columns]
    if missing:
        raise ValueError(f"interactions lack columns {missing}")
    folder = target_set_dir(model_revision, cfg, dtype, root)
    folder.mkdir(parents=True, exist_ok=True)
    conversations = interactions.get("conversation_id", interactions["interaction_id"])
    inputs = pd.DataFrame(
        {
            "interaction_id": list(interactions["interaction_id"]),
            "context_json": [json.dumps(_messages(c), ensure_ascii=False) for c in interactions["context"]],
            "response": list(interactions["response"]),
            "followup": list(interactions["followup"]),
            "split": list(interactions["split"]),
            "shard": shard_numbers(list(conversations), list(interactions["split"]), cfg.shard_size),
        }
    )
    if inputs["interaction_id"].duplicated().any():
        raise ValueError("interaction ids must be unique within a target set")
    settings = {name: getattr(cfg, name) for name in SCORING_FIELDS} | {"prompt_encoding": PROMPT_ENCODING_VERSION, "dtype": dtype}
    shards = []
    for index, rows in inputs.groupby("shard", sort=True):
        payload = json.dumps([settings, rows.drop(columns="shard").values.tolist()], ensure_ascii=False)
        digest = hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]
        shards.append({"index": int(index), "file": f"shard-{digest}.parquet", "rows": len(rows)})
    buffer = io.BytesIO()
    inputs.to_parquet(buffer, index=False)
    inputs_bytes = buffer.getvalue()
    inputs_sha256 = hashlib.sha256(inputs_bytes).hexdigest()
    manifest = {
        "model_revision": model_revision,
        "template_hash": template_hash(cfg.template),
        "scoring_key": scoring_key(cfg, dtype),
        "dtype": dtype,
        "model_path": model_path,
        "targets_config": cfg.model_dump(),
        "rows": len(inputs),
        "inputs_sha256": inputs_sha256,
        "shards": shards,
    }
    inputs_path, manifest_path = folder / INPUTS_FILE, folder / MANIFEST_FILE
    if not inputs_path.exists() or hashlib.sha256(inputs_path.read_bytes()).hexdigest() != inputs_sha256:
        _atomic_write(inputs_path, lambda tmp: Path(tmp).write_bytes(inputs_bytes))
    if not manifest_path.exists() or json.loads(manifest_path.read_text()) != manifest:
        _atomic_write(manifest_path, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=2, ensure_ascii=False)))
    return folder


def read_manifest(set_dir: str | Path) -> dict:
    return json.loads((Path(set_dir) / MANIFEST_FILE).read_text())


def read_plan(set_dir: str | Path, attempts: int = 3) -> tuple[dict, bytes]:
    """The manifest and the bytes of the inputs it was planned with (their sha256 checked).

    A re-plan running meanwhile replaces inputs then manifest, so a mismatch is read again after a
    moment; one that persists (a plan killed between its two files, or a set planned before inputs
    carried a digest) is an error: plan the set again (`materialize_targets` / `plan_target_set`).
    """
    set_dir = Path(set_dir)
    for attempt in range(attempts):
        if attempt:
            time.sleep(0.5)
        manifest = read_manifest(set_dir)
        data = (set_dir / INPUTS_FILE).read_bytes()
        if manifest.get("inputs_sha256") == hashlib.sha256(data).hexdigest():
            return manifest, data
    raise RuntimeError(
        f"{set_dir / INPUTS_FILE} is not the file {MANIFEST_FILE} was planned with (its sha256 differs or the manifest "
        "records none): the set was re-planned while this ran or a plan was interrupted; plan the set again"
    )


def pending_shards(set_dir: str | Path) -> list[int]:
    """Indices of the planned shards whose file is not on disk yet."""
    set_dir = Path(set_dir)
    return [s["index"] for s in read_manifest(set_dir)["shards"] if not (set_dir / s["file"]).exists()]


def checked_model_path(manifest: dict, model_path: str | None = None) -> str:
    """`model_path` (this machine's copy) or the manifest's, if it has the set's revision; else a ValueError."""
    from sdpo_platform.models import model_revision

    path = model_path or manifest["model_path"]
    if model_revision(path) != manifest["model_revision"]:
        hint = "" if model_path or Path(path).exists() else ": it is not there, give this machine's copy with --model PATH"
        raise ValueError(f"{path} does not have the set's model revision {manifest['model_revision']}{hint}")
    return path


def load_scoring_model(manifest: dict, model_path: str | None = None):
    """The set's model (`checked_model_path`) in the set's precision."""
    import torch

    from sdpo_platform.models import load_model

    dtype = manifest.get("dtype")
    return load_model(checked_model_path(manifest, model_path), dtype=getattr(torch, dtype) if dtype else None)


def score_shard(set_dir: str | Path, shard_index: int, model=None, tokenizer=None, progress: ProgressCallback | None = None) -> bool:
    """Score one planned shard and write it atomically; True only when this call wrote it.

    Independent of any other process: the plan and the inputs are read from the set's folder, and
    without `model` the manifest's model is loaded (`load_scoring_model`). Manifest and inputs are read
    together after the model is loaded and checked against each other (`read_plan`), so the shard is
    computed from, and named after, the rows of one plan. False (no work) when the shard is on disk or
    another live process claims it.
    """
    set_dir = Path(set_dir)
    shard = _shard(read_manifest(set_dir), shard_index)
    if (set_dir / shard["file"]).exists():
        return False
    if model is None or tokenizer is None:
        model, tokenizer = load_scoring_model(read_manifest(set_dir))
    manifest, data = read_plan(set_dir)  # the plan may have changed while the model loaded
    return _score_claimed(set_dir, manifest, data, _shard(manifest, shard_index), lambda: (model, tokenizer), progress)


@dataclass
class ScoringRun:
    """What `score_pending` saw: shards it wrote, shards others wrote meanwhile, and those still missing."""

    scored: list[int] = field(default_factory=list)
    elsewhere: list[int] = field(default_factory=list)
    reused: int = 0  # on disk at the start
    left: list[int] = field(default_factory=list)  # claimed by others when it stopped (never when waiting)


def score_pending(
    set_dir: str | Path,
    load: Callable[[], tuple],
    only: list[int] | None = None,
    wait: bool = False,
    progress: ProgressCallback | None = None,
    show_bar: bool = False,
    log: Callable[[str], None] | None = None,
    shard_lines: bool = False,
    poll_s: float = POLL_S,
    claim_timeout_s: float = CLAIM_TIMEOUT_S,
) -> ScoringRun:
    """Claim and score the set's missing shards (or those of `only`) until none is left to claim.

    Shards claimed by live others are skipped; with `wait` this polls until they are on disk, taking
    over claims that go stale, so the set is complete on return. `load()` gives `(model, tokenizer)` and
    is called at the first claim won. `progress` gets a `ScoringProgress` over the pending interactions
    (others' shards count once seen) after every batch, and with `extra["shards_done"]` after every
    shard written here; `show_bar` draws a tqdm bar on stderr when it is a terminal; `log` gets the
    waits and, with `shard_lines`, a line per shard.
    """
    from tqdm.auto import tqdm

    set_dir, log = Path(set_dir), log or (lambda message: None)
    manifest, data = read_plan(set_dir)
    chosen = [s for s in manifest["shards"] if only is None or s["index"] in only]
    pending = [s for s in chosen if not (set_dir / s["file"]).exists()]
    run, total = ScoringRun(reused=len(chosen) - len(pending)), sum(s["rows"] for s in pending)
    loaded: list[tuple] = []  # the model, once a claim is won: nothing is loaded when others do it all
    seen: set[int] = set()

    def get_model() -> tuple:
        loaded[:] = loaded or [load()]
        return loaded[0]

    started, done_rows, tokens, last_wait_log = time.monotonic(), 0, 0, -WAIT_LOG_S
    bar = tqdm(total=total, unit="interaction", desc="hindsight targets", disable=None if show_bar else True, file=sys.stderr)
    try:
        while True:
            for s in pending:  # count shards others finished, once
                if s["index"] not in seen and (set_dir / s["file"]).exists():
                    seen.add(s["index"])
                    run.elsewhere.append(s["index"])
                    done_rows += s["rows"]
                    bar.update(s["rows"])
            todo = [s for s in pending if s["index"] not in seen]
            if not todo:
                break
            wrote = False
            for s in todo:
                if (set_dir / s["file"]).exists():
                    continue
                shard_started, last = time.monotonic(), []

                def report(p: ScoringProgress) -> None:
                    overall = ScoringProgress(done_rows + p.interactions_done, total, tokens + p.tokens_done, time.monotonic() - started)
                    bar.update(overall.interactions_done - bar.n)
                    bar.set_postfix(tokens_per_s=f"{overall.tokens_per_s:.0f}")
                    last[:] = [overall]
                    if progress is not None:
                        progress(overall)

                if not _score_claimed(set_dir, manifest, data, s, get_model, report, claim_timeout_s):
                    continue
                wrote = True
                seen.add(s["index"])
                run.scored.append(s["index"])
                done_rows += s["rows"]
                tokens = last[-1].tokens_done if last else tokens
                bar.update(done_rows - bar.n)
                elapsed = time.monotonic() - started
                if shard_lines:
                    eta = (total - done_rows) * elapsed / max(done_rows, 1)
                    log(
                        f"shard {s['index']}: scored {s['rows']} interactions in {time.monotonic() - shard_started:.1f}s; "
                        f"{done_rows}/{total} interactions, {tokens / max(elapsed, 1e-9):.0f} tokens/s, ETA {eta:.0f}s"
                    )
                if progress is not None:
                    extra = {"shards_done": len(run.scored), "shards_total": len(pending), "shard": s["index"]}
                    progress(ScoringProgress(done_rows, total, tokens, elapsed, extra))
            if wrote:
                continue
            left = [s for s in todo if not (set_dir / s["file"]).exists()]
            if left and not wait:
                run.left = [s["index"] for s in left]
                break
            if left and time.monotonic() - last_wait_log >= WAIT_LOG_S:
                holders = [describe(h) for s in left[:3] if (h := read_claim(_claim_path(set_dir, s)))]
                log(f"waiting for {len(left)} shard(s) that other workers are scoring: {', '.join(holders)}{' ...' if len(left) > 3 else ''}")
                last_wait_log = time.monotonic()
            if left:
                time.sleep(poll_s)
    finally:
        bar.close()
    return run


def materialize_targets(
    interactions: pd.DataFrame,
    cfg: TargetsConfig,
    model_spec: str,
    root: Path | None = None,
    progress: ProgressCallback | None = None,
    model=None,
    tokenizer=None,
    show_bar: bool = True,
    dtype: str | None = None,
    log: Callable[[str], None] | None = None,
    poll_s: float = POLL_S,
    claim_timeout_s: float = CLAIM_TIMEOUT_S,
) -> TargetSetResult:
    """Plan the set of `model_spec`'s current revision, score the shards still missing, return when complete.

    Workers (`python -m sdpo_platform.targets SET_DIR`) may score shards of the same set meanwhile: each
    shard is claimed before it is scored, and shards other workers hold are waited for (`score_pending`).
    `dtype` is the precision the set is scored in: `model`'s when given, else what `load_model` picks
    here (bf16 on CUDA, float32 on CPU). The model is loaded only when this process wins a shard. `log`
    gets the set's folder once planned (for starting workers) and the waits.
    """
    import torch

    from sdpo_platform.models import load_model, model_revision, resolve_model

    revision, model_path = model_revision(model_spec, root), resolve_model(model_spec, root)
    dtype = dtype or (_dtype_name(model) if model is not None else "bfloat16" if torch.cuda.is_available() else "float32")
    set_dir = plan_target_set(interactions, cfg, model_path, revision, root, dtype=dtype)
    manifest = read_manifest(set_dir)
    log = log or (lambda message: None)
    log(f"target set {set_dir}: {len(manifest['shards'])} shard(s), {len(pending_shards(set_dir))} to score ({dtype})")

    def load():
        return (model, tokenizer) if model is not None and tokenizer is not None else load_model(model_spec, root, dtype=getattr(torch, dtype))

    run = score_pending(set_dir, load, wait=True, progress=progress, show_bar=show_bar, log=log, poll_s=poll_s, claim_timeout_s=claim_timeout_s)
    return TargetSetResult(
        path=str(set_dir),
        target_set=set_dir.name,
        model_revision=revision,
        template_hash=manifest["template_hash"],
        rows=manifest["rows"],
        shards=len(manifest["shards"]),
        shards_scored=len(run.scored),
        shards_reused=run.reused,
        shards_scored_elsewhere=len(run.elsewhere),
    )


def read_targets(path: str | Path) -> pd.DataFrame:
    """A target set (its folder, or a single Parquet file) with list columns as Python lists.

    A folder is read through its manifest, shards in plan order; an incomplete set is an error, never
    a silently smaller one.
    """
    path = Path(path)
    if path.is_dir() and (path / MANIFEST_FILE).exists():
        manifest = read_manifest(path)
        missing = [s["file"] for s in manifest["shards"] if not (path / s["file"]).exists()]
        if missing:
            raise FileNotFoundError(f"target set {path} is incomplete: {len(missing)} shard(s) not scored yet")
        frames = [pd.read_parquet(path / s["file"]) for s in manifest["shards"]]
        df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(TARGET_COLUMNS))
    else:
        df = pd.read_parquet(path / LEGACY_TARGETS_FILE if path.is_dir() else path)
    for column in LIST_COLUMNS:
        if column in df.columns:
            df[column] = df[column].map(_as_lists)
    return df


def _shard(manifest: dict, index: int) -> dict:
    for shard in manifest["shards"]:
        if shard["index"] == index:
            return shard
    raise IndexError(f"the plan has no shard {index}: its shards are 0..{len(manifest['shards']) - 1}")


def _claim_path(set_dir: Path, shard: dict) -> Path:
    return set_dir / shard["file"].replace(".parquet", ".claim")


def _dtype_name(model) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def _score_claimed(set_dir: Path, manifest: dict, data: bytes, shard: dict, get_model, progress, claim_timeout_s: float = CLAIM_TIMEOUT_S) -> bool:
    """Claim, score and write one shard of a checked plan (`read_plan`); False when it is done or claimed elsewhere.

    `get_model()` gives `(model, tokenizer)`, which must have the set's precision: shards of one set never mix them.
    """
    claim = try_claim(_claim_path(set_dir, shard), claim_timeout_s)
    if claim is None:
        return False
    with claim:
        if (set_dir / shard["file"]).exists():
            return False
        model, tokenizer = get_model()
        if manifest.get("dtype", _dtype_name(model)) != _dtype_name(model):
            raise ValueError(f"the set is scored in {manifest['dtype']}, this model is {_dtype_name(model)}: load it in {manifest['dtype']}")
        inputs = pd.read_parquet(io.BytesIO(data), filters=[("shard", "==", shard["index"])])
        inputs["context"] = [json.loads(c) for c in inputs["context_json"]]
        cfg = TargetsConfig.model_validate(manifest["targets_config"])
        frame = compute_targets(model, tokenizer, inputs, cfg, manifest["model_revision"], progress=progress)
        _atomic_write(set_dir / shard["file"], lambda tmp: frame.to_parquet(tmp, index=False))
    return True


def _as_lists(value):
    if isinstance(value, np.ndarray):
        return [_as_lists(v) for v in value] if value.dtype == object else value.tolist()
    return value


def _messages(context) -> list[dict]:
    """Context messages as plain dicts (DuckDB hands back numpy arrays of structs)."""
    return [{"role": m["role"], "content": m["content"]} for m in context]


def _atomic_write(path: Path, write) -> None:
    """`write(temp_path)` next to `path`, then rename over it: readers never see half a file.

    The temp file is created as `open` would create `path` (mode 0666 less the umask, not mkstemp's
    0600), so workers and trainers running as other users can read the set.
    """
    staging = str(path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp")
    os.close(os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(staging)
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.remove(staging)


def main(argv: list[str] | None = None) -> None:
    """Worker: claim and score pending shards of a planned target set (all, or those of --shards)."""
    from tqdm.auto import tqdm

    parser = argparse.ArgumentParser(prog="python -m sdpo_platform.targets", description=main.__doc__)
    parser.add_argument("set_dir", help="the set's folder (the asset logs it: 'target set <folder>: ...')")
    parser.add_argument("--shards", type=int, nargs="*", help="shard indices (default: every pending one)")
    parser.add_argument("--model", help="this machine's copy of the set's model (default: the manifest's model_path)")
    parser.add_argument("--wait", action="store_true", help="also wait for shards other workers hold, until the set is complete")
    args = parser.parse_args(argv)
    set_dir = Path(args.set_dir)
    if not (set_dir / MANIFEST_FILE).exists():
        parser.error(f"{set_dir} has no {MANIFEST_FILE}: not a planned target set")
    manifest = read_manifest(set_dir)
    if args.shards:
        unknown = sorted(set(args.shards) - {s["index"] for s in manifest["shards"]})
        if unknown:
            parser.error(f"--shards {' '.join(map(str, unknown))}: this plan has shards 0..{len(manifest['shards']) - 1} (re-planned since?)")
    pending = [i for i in pending_shards(set_dir) if not args.shards or i in args.shards]
    if pending:
        try:  # the weights are checked before any claim is made
            checked_model_path(manifest, args.model)
        except ValueError as error:
            parser.exit(1, f"error: {error}\n")
    interactive = sys.stderr.isatty()
    log = (lambda message: tqdm.write(message, file=sys.stderr)) if interactive else (lambda message: print(message, flush=True))
    run = score_pending(
        set_dir, lambda: load_scoring_model(manifest, args.model), only=args.shards or None, wait=args.wait,
        show_bar=interactive, log=log, shard_lines=not interactive,
    )  # fmt: skip
    print(
        f"{set_dir.name}: {len(run.scored)} shard(s) scored here, {len(run.elsewhere)} by other workers, {run.reused} already done"
        + (f"; {len(run.left)} still being scored by others ({' '.join(map(str, run.left))})" if run.left else "")
    )


if __name__ == "__main__":
    main()
