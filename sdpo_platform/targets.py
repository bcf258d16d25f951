"""Hindsight targets: per-token teacher and student log-probs of each logged response, and their gap.

A_i = log π(y_i | x, o, y_<i) − log π(y_i | x, y_<i), scored once with the round's model (the `frozen`
teacher: the champion, or the base model before there is one or with `registry.next_round_from: base`).
A target set is one folder per (model revision, template, scoring settings and float precision) under the
data root's `targets/`: anything that changes the numbers gives a new set beside the old ones, so a set id
names fixed numbers; new interactions (a new day) grow a set in place.

Inside a set, work is never lost: `inputs.parquet` and `manifest.json` fix the plan (which interactions,
in which shard, with which settings), and each shard is written atomically (temp file + rename) once
scored. Shard boundaries follow content, so a grown plan keeps the shards it did not touch. A killed run
resumes with the shards still missing; a rerun of a complete set does nothing; and any process holding
the model scores pending shards, claiming each first, so that workers split a set (`target_workers`).

The plan is two files, hence two renames, so the manifest carries the sha256 of the inputs file: a
planner rewrites whichever file differs from its plan (a plan killed between the renames is repaired by
the next), and a worker scores only inputs whose digest its manifest names (`read_plan`).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from sdpo_platform.config import TargetsConfig
from sdpo_platform.hindsight import PROMPT_ENCODING_VERSION, EncodedInteraction, encode_interaction, template_hash
from sdpo_platform.paths import atomic_write, targets_dir
from sdpo_platform.progress import ProgressCallback
from sdpo_platform.scoring import SCORING_VERSION, BranchJob, score_jobs

INPUT_COLUMNS = ("interaction_id", "context", "response", "followup", "split")
TARGET_COLUMNS = (
    "interaction_id", "split", "model_revision", "template_hash",
    "student_prompt_ids", "teacher_prompt_ids", "response_ids", "truncated",
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
SNAPSHOTS_DIR = "snapshots"
MAX_SHARD_FACTOR = 4  # no shard passes this many times `shard_size` rows


def encode_interactions(tokenizer, interactions: pd.DataFrame, cfg: TargetsConfig) -> tuple[list[EncodedInteraction], list[BranchJob]]:
    """Encoded (x, y, o) rows and their scoring jobs: branches student, teacher[, neutral teacher]. An optional
    `response_complete` column marks responses that were cut before their end (a generation at its token
    limit): they get no EOS (`encode_interaction`'s `complete`)."""
    missing = [c for c in INPUT_COLUMNS if c not in interactions.columns]
    if missing:
        raise ValueError(f"interactions lack columns {missing}")

    others = () if cfg.neutral_followup is None else (cfg.neutral_followup,)  # cut alike: the same conversation
    complete = interactions["response_complete"] if "response_complete" in interactions else [True] * len(interactions)
    encoded = [
        encode_interaction(tokenizer, _messages(context), response, followup, cfg.template, cfg.max_prompt_tokens, cfg.max_response_tokens,
                           others, complete=bool(whole))
        for context, response, followup, whole in zip(interactions["context"], interactions["response"], interactions["followup"], complete)
    ]
    jobs = [BranchJob((e.student_prompt_ids, e.teacher_prompt_ids, *e.other_teacher_prompt_ids), e.response_ids) for e in encoded]
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

    Advantage statistics cover every response token (EOS included, which `truncated` rows lack); the
    trainer applies its own `skip_tokens`. `neutral_logprobs` is the teacher's score of y with `cfg.neutral_followup` in
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
            "truncated": [e.truncated for e in encoded],
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


def scoring_settings(cfg: TargetsConfig, dtype: str) -> dict:
    """Everything that changes the numbers: the settings, the prompt encoding, the scoring engine, the float precision."""
    settings = {name: getattr(cfg, name) for name in SCORING_FIELDS} | {
        "prompt_encoding": PROMPT_ENCODING_VERSION, "scoring": SCORING_VERSION, "dtype": dtype}
    if cfg.neutral_followup is not None:
        settings["neutral_shares_context"] = True  # the neutral prompt is cut with the others (was cut alone)
    return settings


def scoring_key(cfg: TargetsConfig, dtype: str) -> str:
    """Digest of `scoring_settings`: part of the set's folder name."""
    return hashlib.sha256(json.dumps(scoring_settings(cfg, dtype), sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()[:8]


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
    settings = scoring_settings(cfg, dtype)
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
        "prompt_encoding": PROMPT_ENCODING_VERSION,  # a worker running other code must not add shards (check_scorable)
        "scoring_version": SCORING_VERSION,
        "dtype": dtype,
        "model_path": model_path,
        "targets_config": cfg.model_dump(),
        "rows": len(inputs),
        "inputs_sha256": inputs_sha256,
        "shards": shards,
    }
    inputs_path, manifest_path = folder / INPUTS_FILE, folder / MANIFEST_FILE
    if not inputs_path.exists() or hashlib.sha256(inputs_path.read_bytes()).hexdigest() != inputs_sha256:
        atomic_write(inputs_path, lambda tmp: Path(tmp).write_bytes(inputs_bytes))
    if not manifest_path.exists() or json.loads(manifest_path.read_text()) != manifest:
        atomic_write(manifest_path, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=2, ensure_ascii=False)))
    return folder


