"""How much a triple can teach: a model signal read from log-probs (no generation) plus the follow-up kind.

Measured on SmolLM2-135M (docs/INFORMATIVENESS.md): the hindsight advantage itself is a weak relevance
signal at this size, because the hindsight block moves the response log-probs more than the
follow-up's content does. What the model *does* know is whether o is a plausible reply to (x, y):

    followup_pmi = mean_j log π(o_j | x, y, o_<j) − mean_j log π(o_j | o_<j)

(o scored as the next user turn after the conversation, minus o scored as a conversation opener). A
follow-up about the response is predictable from it; a new topic is not. The hindsight variants are
kept for measurement (`bench/eval_informativeness.py`):

- `raw_abs`:          mean_i |A_i|,  A = teacher(o) − student
- `neutral_contrast`: mean_i |teacher(o)_i − teacher("OK.")_i|
- `control_contrast`: mean_i |teacher(o)_i − mean_c teacher(c)_i| over `cfg.control_followups`
- `control_shift`:    |mean_i (teacher(o)_i − mean_c teacher(c)_i)| (a sequence-level shift, not per-token noise)
- `control_z`:        the same divided by the controls' per-token spread (+0.1)
- `sign_flip_share`:  share of tokens whose A changes sign between o and the mean control

`sdpo informativeness` runs `assess_interactions`; the interactions asset runs its two halves, `judge_rows`
a slice of a day at a time and `with_caps` over the day's verdicts (`assessments.assess_partition`).
"""

from __future__ import annotations

import hashlib
from typing import Callable, MutableMapping

import numpy as np
import pandas as pd

from sdpo_platform import scoring
from sdpo_platform.config import DEFAULT_HINDSIGHT_TEMPLATE, InformativenessConfig
from sdpo_platform.followups import classify_followups
from sdpo_platform.hindsight import Message, encode_interaction
from sdpo_platform.models import generate_response
from sdpo_platform.safety import apply_caps, flag_unsafe

HINDSIGHT_SIGNALS = ("raw_abs", "neutral_contrast", "control_contrast", "control_shift", "control_z", "sign_flip_share")
ALL_SIGNALS = ("followup_pmi",) + HINDSIGHT_SIGNALS
NEUTRAL_FOLLOWUP = "OK."

Job = tuple[list[int], list[int]]
ScoreCache = MutableMapping[str, np.ndarray]


def _context_messages(frame: pd.DataFrame) -> list[list[Message]]:
    """x for each row: `context` (chat messages) when present, else one user turn from `prompt`."""
    if "context" in frame.columns:
        return [[{"role": m["role"], "content": m["content"]} for m in messages] for messages in frame["context"]]
    if "prompt" in frame.columns:
        return [[{"role": "user", "content": str(p)}] for p in frame["prompt"]]
    raise ValueError("interactions need a `context` or a `prompt` column")


def _followup_job(tokenizer, messages: list[Message], followup: str, max_prompt_tokens: int, max_followup_tokens: int) -> Job:
    """(prompt ids, o ids) with o as the next user turn after `messages` (chat template rendered once).

    o is located as the last occurrence of its text in the rendered conversation, so any chat template
    that writes the message verbatim works; the ids after o (end-of-turn markers) are not scored.
    """
    rendered = tokenizer.apply_chat_template(messages + [{"role": "user", "content": followup}], tokenize=False)
    prefix = rendered[: rendered.rindex(followup)]
    prompt_ids = list(tokenizer(prefix, add_special_tokens=False)["input_ids"])[-max_prompt_tokens:]
    followup_ids = list(tokenizer(followup, add_special_tokens=False)["input_ids"])[:max_followup_tokens]
    return prompt_ids, followup_ids


def score_jobs(model, tokenizer, jobs: list[Job], cfg: InformativenessConfig, cache: ScoreCache | None = None, progress: Callable | None = None) -> list[np.ndarray]:
    """Log-probs of each job's response ids; identical jobs are scored once, `cache` (any mapping) reused."""
    keys = [hashlib.sha1(np.asarray(p + [-1] + r, dtype=np.int64).tobytes()).hexdigest() for p, r in jobs]
    cache = {} if cache is None else cache
    todo = {k: job for k, job in zip(keys, jobs) if k not in cache}
    if todo:
        todo_keys = list(todo)
        scores = _score_sequences(model, [todo[k] for k in todo_keys], tokenizer.pad_token_id, cfg.batch_token_budget, progress)
        for k, s in zip(todo_keys, scores):
            cache[k] = s
    return [cache[k] for k in keys]


