"""Held-out hindsight gap: exact on a known student, and lowered by training towards a toy teacher."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM

from sdpo_platform.evaluate import evaluate_checkpoint, hindsight_gap
from sdpo_platform.logprobs import response_logprobs
from sdpo_platform.train import read_split, train
from test_train import make_run


def test_gap_averages_per_interaction_then_over_interactions(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts, responses = [[1, 2, 3], [4, 5]], [[6, 7, 8, 9], [10, 11]]
    with torch.no_grad():
        student = [response_logprobs(model, p, r) for p, r in zip(prompts, responses)]
    # teacher = student + chosen offsets, so A is known exactly
    offsets = [torch.tensor([5.0, 1.0, -1.0, 3.0]), torch.tensor([-2.0, 4.0])]
    frame = pd.DataFrame({
        "student_prompt_ids": prompts,
        "response_ids": responses,
        "teacher_logprobs": [(s + o).tolist() for s, o in zip(student, offsets)],
    })
    gap = hindsight_gap(model, frame)
    assert gap.mean_abs_advantage == pytest.approx(((5 + 1 + 1 + 3) / 4 + (2 + 4) / 2) / 2, abs=1e-4)
    assert gap.mean_advantage == pytest.approx(((5 + 1 - 1 + 3) / 4 + (-2 + 4) / 2) / 2, abs=1e-4)
    assert gap.n_interactions == 2 and gap.n_tokens == 6

    skipped = hindsight_gap(model, frame, skip=1)
    assert skipped.mean_abs_advantage == pytest.approx(((1 + 1 + 3) / 3 + 4 / 1) / 2, abs=1e-4)
    assert skipped.n_tokens == 4


def test_training_towards_a_toy_teacher_lowers_the_validation_gap(tmp_path, sdpo_home, tiny_model_dir):
    """The teacher prefers each token of a fixed formal reply by 0.3 nats; unseen validation prompts."""
    run = make_run(tmp_path, tiny_model_dir, steps=8, batch_size=4, learning_rate=2e-2, warmup_fraction=0.0)
    result = train(run)
    evaluation = evaluate_checkpoint(run.base_model_path, result.adapter_dir, run.targets_path)

    assert evaluation.n_validation == len(read_split(run.targets_path, "validation")) == 4
    assert evaluation.improved
    assert evaluation.gap_after < 0.8 * evaluation.gap_before
    assert evaluation.gap_before == pytest.approx(0.3, abs=1e-4)  # A = offset exactly before training
    assert evaluation.signed_after > 0  # moved towards the teacher, not past it
    assert result.loss_last < result.loss_first


def test_when_rounds_start_from_the_base_a_checkpoint_must_also_beat_the_champion(tmp_path, sdpo_home, tiny_model_dir):
    """With `next_round_from: base` the round's "before" is the base model: a checkpoint that beats it only a
    little must not replace a champion an earlier round trained much closer to the teacher."""
    from peft import PeftModel

    (tmp_path / "good").mkdir()
    (tmp_path / "weak").mkdir()
    good = train(make_run(tmp_path / "good", tiny_model_dir, steps=8, batch_size=4, learning_rate=2e-2, warmup_fraction=0.0))
    champion = tmp_path / "champion"  # the earlier round's version, merged as the registry keeps it
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    PeftModel.from_pretrained(base, good.adapter_dir).merge_and_unload().save_pretrained(champion)
    weak_run = make_run(tmp_path / "weak", tiny_model_dir, steps=1, batch_size=4, learning_rate=2e-3, warmup_fraction=0.0)
    weak = train(weak_run)

    alone = evaluate_checkpoint(weak_run.base_model_path, weak.adapter_dir, weak_run.targets_path)
    assert alone.improved and alone.gap_champion is None  # it does beat the base
    judged = evaluate_checkpoint(weak_run.base_model_path, weak.adapter_dir, weak_run.targets_path, str(champion))
    assert judged.gap_champion < judged.gap_after < judged.gap_before and not judged.improved
