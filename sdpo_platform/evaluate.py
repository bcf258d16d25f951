"""Held-out evaluation: did training move the student towards its hindsight teacher?

The measure is the hindsight gap, mean |A| with A_i = teacher_logprob_i − student_logprob_i, on the
validation split. Why the absolute value: SDPO distills the teacher into the student, so success is
the per-token distance between them shrinking. The signed mean is not a distance: positive and
negative tokens cancel (a student can overshoot on some tokens and undershoot on others and still
average 0), and on the model's own samples it sits near −KL(student ‖ teacher) whatever the follow-up
said. It is reported beside the gap as a diagnostic, never as the criterion.

The teacher is the stored `teacher_logprobs` (fixed), so before and after are measured against the
same target and differ only by the student.

"Before" is the round's base: the champion when rounds build on it (`registry.next_round_from:
champion`), then beating it is beating the champion. When every round starts from the plain base model
(`next_round_from: base`), beating the base says nothing about the champion, which an earlier round
trained; that champion is then measured on the same rows too (`gap_champion`), and the checkpoint
improves only if it beats both.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from sdpo_platform.logprobs import response_logprobs
from sdpo_platform.train import read_split


@dataclass
class GapResult:
    mean_abs_advantage: float
    mean_advantage: float
    n_interactions: int
    n_tokens: int


@dataclass
class EvaluationResult:
    gap_before: float
    gap_after: float
    signed_before: float
    signed_after: float
    n_validation: int
    improved: bool
    gap_champion: float | None = None  # the current champion on the same rows, when it is not the round's base


def hindsight_gap(model, targets_df: pd.DataFrame, skip: int = 0) -> GapResult:
    """Mean |A| and mean A of `model` as the student, per interaction over tokens i ≥ skip, then over interactions."""
    abs_means, signed_means, n_tokens = [], [], 0
    model.eval()
    with torch.inference_mode():
        for prompt, response, teacher in zip(targets_df.student_prompt_ids, targets_df.response_ids, targets_df.teacher_logprobs):
            student = response_logprobs(model, list(prompt), list(response)).float().cpu()
            advantage = (torch.tensor(list(teacher), dtype=torch.float32) - student)[skip:]
            if advantage.numel() == 0:
                continue
            abs_means.append(advantage.abs().mean().item())
            signed_means.append(advantage.mean().item())
            n_tokens += advantage.numel()
    return GapResult(
        mean_abs_advantage=float(np.mean(abs_means)) if abs_means else float("nan"),
        mean_advantage=float(np.mean(signed_means)) if signed_means else float("nan"),
        n_interactions=len(abs_means),
        n_tokens=n_tokens,
    )


def evaluate_checkpoint(base_model_path: str, adapter_dir: str, targets_path: str, champion_model_path: str | None = None,
                        device: str = "cpu") -> EvaluationResult:
    """Hindsight gap on the validation split for the base model (before) and base + adapter (after), and for
    `champion_model_path` (a plain model directory) when the champion is not the round's base. In float32, as
    training runs, on `device` (the asset passes `training.device`: a GPU node evaluates on its GPU)."""
    validation = read_split(targets_path, "validation")
    if validation.empty:
        raise ValueError(f"no validation rows in {targets_path}")
    base = AutoModelForCausalLM.from_pretrained(base_model_path, dtype=torch.float32).to(device)
    before = hindsight_gap(base, validation)
    after = hindsight_gap(PeftModel.from_pretrained(base, adapter_dir).to(device), validation)
    del base
    champion = None
    if champion_model_path is not None:
        model = AutoModelForCausalLM.from_pretrained(champion_model_path, dtype=torch.float32).to(device)
        champion = hindsight_gap(model, validation).mean_abs_advantage
    return EvaluationResult(
        gap_before=before.mean_abs_advantage,
        gap_after=after.mean_abs_advantage,
        signed_before=before.mean_advantage,
        signed_after=after.mean_advantage,
        n_validation=before.n_interactions,
        improved=after.mean_abs_advantage < before.mean_abs_advantage and (champion is None or after.mean_abs_advantage < champion),
        gap_champion=champion,
    )


def record_evaluation(con, result: EvaluationResult, target_set: str, adapter_dir: str, mlflow_run_id: str | None) -> None:
    """Append one row to the warehouse's `evaluations` table, so gaps across retraining rounds are queryable."""
    row = {**asdict(result), "target_set": target_set, "adapter_dir": adapter_dir, "mlflow_run_id": mlflow_run_id}
    columns = ", ".join(row)
    con.execute(
        f"INSERT INTO evaluations ({columns}) VALUES ({', '.join('$' + k for k in row)})", row
    ).fetchall()
