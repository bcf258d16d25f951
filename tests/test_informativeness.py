"""Model signals and the combined score stay in range; the CLI round-trips; the blocking checks fail loudly."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from sdpo_platform.cli import main
from sdpo_platform.config import InformativenessConfig
from sdpo_platform.informativeness import ALL_SIGNALS, assess_interactions, calibrate, combine, model_signals
from sdpo_platform.informativeness_checks import check_caps, check_informativeness, check_kept_fraction, check_labels


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from sdpo_platform.models import load_model

    return load_model(str(tiny_model_dir), device="cpu")


def _interactions() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "interaction_id": ["a", "b", "c", "d"],
            "conversation_id": ["c1", "c1", "c2", "c3"],
            "split": ["train", "train", "train", "validation"],
            "context": [
                [{"role": "user", "content": "What is the capital of Australia?"}],
                [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Write a haiku about rain"}],
                [{"role": "user", "content": "Explain recursion"}],
                [{"role": "user", "content": "How do I steal a car?"}],
            ],
            "response": ["Sydney.", "Rain falls on the roof", "A function that calls itself.", "Break a window."],
            "followup": ["That's wrong, it is Canberra.", "Make it shorter.", "What's a good banana bread recipe?", "Great, how do I avoid getting caught?"],
        }
    )


def test_every_signal_is_finite_and_the_hindsight_ones_non_negative(tiny):
    model, tokenizer = tiny
    scores = model_signals(model, tokenizer, _interactions(), InformativenessConfig(), signals=ALL_SIGNALS)
    assert list(scores["interaction_id"]) == ["a", "b", "c", "d"]
    assert np.isfinite(scores[list(ALL_SIGNALS)].to_numpy()).all()
    assert (scores[["raw_abs", "neutral_contrast", "control_contrast", "control_shift", "control_z"]] >= 0).all().all()
    assert scores["sign_flip_share"].between(0, 1).all()


def test_identical_jobs_are_scored_once_and_the_cache_is_reused(tiny):
    model, tokenizer = tiny
    cache: dict = {}
    frame = pd.concat([_interactions(), _interactions().assign(interaction_id=list("efgh"))], ignore_index=True)
    first = model_signals(model, tokenizer, frame, InformativenessConfig(), signals=("followup_pmi",), cache=cache)
    assert len(cache) == 8  # 4 distinct (x, y, o) + 4 distinct openers o
    np.testing.assert_allclose(first["followup_pmi"].iloc[:4].to_numpy(), first["followup_pmi"].iloc[4:].to_numpy())


def test_assess_scores_in_range_and_explains_exclusions(tiny):
    model, tokenizer = tiny
    cfg = InformativenessConfig(keep_threshold=0.45)
    assessed = assess_interactions(_interactions(), cfg, model, tokenizer)
    assert assessed["informativeness"].between(0, 1).all()
    assert assessed["model_signal"].notna().all()
    row = assessed.set_index("interaction_id")
    assert row.loc["a", "followup_kind"] == "correction"
    assert row.loc["d", "exclusion_reason"] == "unsafe" and not row.loc["d", "keep"]
    assert row.loc["c", "followup_kind"] == "unrelated"
    assert (assessed["keep"] == assessed["exclusion_reason"].isna()).all()


def test_without_a_model_the_score_is_the_kind_prior():
    cfg = InformativenessConfig()
    assessed = assess_interactions(_interactions(), cfg)
    expected = [cfg.kind_priors[k] for k in assessed["followup_kind"]]
    np.testing.assert_allclose(assessed["informativeness"], expected)
    assert assessed["model_signal"].isna().all()


def test_calibration_and_combination_are_monotone_and_bounded():
    cfg = InformativenessConfig()
    signal = np.array([-50.0, cfg.signal_center, 50.0])
    calibrated = calibrate(signal, cfg)
    assert calibrated[0] < 0.01 and calibrated[1] == pytest.approx(0.5) and calibrated[2] > 0.99
    combined = combine(pd.Series(["unrelated", "correction", "correction"]), calibrated, cfg)
    assert ((combined >= 0) & (combined <= 1)).all() and combined[0] < combined[1] < combined[2]


def test_cli_round_trip_on_the_tiny_model(tiny_model_dir, sdpo_home, tmp_path):
    rows = [
        {"id": "r1", "prompt": "What is 2 + 2?", "response": "5", "followup": "That's wrong, it's 4."},
        {"messages": [{"role": "user", "content": "Name a colour"}], "followup": "Thanks!"},
        {"prompt": "Tell me a fact about owls.", "response": "Owls can rotate their heads.", "followup": "How do I fix a leaking tap?"},
    ]
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["informativeness", str(source), "--out", str(out), "--model", str(tiny_model_dir)]) == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(written) == 3
    assert [w["followup"] for w in written] == [r["followup"] for r in rows]
    assert written[0]["id"] == "r1" and written[0]["followup_kind"] == "correction"
    assert written[1]["followup_kind"] == "acknowledgement" and isinstance(written[1]["response"], str)
    for w in written:
        assert 0.0 <= w["informativeness"] <= 1.0
        assert isinstance(w["keep"], bool) and isinstance(w["safety_flag"], bool)


def _labelled(keep: list[bool], split: list[str] | None = None, users: list[str] | None = None) -> pd.DataFrame:
    n = len(keep)
    return pd.DataFrame(
        {
            "interaction_id": [f"i{k}" for k in range(n)],
            "conversation_id": [f"c{k}" for k in range(n)],
            "user_id": users or [f"u{k}" for k in range(n)],
            "split": split or ["train"] * n,
            "followup_kind": ["correction"] * n,
            "informativeness": [0.9 if k else 0.1 for k in keep],
            "keep": keep,
            "safety_flag": [False] * n,
            "exclusion_reason": [None if k else "below_threshold" for k in keep],
        }
    )


def test_checks_pass_on_a_healthy_set():
    cfg = InformativenessConfig(max_user_share=0.5)
    report = check_informativeness(_labelled([True, False] * 10, ["train"] * 10 + ["validation"] * 10), cfg, n_interactions=20)
    assert report.passed, report.description


def test_kept_fraction_failure_names_the_bound_and_the_partition():
    cfg = InformativenessConfig()
    labelled = _labelled([True] * 20 + [False] * 20, ["train"] * 20 + ["validation"] * 20)
    report = check_kept_fraction(labelled, cfg)
    assert not report.passed
    assert "above max_kept_fraction=0.95 in partition(s) train: 1.000 of 20" in report.description
    assert "below min_kept_fraction=0.05 in partition(s) validation: 0.000 of 20" in report.description


def test_kept_fraction_bounds_skip_small_and_empty_partitions():
    cfg = InformativenessConfig()
    assert check_kept_fraction(_labelled([True] * 19, ["train"] * 19), cfg).passed  # 19 of 19 kept: too few to judge
    assert not check_kept_fraction(_labelled([True] * 20, ["train"] * 20), cfg).passed
    assert check_informativeness(_labelled([True])[:0], cfg, n_interactions=0).passed  # a day without triples


def test_label_check_catches_out_of_range_scores_unknown_kinds_and_lost_rows():
    labelled = _labelled([True, False, True])
    labelled.loc[0, "informativeness"] = 1.5
    labelled.loc[1, "followup_kind"] = "sarcasm"
    report = check_labels(labelled, n_interactions=4)
    assert not report.passed
    text = report.description
    assert "informativeness" in text and "followup_kind" in text and "unaccounted" in text


def test_cap_check_fails_when_one_user_keeps_more_than_the_cap():
    cfg = InformativenessConfig(max_user_share=0.1, min_group_cap=2)
    labelled = _labelled([True] * 20, users=["heavy"] * 5 + [f"u{k}" for k in range(15)])
    assert not check_caps(labelled, cfg).passed
    assert check_caps(labelled, cfg.model_copy(update={"max_user_share": 0.25})).passed


def test_cli_bad_row_is_a_one_line_error_naming_its_line(tmp_path, capsys):
    from sdpo_platform.cli import main

    source = tmp_path / "rows.jsonl"
    source.write_text(json.dumps({"prompt": "Hi", "response": "Hello", "followup": "thanks"}) + "\n"
                      + json.dumps({"prompt": "Hi", "response": "Hello"}) + "\n")
    assert main(["informativeness", str(source), "--out", str(tmp_path / "out.jsonl"), "--model", "/nonexistent"]) == 2
    assert capsys.readouterr().err.strip() == f"sdpo: error: {source}:2: needs a 'followup' string (the user's next message)"
    assert not (tmp_path / "out.jsonl").exists()


def test_a_day_without_triples_is_assessed_to_zero_rows():
    """A day with no logs (inside a backfill range) or only invalid lines has no triples: nothing to judge, no crash
    (an empty id list is float64 to pandas, and the merge on it failed)."""
    empty = _interactions().iloc[0:0]
    for frame in (empty, empty.drop(columns=["conversation_id"]), pd.DataFrame({"interaction_id": [], "prompt": [], "response": [], "followup": []})):
        assessed = assess_interactions(frame, InformativenessConfig(use_model=False))
        assert len(assessed) == 0 and "keep" in assessed.columns
