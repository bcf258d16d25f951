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


class CleaningConfig(Section):
    min_messages: int = Field(3, description="Conversations with fewer messages are quarantined.")
    max_message_chars: int = Field(4096, description="Any message longer than this quarantines the conversation.")
    max_conversation_chars: int = Field(100_000, description="Total characters allowed per conversation.")
    languages: list[str] = Field(["en"], description="Kept languages (ISO 639-1); [] keeps all.")
    language_sample_chars: int = Field(2000, description="Language is guessed from this many leading characters of the (non-system) messages.")
    language_min_stopword_share: float = Field(
        0.05, description="Share of words that must be frequent function words of a Latin-script language to label it (else 'und')."
    )


class InteractionConfig(Section):
    max_context_messages: int = Field(5, description="x keeps at most this many trailing messages, starting with a user turn.")
    validation_fraction: float = Field(0.2, description="Share of conversations (by hash) in the validation split.")
    min_followup_chars: int = Field(2, description="Follow-ups shorter than this are flagged uninformative.")


class TargetsConfig(Section):
    template: str = Field(DEFAULT_HINDSIGHT_TEMPLATE, description="Hindsight block appended to the last user turn; {last_user} and {followup}.")
    max_prompt_tokens: int = Field(384, description="Longest prompt: oldest context turns are dropped first (same for teacher and student), then ids are left-truncated.")
    max_response_tokens: int = Field(128, description="Responses are truncated to this many tokens (EOS always last).")
    max_train: int = Field(128, description="Most train-split interactions scored (deterministic choice by id hash); raise to score everything.")
    max_validation: int = Field(32, description="Most validation-split interactions scored (the evaluation set).")
    batch_token_budget: int = Field(2048, description="Padded tokens per scoring forward pass (length-sorted buckets); raise on a GPU.")
    neutral_followup: str | None = Field(None, description="If set, also score y under the template with this follow-up (e.g. 'OK.') for the neutral_followup baseline.")


class TrainingConfig(Section):
    learning_rate: float = Field(2e-4, description="AdamW peak learning rate (LoRA; the paper's full fine-tuning uses 2e-6).")
    steps: int = Field(32, description="Optimizer steps (one batch each).")
    batch_size: int = Field(4, description="Interactions per step, sampled without replacement per epoch.")
    skip_tokens: int = Field(2, description="First response tokens ignored by the loss (paper: 2).")
    grad_clip: float = Field(1.0, description="Max global gradient norm.")
    lora_r: int = Field(8, description="LoRA rank.")
    lora_alpha: int = Field(16, description="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(0.0, description="Dropout on the LoRA branch.")
    lora_target_modules: list[str] = Field(["q_proj", "k_proj", "v_proj", "o_proj"], description="Module names wrapped with LoRA.")
    baseline: Literal["none", "sequence_mean", "neutral_followup"] = Field(
        "none",
        description="Advantage baseline: none (paper), sequence_mean (centre A per sequence), neutral_followup "
        "(teacher measured against the neutral follow-up; frozen teacher only, needs targets.neutral_followup).",
    )
    teacher: Literal["frozen", "live"] = Field("frozen", description="frozen: read targets; live: recompute with current weights.")
    seed: int = Field(0, description="Seeds LoRA init and batch sampling.")
    warmup_fraction: float = Field(0.05, description="Share of steps with linear warm-up before the cosine decay.")
    device: str = Field("cpu", description="Torch device for training ('cpu', 'cuda', 'cuda:1', ...); weights stay float32.")


class RegistryConfig(Section):
    model_name: str = Field("sdpo-default", description="MLflow registered model name.")
    experiment: str = Field("sdpo", description="MLflow experiment name.")
    serve_max_new_tokens: int = Field(64, description="Default greedy generation length of the registered pyfunc model (override per request with params).")


class PlatformConfig(Section):
    model: str = Field("default", description="'default' (embedded SmolLM2-135M), a Hugging Face id, or a local path.")
    cleaning: CleaningConfig = CleaningConfig()
    interactions: InteractionConfig = InteractionConfig()
    targets: TargetsConfig = TargetsConfig()
    training: TrainingConfig = TrainingConfig()
    registry: RegistryConfig = RegistryConfig()

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