def check_scorable(manifest: dict) -> None:
    """Refuse to score a set whose plan this code would key differently: its shards would mix encodings
    (another `PROMPT_ENCODING_VERSION` or `SCORING_VERSION` on one machine of a scale-out) under one set id."""
    if "scoring_key" not in manifest or "dtype" not in manifest:
        return
    ours = scoring_key(TargetsConfig.model_validate(manifest["targets_config"]), manifest["dtype"])
    if ours != manifest["scoring_key"]:
        raise ValueError(
            f"this code scores the set's settings under key {ours}, the set was planned under {manifest['scoring_key']} "
            f"(prompt encoding {PROMPT_ENCODING_VERSION} and scoring {SCORING_VERSION} here, "
            f"{manifest.get('prompt_encoding', 'before 3')} and {manifest.get('scoring_version', 1)} in the plan): "
            "score it with the sdpo-platform version that planned it, or re-plan"
        )


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
    """Indices of the planned shards not on disk whole yet (`shard_done`)."""
    set_dir = Path(set_dir)
    return [s["index"] for s in read_manifest(set_dir)["shards"] if not shard_done(set_dir, s)]


def shard_done(set_dir: str | Path, shard: dict) -> bool:
    """Whether a planned shard (a manifest entry) is on disk whole: its file's Parquet footer counts the rows
    planned. A file that a crash left empty despite `atomic_write`, or a damaged copy, is not done, and
    scoring the shard again replaces it. Only the footer is read: cheap enough to ask whenever pending
    work is counted."""
    import pyarrow.parquet as pq

    try:
        return pq.read_metadata(Path(set_dir) / shard["file"]).num_rows == shard["rows"]
    except (OSError, ValueError):  # no file; pyarrow's ArrowInvalid (a ValueError) for an empty or cut one
        return False


def snapshot_plan(set_dir: str | Path, label: str, manifest: dict | None = None, complete: bool = True) -> Path:
    """Pin a plan of the set (`manifest`, by default the current one): `snapshots/<label>.json` lists its
    shards, so whoever reads the snapshot (training, evaluation, checks of one run) reads exactly these
    rows even if another run grows the set meanwhile. `sdpo targets prune` keeps a snapshot's shards
    while it keeps the snapshot; `complete=False` marks a run's pin before its shards are all scored
    (a run killed then leaves one, which never counts as the set's newest)."""
    set_dir = Path(set_dir)
    manifest = manifest or read_plan(set_dir)[0]
    path = set_dir / SNAPSHOTS_DIR / f"{label}.json"
    path.parent.mkdir(exist_ok=True)
    pinned = json.dumps(manifest | {"complete": complete}, indent=2, ensure_ascii=False)
    atomic_write(path, lambda tmp: Path(tmp).write_text(pinned))
    return path


def read_targets(path: str | Path, columns: list[str] | None = None) -> pd.DataFrame:
    """A target set (its folder, a snapshot of it, or a single Parquet file) with list columns as Python lists;
    only `columns` when given (the ids of a large set, without its log-probs).

    A folder is read through its manifest, a snapshot through the manifest it pinned, shards in plan
    order; an incomplete set is an error, never a silently smaller one.
    """
    path = Path(path)
    if path.is_dir() and (path / MANIFEST_FILE).exists():
        df = _read_shards(path, read_manifest(path), str(path), columns)
    elif path.suffix == ".json" and path.parent.name == SNAPSHOTS_DIR:
        df = _read_shards(path.parent.parent, json.loads(path.read_text()), f"snapshot {path}", columns)
    else:
        df = _read_frame(path / LEGACY_TARGETS_FILE if path.is_dir() else path, columns)
    for column in LIST_COLUMNS:
        if column in df.columns:
            df[column] = df[column].map(_as_lists)
    return df


def _read_frame(path: Path, columns: list[str] | None = None) -> pd.DataFrame:
    """One shard or file; files encoded before version 3 have no `truncated` (every response ended with EOS)."""
    df = pd.read_parquet(path, columns=columns)
    if "truncated" not in df.columns and columns is None:
        df["truncated"] = False
    return df


def _read_shards(set_dir: Path, manifest: dict, what: str, columns: list[str] | None = None) -> pd.DataFrame:
    missing = [s["file"] for s in manifest["shards"] if not shard_done(set_dir, s)]
    if missing:
        raise FileNotFoundError(f"target set {what} is incomplete: {len(missing)} shard(s) not on disk whole "
                                "(not scored yet, pruned, or damaged: scoring the set again replaces a damaged one)")
    frames = [_read_frame(set_dir / s["file"], columns) for s in manifest["shards"]]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns or list(TARGET_COLUMNS))


def _shard(manifest: dict, index: int) -> dict:
    for shard in manifest["shards"]:
        if shard["index"] == index:
            return shard
    raise IndexError(f"the plan has no shard {index}: its shards are 0..{len(manifest['shards']) - 1}")


def _as_lists(value):
    if isinstance(value, np.ndarray):
        return [_as_lists(v) for v in value] if value.dtype == object else value.tolist()
    return value


def _messages(context) -> list[dict]:
    """Context messages as plain dicts (DuckDB hands back numpy arrays of structs)."""
    return [{"role": m["role"], "content": m["content"]} for m in context]
