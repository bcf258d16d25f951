"""Teacher/student scoring: identical response ids, A = teacher − student, batching changes nothing."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from sdpo_platform.config import TargetsConfig
from sdpo_platform.hindsight import encode_interaction, template_hash
from sdpo_platform.logprobs import response_logprobs
from sdpo_platform.targets import (
    TARGET_COLUMNS,
    compute_targets,
    read_targets,
    select_for_scoring,
    target_set_id,
    write_targets,
)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def make_interactions(n: int = 6) -> pd.DataFrame:
    rows = []
    for i in range(n):
        context = [{"role": "user", "content": f"Question number {i}: explain topic {'x' * i}."}]
        if i % 2:
            context = [
                {"role": "user", "content": "Hello there, first turn."},
                {"role": "assistant", "content": "Hi! How can I help?"},
            ] + context
        rows.append(
            {
                "interaction_id": f"conv{i}:{len(context)}",
                "context": context,
                "response": "Sure. " + "Here is a detail. " * (i + 1),
                "followup": "Too long, be brief." if i % 3 else "Thanks!",
                "split": "validation" if i == 0 else "train",
            }
        )
    return pd.DataFrame(rows)


def test_targets_score_identical_response_ids_and_advantage_is_the_gap(tiny):
    model, tok = tiny
    interactions = make_interactions()
    cfg = TargetsConfig(max_response_tokens=16)
    out = compute_targets(model, tok, interactions, cfg, model_revision="rev123")

    assert list(out.columns) == list(TARGET_COLUMNS)
    assert list(out["interaction_id"]) == list(interactions["interaction_id"])
    assert set(out["template_hash"]) == {template_hash(cfg.template)} and set(out["model_revision"]) == {"rev123"}
    for _, row in out.iterrows():
        context = interactions.set_index("interaction_id").loc[row.interaction_id]
        enc = encode_interaction(tok, context.context, context.response, context.followup, cfg.template, cfg.max_prompt_tokens, 16)
        assert row.response_ids == enc.response_ids and row.response_ids[-1] == tok.eos_token_id
        assert len(row.response_ids) <= 16
        assert row.teacher_prompt_ids == enc.teacher_prompt_ids and row.student_prompt_ids == enc.student_prompt_ids
        assert row.n_tokens == len(row.response_ids) == len(row.teacher_logprobs) == len(row.student_logprobs)
        teacher, student, adv = map(np.asarray, (row.teacher_logprobs, row.student_logprobs, row.advantages))
        np.testing.assert_array_equal(adv, teacher - student)
        assert not np.allclose(teacher, student)  # the hindsight block really changes the teacher's view
        assert row.mean_advantage == pytest.approx(adv.mean())
        assert row.mean_abs_advantage == pytest.approx(np.abs(adv).mean())
        assert row.sum_advantage == pytest.approx(adv.sum())
        assert (row.min_advantage, row.max_advantage) == (pytest.approx(adv.min()), pytest.approx(adv.max()))
        assert row.neutral_logprobs is None


def test_batched_scoring_equals_one_at_a_time(tiny):
    model, tok = tiny
    interactions = make_interactions(8)
    calls = []
    cfg = TargetsConfig(batch_token_budget=300)  # several buckets of different sizes
    out = compute_targets(model, tok, interactions, cfg, "rev", progress=lambda done, total: calls.append((done, total)))

    assert len(calls) > 2 and calls[-1] == (16, 16)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert max(d2 - d1 for (d1, _), (d2, _) in zip(calls, calls[1:])) > 1  # something was really batched
    for _, row in out.iterrows():
        teacher = response_logprobs(model, row.teacher_prompt_ids, row.response_ids).detach().numpy()
        student = response_logprobs(model, row.student_prompt_ids, row.response_ids).detach().numpy()
        np.testing.assert_allclose(row.teacher_logprobs, teacher, atol=1e-4)
        np.testing.assert_allclose(row.student_logprobs, student, atol=1e-4)


def test_neutral_followup_scores_the_teacher_with_the_neutral_message(tiny):
    model, tok = tiny
    interactions = make_interactions(2)
    cfg = TargetsConfig(neutral_followup="OK.")
    out = compute_targets(model, tok, interactions, cfg, "rev")
    neutral_run = compute_targets(model, tok, interactions.assign(followup="OK."), TargetsConfig(), "rev")
    for got, expected in zip(out["neutral_logprobs"], neutral_run["teacher_logprobs"]):
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_scoring_leaves_the_model_mode_alone(tiny):
    model, tok = tiny
    model.train()
    try:
        compute_targets(model, tok, make_interactions(1), TargetsConfig(), "rev")
        assert model.training
    finally:
        model.eval()


def test_select_for_scoring_is_capped_informative_and_order_free():
    df = pd.DataFrame(
        {
            "interaction_id": [f"c{i}:1" for i in range(40)],
            "split": ["validation" if i % 4 == 0 else "train" for i in range(40)],
            "informative": [i % 5 != 0 for i in range(40)],
            "context": [[{"role": "user", "content": str(i)}] for i in range(40)],
        }
    )
    cfg = TargetsConfig(max_train=7, max_validation=3)
    chosen = select_for_scoring(df, cfg)
    again = select_for_scoring(df.sample(frac=1.0, random_state=1), cfg)

    assert chosen["informative"].all()
    assert (chosen["split"] == "train").sum() == 7 and (chosen["split"] == "validation").sum() == 3
    assert list(chosen["interaction_id"]) == list(again["interaction_id"])
    assert set(chosen.columns) == set(df.columns)
    row = chosen.iloc[0]
    assert row.context == [{"role": "user", "content": row.interaction_id[1:-2]}]  # rows travel intact


def test_write_read_round_trip_replaces_the_set(tiny, sdpo_home):
    model, tok = tiny
    interactions = make_interactions(3)
    cfg = TargetsConfig()
    out = compute_targets(model, tok, interactions, cfg, "rev9")
    path = write_targets(out)

    assert path == sdpo_home / "targets" / target_set_id("rev9", template_hash(cfg.template)) / "targets.parquet"
    back = read_targets(path)
    pd.testing.assert_frame_equal(back, out)
    assert read_targets(path.parent).equals(back)

    assert write_targets(out.iloc[:1]) == path
    assert list(read_targets(path)["interaction_id"]) == [out["interaction_id"].iloc[0]]
    assert [p.name for p in path.parent.iterdir()] == ["targets.parquet"]  # no temp files left

    with pytest.raises(ValueError):
        write_targets(pd.concat([out, out.assign(model_revision="other")]))