def _score_sequences(model, jobs: list[Job], pad_id: int, token_budget: int, progress: Callable | None = None) -> list[np.ndarray]:
    """Response log-probs per job, through the targets' scoring engine (one branch per job)."""
    report = None if progress is None else (lambda p: progress(p.interactions_done, p.interactions_total))
    scored = scoring.score_jobs(model, [scoring.BranchJob((prompt,), response) for prompt, response in jobs], pad_id, token_budget, progress=report)
    return [s.logprobs[0] for s in scored]


def model_signals(
    model,
    tokenizer,
    interactions: pd.DataFrame,
    cfg: InformativenessConfig,
    template: str = DEFAULT_HINDSIGHT_TEMPLATE,
    signals: tuple[str, ...] | None = None,
    cache: ScoreCache | None = None,
    progress: Callable | None = None,
) -> pd.DataFrame:
    """`interaction_id` plus one float column per requested signal (default: `cfg.signal` only)."""
    signals = tuple(signals or (cfg.signal,))
    unknown = set(signals) - set(ALL_SIGNALS)
    if unknown:
        raise ValueError(f"unknown signals {sorted(unknown)}")
    contexts = _context_messages(interactions)
    responses = [str(r) for r in interactions["response"]]
    followups = [str(o) for o in interactions["followup"]]
    n = len(followups)
    out = pd.DataFrame({"interaction_id": list(interactions["interaction_id"])})
    if n == 0:
        for name in signals:
            out[name] = pd.Series(dtype="float64")
        return out

    if "followup_pmi" in signals:
        jobs = [
            _followup_job(tokenizer, x + [{"role": "assistant", "content": y}], o, cfg.max_prompt_tokens, cfg.max_followup_tokens)
            for x, y, o in zip(contexts, responses, followups)
        ] + [_followup_job(tokenizer, [], o, cfg.max_prompt_tokens, cfg.max_followup_tokens) for o in followups]
        scores = score_jobs(model, tokenizer, jobs, cfg, cache, progress)
        out["followup_pmi"] = [float(a.mean() - b.mean()) if len(a) else 0.0 for a, b in zip(scores[:n], scores[n:])]

    wanted = [s for s in signals if s in HINDSIGHT_SIGNALS]
    if wanted:
        controls = list(cfg.control_followups) if {"control_contrast", "control_shift", "control_z", "sign_flip_share"} & set(wanted) else []
        if "neutral_contrast" in wanted and NEUTRAL_FOLLOWUP not in controls:
            controls.append(NEUTRAL_FOLLOWUP)
        real = [  # the control prompts are cut with the real ones: every branch sees the same conversation
            encode_interaction(tokenizer, x, y, o, template, cfg.max_prompt_tokens, cfg.max_response_tokens, controls)
            for x, y, o in zip(contexts, responses, followups)
        ]
        jobs = [(e.student_prompt_ids, e.response_ids) for e in real] + [(e.teacher_prompt_ids, e.response_ids) for e in real]
        for k in range(len(controls)):
            jobs += [(e.other_teacher_prompt_ids[k], e.response_ids) for e in real]
        scores = score_jobs(model, tokenizer, jobs, cfg, cache, progress)
        student, teacher = scores[:n], scores[n : 2 * n]
        control_scores = {c: scores[(2 + k) * n : (3 + k) * n] for k, c in enumerate(controls)}
        values: dict[str, list[float]] = {name: [] for name in wanted}
        for i in range(n):
            advantage = teacher[i] - student[i]
            if "raw_abs" in wanted:
                values["raw_abs"].append(float(np.abs(advantage).mean()))
            if "neutral_contrast" in wanted:
                values["neutral_contrast"].append(float(np.abs(teacher[i] - control_scores[NEUTRAL_FOLLOWUP][i]).mean()))
            stack = np.stack([control_scores[c][i] for c in cfg.control_followups]) if cfg.control_followups and controls else None
            if stack is not None:
                mean_control = stack.mean(axis=0)
                if "control_contrast" in wanted:
                    values["control_contrast"].append(float(np.abs(teacher[i] - mean_control).mean()))
                if "control_shift" in wanted:
                    values["control_shift"].append(float(abs((teacher[i] - mean_control).mean())))
                if "control_z" in wanted:
                    values["control_z"].append(float((np.abs(teacher[i] - mean_control) / (stack.std(axis=0) + 0.1)).mean()))
                if "sign_flip_share" in wanted:
                    values["sign_flip_share"].append(float((np.sign(advantage) != np.sign(mean_control - student[i])).mean()))
        for name in wanted:
            out[name] = values[name]
    return out


