"""Hindsight targets: per-token teacher and student log-probs of each logged response, and their gap.

A_i = log π(y_i | x, o, y_<i) − log π(y_i | x, y_<i), scored once with the model that is champion now
(the `frozen` teacher). A target set is one folder per (model revision, template hash) under the data
root's `targets/`; a new champion or a new template gives a new set beside the old ones.

Inside a set, work is never lost: `inputs.parquet` and `manifest.json` fix the plan (which interactions,
in which shard, with which settings), and each shard is written atomically (temp file + rename) once
scored. A killed run resumes with the shards still missing; a rerun of a complete set does nothing; and
any process holding the model can score any shard (`score_shard`), so shards can run on many workers:

    python -m sdpo_platform.targets SET_DIR [--shards 0 3 7]

The plan is two files, hence two renames, so the manifest carries the sha256 of the inputs file: a
planner rewrites whichever file differs from its plan (a plan killed between the renames is repaired by
the next), and a worker scores only inputs whose digest its manifest names (`read_plan`).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from sdpo_platform.config import TargetsConfig
from sdpo_platform.hindsight import PROMPT_ENCODING_VERSION, EncodedInteraction, encode_interaction, template_hash
from sdpo_platform.paths import targets_dir
from sdpo_platform.scoring import BranchJob, ProgressCallback, ScoringProgress, score_jobs

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


@dataclass
class TargetSetResult:
    """What one materialization did: the set's folder, its size, and how many shards it had to score."""

    path: str
    target_set: str
    model_revision: str
    template_hash: str
    rows: int
    shards: int
    shards_scored: int
    shards_reused: int


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
    rows come back grouped by conversation (in conversation-hash order, turns ascending), so a
    conversation's turns land in the same shard, where the scoring engine runs the tokens they share
    once. The order only decides the shards' composition; `bench/bench_scoring.py` takes its fixed set
    of interactions from it.
    """
    missing = [c for c in ("interaction_id", "split", "informative") if c not in interactions_df.columns]
    if missing:
        raise ValueError(f"interactions lack columns {missing}")
    keys = interactions_df[["interaction_id", "split", "informative"]].copy()
    keys["conversation_id"] = interactions_df.get("conversation_id", interactions_df["interaction_id"])
    keys["turn_index"] = interactions_df.get("turn_index", 0)
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
            WITH keyed AS (SELECT *, md5({content_sql}) AS content_key FROM interaction_keys WHERE informative)
            SELECT interaction_id
            FROM keyed
            QUALIFY row_number() OVER (PARTITION BY split ORDER BY content_key, interaction_id)
                    <= CASE split WHEN 'train' THEN $max_train WHEN 'validation' THEN $max_validation ELSE 0 END
            ORDER BY split, md5(conversation_id), conversation_id, turn_index, interaction_id
            """,
            {"max_train": cfg.max_train, "max_validation": cfg.max_validation},
        ).df()
    finally:
        con.close()
    return chosen.merge(interactions_df, on="interaction_id", how="left")


def target_set_id(model_revision: str, template_hash: str) -> str:
    """Folder name of a target set: targets from one model revision under one hindsight template."""
    return f"{model_revision}-{template_hash}"


def target_set_dir(model_revision: str, template: str, root: Path | None = None) -> Path:
    """Where the target set of this model revision and template lives (it may not exist yet)."""
    return targets_dir(root) / target_set_id(model_revision, template_hash(template))


