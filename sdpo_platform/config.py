"""Typed configuration. Defaults run the embedded demo on a 2-core CPU; scale up by config, not code.

Every field here is documented in the README's "Configuration" table. A config can be loaded from a
JSON file (`SDPO_CONFIG=path.json`) whose keys mirror these sections.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

DEFAULT_HINDSIGHT_TEMPLATE = (
    "{last_user}\n\n<hindsight context> The following is a future user message. "
    "Use this to guide your answer to the user prompt: {followup}"
)


class Section(BaseModel):
    model_config = {"extra": "forbid"}


class IngestConfig(Section):
    max_record_bytes: int = Field(
        32 * 1024 * 1024, description="A record (line) longer than this keeps only its first 4 KiB and is quarantined as record_too_large."
    )
    batch_records: int = Field(10_000, description="Records buffered per insert while streaming a file (bounds ingest memory).")
    sensor_bytes_per_tick: int = Field(
        1_000_000_000,
        description="New or changed inbox bytes the inbox sensor reads per tick to find their days (at least one file); "
        "the rest waits for the next ticks, so a large drop never runs into Dagster's 60 s sensor timeout.",
    )


class CleaningConfig(Section):
    min_messages: int = Field(3, description="Conversations with fewer messages are quarantined.")
    max_message_chars: int = Field(4096, description="Any message longer than this quarantines the conversation.")
    max_conversation_chars: int = Field(100_000, description="Total characters allowed per conversation.")
    languages: list[str] = Field(["en"], description="Kept languages (ISO 639-1); [] keeps all.")
    language_sample_chars: int = Field(2000, description="Language is guessed from this many leading characters of the (non-system) messages.")
    language_min_stopword_share: float = Field(
        0.05, description="Share of words that must be frequent function words of a Latin-script language to label it (else 'und')."
    )
    user_id_salt: str = Field(
        "sdpo-platform", description="Salt of the sha256 that replaces user ids (WildChat hashed_ip, OpenAI user); set a secret per deployment."
    )
    near_duplicate_chars: int = Field(
        300, description="Near-duplicate key: the first this-many characters of the first user turn and of the first reply, letters only, lower-cased."
    )
    join_sharegpt_chunks: bool = Field(
        True, description="ShareGPT records of one file and day with ids X_0, X_1, ... are chunks of one conversation, joined "
        "in order (the ShareGPT dumps split long conversations so). Set false where such ids are separate conversations "
        "(e.g. FastChat's identity_0, identity_1, ...).",
    )
    batch_records: int = Field(
        50_000, description="Raw records cleaned per transaction (whole partitions at a time): bounds memory on large backfills."
    )


class InteractionConfig(Section):
    max_context_messages: int = Field(
        5,
        description="x keeps at most this many trailing messages, starting with a user turn. Raise it (and "
        "`targets.max_prompt_tokens`) for whole conversations as x: scoring then runs each earlier turn once inside "
        "the later ones (3.56x less CPU than naive scoring, against 1.49x at the defaults: docs/BENCHMARKS.md).",
    )
    validation_fraction: float = Field(0.2, description="Share of conversations in the validation split, by a hash of their near-duplicate key (near-duplicates share a side).")
    min_followup_chars: int = Field(2, description="Follow-ups shorter than this (characters, trimmed) are never trained on: flagged uninformative and judged `too_short`.")
    batch_conversations: int = Field(
        100_000, description="Conversations turned into triples per transaction (whole partitions at a time): bounds memory."
    )


class TargetsConfig(Section):
    template: str = Field(DEFAULT_HINDSIGHT_TEMPLATE, description="Hindsight block appended to the last user turn; {last_user} and {followup}.")
    max_prompt_tokens: int = Field(384, description="Longest prompt: oldest context turns are dropped first (same for teacher and student), then ids are left-truncated.")
    max_response_tokens: int = Field(128, description="Longest scored response, EOS included. A response that does not fit with its EOS is cut to this many tokens and scored without EOS (`truncated`): no stop is learned where the answer did not stop.")
    max_train: int = Field(128, description="Most train-split interactions scored (deterministic choice by a hash of their content); raise to score everything.")
    max_validation: int = Field(32, description="Most validation-split interactions scored (the evaluation set).")
    batch_token_budget: int | None = Field(
        None,
        description="Padded tokens per scoring forward pass (one level of the prefix tree, length-sorted, counting the cached prefix "
        "its rows attend to); the prompt KV cache a group holds is at most twice this. null = auto: each chain of the tree alone on CPU "
        "(batching does not pay there, padding does cost), 65536 on a GPU (lower it if the GPU runs out of memory).",
    )
    neutral_followup: str | None = Field(None, description="If set, also score y under the template with this follow-up (e.g. 'OK.') for the neutral_followup baseline.")
    top_k: int = Field(20, description="Also store the teacher's k most likely tokens per response position (ids, log-probs, tail mass) for the top-k loss (training.loss topk_kl); 0 turns it off.")
    shard_size: int = Field(64, description="Interactions per Parquet shard of a target set: the unit of resuming and of scoring by independent workers.")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Precision targets are scored in (part of the set's key). auto = bfloat16 on a GPU (fast), float32 on CPU. Training "
        "and evaluation run in float32, so a bf16 set adds rounding noise to every advantage: 0.022 nats/token on the default model, "
        "a tenth of its mean |A| (docs/BENCHMARKS.md); float32 removes it (its GPU cost is not measured yet).",
    )

    def pinned_dtype(self) -> str | None:
        """`dtype` when it names one ('float32', 'bfloat16'); None for 'auto' (the device decides)."""
        return None if self.dtype == "auto" else self.dtype


class TrainingConfig(Section):
    learning_rate: float = Field(2e-4, gt=0, description="AdamW peak learning rate (LoRA; the paper's full fine-tuning uses 2e-6).")
    steps: int = Field(32, ge=1, description="Optimizer steps (one batch each).")
    batch_size: int = Field(4, ge=1, description="Interactions per step, sampled without replacement per epoch.")
    skip_tokens: int = Field(2, ge=0, description="First response tokens ignored by the loss (paper: 2).")
    grad_clip: float = Field(1.0, gt=0, description="Max global gradient norm.")
    lora_r: int = Field(8, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(16, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA branch.")
    lora_target_modules: list[str] = Field(["q_proj", "k_proj", "v_proj", "o_proj"], description="Module names wrapped with LoRA.")
    baseline: Literal["none", "sequence_mean", "neutral_followup"] = Field(
        "none",
        description="Advantage baseline: none (paper), sequence_mean (centre A per sequence), neutral_followup "
        "(teacher measured against the neutral follow-up; frozen teacher only, needs targets.neutral_followup).",
    )
    weighting: Literal["none", "informativeness"] = Field(
        "none", description="none: every kept triple counts the same (paper); informativeness: weighted mean of the per-triple losses by their informativeness score."
    )
    teacher: Literal["frozen", "live"] = Field("frozen", description="frozen: read targets; live: recompute with current weights.")
    loss: Literal["sdpo", "topk_kl"] = Field(
        "sdpo",
        description="sdpo: the paper's advantage-weighted log-likelihood; topk_kl: forward KL from the stored teacher's top-k tokens "
        "plus a tail bucket (frozen teacher, targets.top_k > 0, baseline none).",
    )
    kl_coef: float = Field(
        0.0, ge=0,
        description="Weight β of a KL(π_θ ‖ π_ref) penalty to the round's base model (the LoRA adapter disabled), exact over the "
        "vocabulary at the response positions, added to the sdpo loss; 0 = off (paper). One more forward per step without grad.",
    )
    save_every: int = Field(
        10, ge=0,
        description="Write a resume point (LoRA weights, optimizer, RNG, step) every N steps: the same run started again in "
        "the same output folder goes on from there, in the same MLflow run, to the adapter an uninterrupted run ends with (bit for bit on "
        "a CPU; on a GPU up to its non-deterministic kernels); 0 = never.",
    )
    seed: int = Field(0, description="Seeds LoRA init and batch sampling.")
    warmup_fraction: float = Field(0.05, ge=0, le=1, description="Share of steps with linear warm-up before the cosine decay.")
    device: str = Field("cpu", description="Torch device for training and the evaluation's forwards ('cpu', 'cuda', 'cuda:1', ...); weights stay float32.")
    autocast_bf16: bool = Field(
        False,
        description="Run the training forwards' matrix products in bfloat16 (torch.autocast): what GPU tensor cores are fast at. "
        "Weights, optimizer state, gradients and the loss's log-softmax stay float32; the step's log-probs then carry bf16 "
        "rounding, like a bf16 target set's (docs/BENCHMARKS.md). Off = exact float32. Evaluation stays float32. Its speed-up is "
        "not measured yet (no GPU so far).",
    )


class RegistryConfig(Section):
    model_name: str = Field("sdpo-default", description="MLflow registered model name.")
    experiment: str = Field("sdpo", description="MLflow experiment name.")
    serve_max_new_tokens: int = Field(64, description="Default greedy generation length of the registered pyfunc model (override per request with params).")
    next_round_from: Literal["champion", "base"] = Field(
        "champion",
        description="Model that scores a round's hindsight targets and carries its new LoRA: the current champion (merged; each "
        "round builds on the last) or always the configured base `model`. Without a champion the base is used.",
    )


class InformativenessConfig(Section):
    """Which triples teach what (issue 4): follow-up taxonomy, model signal, safety, caps, keep policy."""

    use_model: bool = Field(True, description="Score the model-based signal (no generation); False keeps the cheap follow-up-kind prior only.")
    signal: Literal["followup_pmi", "control_contrast", "neutral_contrast", "raw_abs"] = Field(
        "followup_pmi",
        description="Model signal: followup_pmi (mean log-prob of o after x,y minus after nothing; best measured), "
        "control_contrast (mean abs(teacher(o) - mean teacher(controls)) per token), neutral_contrast (vs 'OK.'), raw_abs (mean abs(A)).",
    )
    control_followups: list[str] = Field(
        ["OK.", "Thanks!", "What's the weather like today?"], description="Control follow-ups scored under the same template for control_contrast."
    )
    max_prompt_tokens: int = Field(256, description="Prompt tokens kept when scoring the signal (oldest turns dropped first).")
    max_response_tokens: int = Field(64, description="Response tokens scored by the hindsight signals (a prefix is enough to rank); `followup_pmi` (the default) reads the response as context, cut with the prompt by `max_prompt_tokens`. Also the length `sdpo informativeness` generates for rows without a response.")
    max_followup_tokens: int = Field(48, description="Follow-up tokens scored by followup_pmi.")
    batch_token_budget: int = Field(2048, description="Padded tokens per scoring forward pass.")
    signal_center: float = Field(0.2, description="Signal value mapped to 0.5 by the logistic calibration (followup_pmi, nats/token; measured midway between relevant and unrelated medians).")
    signal_scale: float = Field(0.4, description="Logistic calibration width: signal_center ± scale maps to 0.27/0.73.")
    model_weight: float = Field(0.6, description="informativeness = prior(kind)^(1 - w) * calibrated signal^w, w = model_weight (both must agree).")
    kind_priors: dict[str, float] = Field(
        {
            "correction": 1.0, "refinement": 0.9, "negative_reaction": 0.7, "positive_reinforcement": 0.5,
            "continuation": 0.5, "other": 0.4, "acknowledgement": 0.1, "unrelated": 0.05,
        },
        description="Prior informativeness of each follow-up kind (what it can teach about y).",
    )  # fmt: skip
    keep_threshold: float = Field(0.5, description="Triples with informativeness below this are not kept for training.")
    min_topic_overlap: float = Field(0.3, description="Share of the follow-up's content words found in x's last turn or y above which it is on topic.")
    exclude_unsafe: bool = Field(True, description="Drop follow-ups flagged by the safety guardrail from the kept set.")
    max_user_share: float = Field(0.1, description="Most kept triples per user as a share of the candidates (users = conversations when user_id is absent).")
    max_conversation_share: float = Field(0.05, description="Most kept triples per conversation as a share of the candidates.")
    min_group_cap: int = Field(3, description="Caps never go below this many triples per user / conversation (small sets).")
    min_kept_fraction: float = Field(0.05, description="Blocking check: kept share of a partition must be at least this.")
    max_kept_fraction: float = Field(0.95, description="Blocking check: kept share of a partition must be at most this.")
    kept_fraction_min_triples: int = Field(
        20, description="Partitions with fewer triples skip the kept-fraction bounds: that a handful were all kept (or none) says nothing."
    )
    principles_preamble: bool = Field(False, description="Insert PRINCIPLES before the follow-up in every hindsight prompt: the targets, the informativeness signal, `sdpo advantages` and `sdpo informativeness` (a new template hash, so a new target set). Do not also set `targets.template` to a principled one, or PRINCIPLES appears twice.")


class PlatformConfig(Section):
    model: str = Field("default", description="'default' (embedded SmolLM2-135M), a Hugging Face id, or a local path.")
    ingest: IngestConfig = IngestConfig()
    cleaning: CleaningConfig = CleaningConfig()
    interactions: InteractionConfig = InteractionConfig()
    targets: TargetsConfig = TargetsConfig()
    training: TrainingConfig = TrainingConfig()
    registry: RegistryConfig = RegistryConfig()
    informativeness: InformativenessConfig = InformativenessConfig()

    @classmethod
    def load(cls, path: str | Path | None = None) -> "PlatformConfig":
        """From `path`, else `$SDPO_CONFIG`, else defaults."""
        path = path or os.environ.get("SDPO_CONFIG")
        if not path:
            return cls()
        return cls.model_validate(json.loads(Path(path).read_text()))


def config_reference() -> str:
    """Every knob as a markdown table (`sdpo config`); the README embeds this output."""
    rows = ["| key | default | what it does |", "|---|---|---|"]
    rows.append(f"| `model` | `{PlatformConfig().model}` | {PlatformConfig.model_fields['model'].description} |")
    for section_name, section_field in PlatformConfig.model_fields.items():
        if section_name == "model":
            continue
        section = section_field.annotation
        for name, field in section.model_fields.items():
            default = json.dumps(field.default) if not isinstance(field.default, str) else field.default
            default = default.replace("\n", "\\n").replace("|", "\\|")
            rows.append(f"| `{section_name}.{name}` | `{default}` | {field.description or ''} |")
    return "\n".join(rows)