def calibrate(signal: pd.Series | np.ndarray, cfg: InformativenessConfig) -> np.ndarray:
    """Logistic map of the raw signal to [0, 1] (`signal_center` -> 0.5)."""
    z = (np.asarray(signal, dtype=np.float64) - cfg.signal_center) / max(cfg.signal_scale, 1e-9)
    return 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))


def combine(kinds: pd.Series, calibrated_signal: np.ndarray | None, cfg: InformativenessConfig) -> np.ndarray:
    """informativeness in [0, 1]: prior(kind)^(1 - w) · signal^w, a weighted geometric mean (w = model_weight).

    Geometric, not arithmetic, so both must agree: "Thanks!" is very predictable after any answer
    (high signal) but can teach little (prior 0.1), and a follow-up the rules call unrelated needs a
    very strong signal to be kept. Measured: AUC 0.992 either way, but the arithmetic mean keeps 67% of
    acknowledgements and the geometric one 11% (docs/INFORMATIVENESS.md).
    """
    prior = kinds.map(cfg.kind_priors).fillna(cfg.kind_priors.get("other", 0.4)).to_numpy(dtype=np.float64)
    prior = np.clip(prior, 0.0, 1.0)
    if calibrated_signal is None:
        return prior
    weight = cfg.model_weight
    return np.clip(np.power(prior, 1.0 - weight) * np.power(np.clip(calibrated_signal, 0.0, 1.0), weight), 0.0, 1.0)


def assess_interactions(interactions: pd.DataFrame, cfg: InformativenessConfig, *judging, **options) -> pd.DataFrame:
    """Per interaction: kind, features, safety flag, model signal, informativeness, keep, and why not kept
    (`judge_rows`, which takes the same arguments, then the caps over all the rows: `with_caps`).

    Input columns: `interaction_id`, `context` (or `prompt`), `response`, `followup`, optionally
    `conversation_id` and `user_id` for the caps. Output (same order): `interaction_id, conversation_id,
    user_id, followup_kind,
    followup_features, topic_overlap, safety_flag, safety_reasons, model_signal, informativeness,
    keep, exclusion_reason` (`exclusion_reason` ∈ {None, 'too_short', 'unsafe', 'below_threshold', 'user_cap',
    'conversation_cap'}). Without a model (or `cfg.use_model=False`) the score is the kind prior alone.
    A follow-up shorter than `min_followup_chars` once trimmed (`interactions.min_followup_chars`) is never kept.
    """
    return with_caps(judge_rows(interactions, cfg, *judging, **options), cfg)


ASSESSED_COLUMNS = ["interaction_id", "conversation_id", "user_id", "followup_kind", "followup_features", "topic_overlap",
                    "safety_flag", "safety_reasons", "model_signal", "informativeness", "keep", "exclusion_reason"]


def judge_rows(
    interactions: pd.DataFrame,
    cfg: InformativenessConfig,
    model=None,
    tokenizer=None,
    template: str = DEFAULT_HINDSIGHT_TEMPLATE,
    cache: ScoreCache | None = None,
    progress: Callable | None = None,
    min_followup_chars: int = 0,
) -> pd.DataFrame:
    """What `assess_interactions` decides about each row on its own, before the caps (which weigh rows of one
    conversation or user against each other): so a large day can be judged a slice at a time."""
    kinds = classify_followups(interactions, cfg.min_topic_overlap)
    safety = flag_unsafe(interactions)
    result = kinds.merge(safety, on="interaction_id", how="left")
    if cfg.use_model and model is not None:
        signal = model_signals(model, tokenizer, interactions, cfg, template, (cfg.signal,), cache, progress)[cfg.signal].to_numpy()
        result["model_signal"] = signal
        calibrated = calibrate(signal, cfg)
    else:
        result["model_signal"] = np.nan
        calibrated = None
    result["informativeness"] = combine(result["followup_kind"], calibrated, cfg)
    # object dtype even when empty: a day without triples must pass (pandas types an empty list as float64)
    keys = pd.DataFrame({"interaction_id": pd.Series(list(interactions["interaction_id"]), dtype=object)})
    for column in ("conversation_id", "user_id"):
        keys[column] = list(interactions[column]) if column in interactions.columns else None
    result = result.merge(keys, on="interaction_id", how="left")
    result["exclusion_reason"] = None
    result.loc[result["informativeness"] < cfg.keep_threshold, "exclusion_reason"] = "below_threshold"
    too_short = interactions["followup"].astype("string").fillna("").str.strip().str.len().to_numpy() < min_followup_chars
    result.loc[too_short, "exclusion_reason"] = "too_short"
    if cfg.exclude_unsafe:
        result.loc[result["safety_flag"], "exclusion_reason"] = "unsafe"
    return result