def plan_target_set(interactions: pd.DataFrame, cfg: TargetsConfig, model_path: str, model_revision: str, root: Path | None = None) -> Path:
    """Fix which interactions go into which shard; returns the set's folder.

    Shards are consecutive runs of `cfg.shard_size` input rows. A shard's file name carries a digest of
    its rows and of the settings that change the numbers, so a shard already on disk is reused exactly
    when it would be recomputed identically. Files are only rewritten when the plan changes: the inputs
    when the file on disk is not this plan's (its sha256, which the manifest records, differs), then the
    manifest when it differs (inputs first: a kill in between leaves a manifest whose digest the inputs
    fail, which workers refuse and the next plan repairs).
    """
    missing = [c for c in INPUT_COLUMNS if c not in interactions.columns]
    if missing:
        raise ValueError(f"interactions lack columns {missing}")
    folder = target_set_dir(model_revision, cfg.template, root)
    folder.mkdir(parents=True, exist_ok=True)
    inputs = pd.DataFrame(
        {
            "interaction_id": list(interactions["interaction_id"]),
            "context_json": [json.dumps(_messages(c), ensure_ascii=False) for c in interactions["context"]],
            "response": list(interactions["response"]),
            "followup": list(interactions["followup"]),
            "split": list(interactions["split"]),
            "shard": np.arange(len(interactions)) // cfg.shard_size,
        }
    )
    if inputs["interaction_id"].duplicated().any():
        raise ValueError("interaction ids must be unique within a target set")
    settings = {name: getattr(cfg, name) for name in SCORING_FIELDS} | {"prompt_encoding": PROMPT_ENCODING_VERSION}
    shards = []
    for index, rows in inputs.groupby("shard", sort=True):
        payload = json.dumps([settings, rows.drop(columns="shard").values.tolist()], ensure_ascii=False)
        digest = hashlib.sha256(payload.encode("utf-8")).hexdigest()[:12]
        shards.append({"index": int(index), "file": f"shard-{int(index):05d}-{digest}.parquet", "rows": len(rows)})
    buffer = io.BytesIO()
    inputs.to_parquet(buffer, index=False)
    inputs_bytes = buffer.getvalue()
    inputs_sha256 = hashlib.sha256(inputs_bytes).hexdigest()
    manifest = {
        "model_revision": model_revision,
        "template_hash": template_hash(cfg.template),
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


def score_shard(set_dir: str | Path, shard_index: int, model=None, tokenizer=None, progress: ProgressCallback | None = None) -> bool:
    """Score one planned shard and write it atomically; False (and no work) when it already exists.

    Independent of any other process: the plan and the inputs are read from the set's folder, and
    without `model` the manifest's model is loaded (and must still have the set's revision). Manifest
    and inputs are read together after the model is loaded and checked against each other (`read_plan`),
    so the shard is computed from, and named after, the rows of one plan.
    """
    set_dir = Path(set_dir)
    manifest = read_manifest(set_dir)
    shard = next(s for s in manifest["shards"] if s["index"] == shard_index)
    if (set_dir / shard["file"]).exists():
        return False
    if model is None or tokenizer is None:
        from sdpo_platform.models import load_model, model_revision

        if model_revision(manifest["model_path"]) != manifest["model_revision"]:
            raise ValueError(f"{manifest['model_path']} no longer has revision {manifest['model_revision']}")
        model, tokenizer = load_model(manifest["model_path"])
    manifest, data = read_plan(set_dir)  # the plan may have changed while the model loaded
    shard = next(s for s in manifest["shards"] if s["index"] == shard_index)
    if (set_dir / shard["file"]).exists():
        return False
    inputs = pd.read_parquet(io.BytesIO(data), filters=[("shard", "==", shard_index)])
    inputs["context"] = [json.loads(c) for c in inputs["context_json"]]
    cfg = TargetsConfig.model_validate(manifest["targets_config"])
    frame = compute_targets(model, tokenizer, inputs, cfg, manifest["model_revision"], progress=progress)
    _atomic_write(set_dir / shard["file"], lambda tmp: frame.to_parquet(tmp, index=False))
    return True


def materialize_targets(
    interactions: pd.DataFrame,
    cfg: TargetsConfig,
    model_spec: str,
    root: Path | None = None,
    progress: ProgressCallback | None = None,
    model=None,
    tokenizer=None,
    show_bar: bool = True,
) -> TargetSetResult:
    """Plan the set of `model_spec`'s current revision and score the shards still missing.

    The model is loaded only when something is left to score. `progress` gets a `ScoringProgress`
    over the pending interactions after every batch, and with `extra["shards_done"]` after every shard
    written; `show_bar` draws a tqdm bar on an interactive terminal.
    """
    from tqdm.auto import tqdm

    from sdpo_platform.models import load_model, model_revision, resolve_model

    revision, model_path = model_revision(model_spec, root), resolve_model(model_spec, root)
    set_dir = plan_target_set(interactions, cfg, model_path, revision, root)
    manifest = read_manifest(set_dir)
    todo = pending_shards(set_dir)
    sizes = {s["index"]: s["rows"] for s in manifest["shards"]}
    total = sum(sizes[i] for i in todo)
    if todo and (model is None or tokenizer is None):
        model, tokenizer = load_model(model_spec, root)

    bar = tqdm(total=total, unit="interaction", desc="hindsight targets", disable=None if show_bar else True)
    started, before, tokens_before = time.monotonic(), 0, 0
    try:
        for shards_done, index in enumerate(todo, start=1):
            last: list[ScoringProgress] = []

            def report(p: ScoringProgress) -> None:
                overall = ScoringProgress(before + p.interactions_done, total, tokens_before + p.tokens_done, time.monotonic() - started)
                bar.update(overall.interactions_done - bar.n)
                bar.set_postfix(tokens_per_s=f"{overall.tokens_per_s:.0f}")
                last[:] = [overall]
                if progress is not None:
                    progress(overall)

            score_shard(set_dir, index, model, tokenizer, progress=report)
            before += sizes[index]
            tokens_before = last[-1].tokens_done if last else tokens_before
            if progress is not None:
                extra = {"shards_done": shards_done, "shards_total": len(todo), "shard": index}
                progress(ScoringProgress(before, total, tokens_before, time.monotonic() - started, extra))
    finally:
        bar.close()
    return TargetSetResult(
        path=str(set_dir),
        target_set=set_dir.name,
        model_revision=revision,
        template_hash=manifest["template_hash"],
        rows=manifest["rows"],
        shards=len(manifest["shards"]),
        shards_scored=len(todo),
        shards_reused=len(manifest["shards"]) - len(todo),
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
    """Worker entry point: score some (default: all pending) shards of a planned target set."""
    parser = argparse.ArgumentParser(prog="python -m sdpo_platform.targets", description=main.__doc__)
    parser.add_argument("set_dir")
    parser.add_argument("--shards", type=int, nargs="*", help="shard indices (default: every pending one)")
    args = parser.parse_args(argv)
    todo = [i for i in (args.shards or pending_shards(args.set_dir)) if i in pending_shards(args.set_dir)]
    model = tokenizer = None
    if todo:
        from sdpo_platform.models import load_model, model_revision

        manifest = read_manifest(args.set_dir)
        if model_revision(manifest["model_path"]) != manifest["model_revision"]:
            raise SystemExit(f"{manifest['model_path']} no longer has revision {manifest['model_revision']}")
        model, tokenizer = load_model(manifest["model_path"])
    for index in args.shards or todo:
        scored = score_shard(args.set_dir, index, model, tokenizer)
        print(f"shard {index}: {'scored' if scored else 'already done'}")


if __name__ == "__main__":
    main()
