"""Each taxonomy rule on hand-made follow-ups, plus the features that must explain a label."""

from __future__ import annotations

import pandas as pd
import pytest

from sdpo_platform.followups import FOLLOWUP_KINDS, classify_followup, classify_followups

PROMPT = "What is the capital of Australia?"
RESPONSE = "The capital of Australia is Sydney, its largest city."


@pytest.mark.parametrize(
    ("followup", "kind", "feature"),
    [
        ("That's wrong, the capital is Canberra.", "correction", "says_wrong"),
        ("You forgot to mention the population.", "correction", "points_to_mistake"),
        ("No, I mean the capital of Austria.", "correction", "restates_intent"),
        ("Make it shorter please.", "refinement", "asks_length_change"),
        ("Can you put this in a table?", "refinement", "asks_format_change"),
        ("Rewrite it in a more formal tone.", "refinement", "asks_style_change"),
        ("This is useless.", "negative_reaction", "negative_words"),
        ("Perfect, exactly what I needed!", "positive_reinforcement", "positive_words"),
        ("Go on.", "continuation", "asks_to_continue"),
        ("What about New Zealand's capital?", "continuation", "builds_on_it"),
        ("Is it a big city?", "continuation", "pronoun_reference"),
        ("How many people live in Sydney?", "continuation", "topic_overlap"),
        ("What's a good recipe for banana bread?", "unrelated", "no_topic_overlap"),
        ("Thanks!", "acknowledgement", "acknowledges"),
        ("My cousin lives there.", "other", None),
    ],
)
def test_each_rule_labels_its_example(followup, kind, feature):
    result = classify_followup(followup, RESPONSE, PROMPT)
    assert result.kind == kind, result
    if feature:
        assert feature in result.features


def test_priority_correction_beats_refinement_and_continuation_beats_praise():
    assert classify_followup("No, that's wrong. Also make it shorter.", RESPONSE, PROMPT).kind == "correction"
    assert classify_followup("Great! Tell me more.", RESPONSE, PROMPT).kind == "continuation"


def test_long_thanks_with_new_question_is_not_an_acknowledgement():
    result = classify_followup("Thanks. And how do I grow tomatoes on a balcony in winter?", RESPONSE, PROMPT)
    assert result.kind == "unrelated"


def test_overlap_reads_the_last_user_turn_of_context_and_keeps_order():
    frame = pd.DataFrame(
        {
            "interaction_id": ["b", "a"],
            "context": [
                [{"role": "user", "content": "Tell me about volcanoes"}, {"role": "assistant", "content": "Sure."}, {"role": "user", "content": "Why do volcanoes erupt?"}],
                [{"role": "user", "content": "Name a fruit"}],
            ],
            "response": ["Magma pressure builds up.", "Apple."],
            "followup": ["Which volcanoes erupt most often?", "Which volcanoes erupt most often?"],
        }
    )
    out = classify_followups(frame)
    assert list(out["interaction_id"]) == ["b", "a"]
    assert list(out["followup_kind"]) == ["continuation", "unrelated"]
    assert out["topic_overlap"].iloc[0] > out["topic_overlap"].iloc[1]
    assert set(out["followup_kind"]) <= set(FOLLOWUP_KINDS)


def test_missing_columns_are_reported():
    with pytest.raises(ValueError, match="followup"):
        classify_followups(pd.DataFrame({"interaction_id": ["x"], "response": ["y"], "prompt": ["p"]}))