def with_caps(judged: pd.DataFrame, cfg: InformativenessConfig) -> pd.DataFrame:
    """`judge_rows`' verdicts of a whole day (or file) with the per-conversation and per-user caps, and `keep`."""
    result = apply_caps(judged, cfg)
    result["keep"] = result["exclusion_reason"].isna()
    return result[ASSESSED_COLUMNS]


def generate_missing_responses(model, tokenizer, contexts: list[list[Message]], responses: list, max_new_tokens: int) -> list[str]:
    """Greedy responses for rows whose response is missing or empty (others are returned unchanged)."""
    return [
        response if isinstance(response, str) and response.strip() else generate_response(model, tokenizer, messages, max_new_tokens)[0]
        for messages, response in zip(contexts, responses)
    ]


def run_jsonl(input_path: str, out_path: str, model_spec: str | None = None, config=None) -> int:
    """`sdpo informativeness`: assess JSONL rows with the same code as the interactions asset.

    Rows are those of `sdpo advantages` (`messages` or `prompt`, optional `response`, generated greedily
    when missing, and `followup`; checked the same way, a bad one is a ValueError naming file:line), with
    optional `id`, `conversation_id`, `user_id`. Each row is written back with `response`, `followup_kind`, `followup_features`, `informativeness`, `keep`,
    `safety_flag`, `safety_reasons` and `exclusion_reason`. Returns the number of rows written.
    """

    from sdpo_platform.advantages import context_and_response, prepare_output, read_rows
    from sdpo_platform.assessments import hindsight_template
    from sdpo_platform.config import PlatformConfig
    from sdpo_platform.models import load_model
    from sdpo_platform.paths import write_jsonl_atomic

    config = config or PlatformConfig.load()
    cfg = config.informativeness
    located = read_rows(input_path)  # the rows `sdpo advantages` takes, checked the same way before any model loads
    if not located:
        raise ValueError(f"{input_path}: no rows")
    parsed = [context_and_response(row, where) for where, row in located]
    rows = [row for _, row in located]
    frame = pd.DataFrame(
        {
            "interaction_id": [str(r.get("id", i)) for i, r in enumerate(rows)],
            "context": [context for context, _ in parsed],
            "response": [response for _, response in parsed],
            "followup": [r["followup"] for r in rows],
            "conversation_id": [r.get("conversation_id") for r in rows],
            "user_id": [r.get("user_id") for r in rows],
        }
    )
    if frame["interaction_id"].duplicated().any():
        raise ValueError("row ids must be unique")
    prepare_output(out_path, "--out")
    model = tokenizer = None
    needs_generation = not all(isinstance(r, str) and r.strip() for r in frame["response"])
    if cfg.use_model or needs_generation:
        model, tokenizer = load_model(config.model if model_spec is None else model_spec)
    if needs_generation:
        frame["response"] = generate_missing_responses(model, tokenizer, list(frame["context"]), list(frame["response"]), cfg.max_response_tokens)
    assessed = assess_interactions(frame, cfg, model, tokenizer, hindsight_template(config),
                                   min_followup_chars=config.interactions.min_followup_chars)
    labelled = []
    for row, response, result in zip(rows, frame["response"], assessed.to_dict("records")):
        row = dict(row, response=response)
        row.update(
            followup_kind=result["followup_kind"],
            followup_features=list(result["followup_features"]),
            informativeness=float(result["informativeness"]),
            model_signal=None if pd.isna(result["model_signal"]) else float(result["model_signal"]),
            keep=bool(result["keep"]),
            safety_flag=bool(result["safety_flag"]),
            safety_reasons=list(result["safety_reasons"]),
            exclusion_reason=result["exclusion_reason"],
        )
        labelled.append(row)
    write_jsonl_atomic(out_path, labelled)
    return len(rows)
