"""Cleaning: formats, role/content normalization, filters, and one quarantine row per rejected record."""

from __future__ import annotations

import json

import pytest

from sdpo_platform.cleaning import build_conversations
from sdpo_platform.config import CleaningConfig
from sdpo_platform.ingest import ingest_files
from sdpo_platform.warehouse import connect

ENGLISH = "What is the capital of France and why is it there?"


def sharegpt(*turns, id="sg"):
    return {"id": id, "conversations": [{"from": role, "value": text} for role, text in turns]}


def openai(*turns):
    return {"messages": [{"role": role, "content": text} for role, text in turns]}


def wildchat(*turns):
    return {"conversation_hash": "h1", "conversation": [{"role": role, "content": text, "toxic": False} for role, text in turns]}


@pytest.fixture()
def con(sdpo_home):
    connection = connect()
    yield connection
    connection.close()


def ingest_lines(con, directory, lines: list[str], name="logs.jsonl"):
    path = directory / name
    path.write_text("\n".join(lines) + "\n")
    ingest_files(con, [path])


def verdicts(con) -> dict[int, str]:
    """line_no → 'kept' or the quarantine reason."""
    kept = con.execute("SELECT line_no, 'kept' FROM conversations").fetchall()
    rejected = con.execute("SELECT line_no, reason FROM quarantine WHERE stage = 'conversations' AND level = 'record'").fetchall()
    return dict(kept + rejected)


def test_each_format_is_parsed_and_roles_normalized(con, tmp_path):
    records = [
        sharegpt(("human", ENGLISH), ("gpt", "Paris."), ("human", "Why is that so?")),
        openai(("system", "Be brief."), ("user", ENGLISH), ("assistant", "Paris."), ("user", "And what about Spain?")),
        wildchat(("user", ENGLISH), ("assistant", "Paris."), ("user", "Is that the truth?")),
        sharegpt(("user", ENGLISH), ("chatgpt", "Paris."), ("human", "And the largest city there?"), ("bard", "Paris too."), id="sg2"),
    ]
    ingest_lines(con, tmp_path, [json.dumps(r) for r in records])

    result = build_conversations(con, CleaningConfig())

    assert result.kept == 4 and result.quarantined == 0
    rows = con.execute("SELECT line_no, source_format, source_id, messages FROM conversations ORDER BY line_no").fetchall()
    assert [row[1] for row in rows] == ["sharegpt", "openai", "wildchat", "sharegpt"]
    assert rows[0][2] == "sg" and rows[2][2] == "h1"
    assert [m["role"] for m in rows[1][3]] == ["system", "user", "assistant", "user"]
    assert [m["role"] for m in rows[3][3]] == ["user", "assistant", "user", "assistant"]


def test_bad_records_land_in_quarantine_with_their_first_failing_reason(con, tmp_path):
    long_text = "word " * 1000
    lines = [
        "{this is not json",                                                                   # 1
        json.dumps({"text": "no chat here"}),                                                  # 2
        json.dumps(openai(("user", ENGLISH), ("robot", "beep"), ("user", "ok then"))),         # 3
        json.dumps(openai(("user", [{"type": "image_url", "image_url": "x"}]), ("assistant", "x"), ("user", "y"))),  # 4
        json.dumps(sharegpt(("human", ENGLISH), ("gpt", None), ("human", "y"))),               # 5
        json.dumps(openai(("user", "  "), ("assistant", "\n"))),                               # 6
        json.dumps(openai(("system", "s"), ("assistant", "Hello there!"), ("user", ENGLISH), ("assistant", "Paris."))),  # 7
        json.dumps(openai(("user", ENGLISH), ("assistant", "Paris."))),                        # 8
        json.dumps(openai(("user", ENGLISH), ("assistant", long_text), ("user", "Why is it so long?"))),  # 9
        json.dumps(openai(("user", "Wie geht es dir und was ist das?"), ("assistant", "Gut, und dir?"), ("user", "Auch gut, danke."))),  # 10
        json.dumps(openai(("user", ENGLISH), ("assistant", "Paris."), ("user", "Why is that so?"))),  # 11 kept
        json.dumps(openai(("user", ENGLISH.upper()), ("assistant", "  Paris. "), ("user", "why is   that so?"))),  # 12 duplicate
        json.dumps([1, 2, 3]),                                                                 # 13
        json.dumps({"messages": []}),                                                          # 14 no message at all
    ]
    ingest_lines(con, tmp_path, lines)

    result = build_conversations(con, CleaningConfig(max_message_chars=2000))

    assert verdicts(con) == {
        1: "invalid_json", 2: "unknown_schema", 3: "unknown_role", 4: "invalid_content", 5: "invalid_content",
        6: "empty_conversation", 7: "starts_with_assistant", 8: "too_few_messages", 9: "message_too_long",
        10: "language", 11: "kept", 12: "duplicate", 13: "unknown_schema", 14: "empty_conversation",
    }
    assert result.raw_records == result.kept + result.quarantined == 14
    assert result.by_reason["unknown_schema"] == 2 and result.by_reason["invalid_content"] == 2
    assert result.languages["de"] == 1
    detail = con.execute("SELECT detail FROM quarantine WHERE line_no = 3").fetchall()[0][0]
    assert "robot" in detail


def test_raw_equals_kept_plus_quarantined_and_rebuild_is_idempotent(con, tmp_path):
    lines = [json.dumps(openai(("user", f"{ENGLISH} {i}"), ("assistant", "Paris."), ("user", "Why is that?"))) for i in range(5)]
    ingest_lines(con, tmp_path, lines + ["not json"] * 3)

    for _ in range(2):
        result = build_conversations(con, CleaningConfig())
        quarantined = con.execute("SELECT count(*) FROM quarantine WHERE stage = 'conversations'").fetchall()[0][0]
        kept = con.execute("SELECT count(*) FROM conversations").fetchall()[0][0]
        raw = con.execute("SELECT count(*) FROM raw_records").fetchall()[0][0]
        assert raw == kept + quarantined == result.kept + result.quarantined == 8
        assert (kept, quarantined) == (5, 3)
    # one row per raw record, never two
    assert con.execute("SELECT count(DISTINCT record_id) FROM quarantine WHERE stage = 'conversations'").fetchall()[0][0] == 3


def test_consecutive_same_role_messages_are_merged_and_blank_ones_dropped(con, tmp_path):
    record = openai(
        ("system", "Be brief."), ("user", "First part."), ("user", "   "), ("user", "Second part of the question?"),
        ("assistant", "Answer one."), ("assistant", "Answer two."), ("user", "Why is that the answer?"),
    )
    ingest_lines(con, tmp_path, [json.dumps(record)])

    build_conversations(con, CleaningConfig())

    messages, n_messages = con.execute("SELECT messages, n_messages FROM conversations").fetchall()[0]
    assert messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "First part.\n\nSecond part of the question?"},
        {"role": "assistant", "content": "Answer one.\n\nAnswer two."},
        {"role": "user", "content": "Why is that the answer?"},
    ]
    assert n_messages == 4


def test_system_messages_move_to_the_front_without_breaking_a_run(con, tmp_path):
    record = openai(("user", "Part one."), ("system", "Be brief."), ("user", "Part two, what is the capital of France?"),
                    ("assistant", "Paris."), ("system", "Now be formal."), ("user", "Why is that the answer?"))
    ingest_lines(con, tmp_path, [json.dumps(record)])

    build_conversations(con, CleaningConfig())

    messages = con.execute("SELECT messages FROM conversations").fetchall()[0][0]
    assert [(m["role"], m["content"]) for m in messages] == [
        ("system", "Be brief."), ("system", "Now be formal."),
        ("user", "Part one.\n\nPart two, what is the capital of France?"), ("assistant", "Paris."),
        ("user", "Why is that the answer?"),
    ]


def test_repeated_source_ids_with_different_content_keep_the_first_and_quarantine_the_rest(con, tmp_path):
    lines = [json.dumps(sharegpt(("human", f"{ENGLISH} {i}"), ("gpt", "Paris."), ("human", "Why?"), id="same")) for i in range(3)]
    ingest_lines(con, tmp_path, lines)

    result = build_conversations(con, CleaningConfig(languages=[]))

    assert result.kept == 1 and result.by_reason == {"duplicate_id": 2}
    assert verdicts(con) == {1: "kept", 2: "duplicate_id", 3: "duplicate_id"}
    detail = con.execute("SELECT detail FROM quarantine WHERE line_no = 2").fetchall()[0][0]
    assert "id same already used" in detail


def test_empty_language_list_keeps_every_language(con, tmp_path):
    line = json.dumps(openai(("user", "Wie geht es dir und was ist das?"), ("assistant", "Gut, und dir?"), ("user", "Auch gut, danke.")))
    ingest_lines(con, tmp_path, [line])
    assert build_conversations(con, CleaningConfig(languages=["en"])).kept == 0
    assert build_conversations(con, CleaningConfig(languages=[])).kept == 1
    assert con.execute("SELECT language FROM conversations").fetchall() == [("de",)]


def on_day(day: str, question: str, followup: str = "Why is that so?") -> str:
    return json.dumps({"timestamp": f"{day} 12:00:00", "conversation": [
        {"role": "user", "content": question}, {"role": "assistant", "content": "Paris."}, {"role": "user", "content": followup}]})


def test_only_the_given_partitions_are_rebuilt_and_counted(con, tmp_path):
    ingest_lines(con, tmp_path, [on_day("2024-01-01", ENGLISH), on_day("2024-01-02", ENGLISH + " Really?"), "{bad"])
    everything = build_conversations(con, CleaningConfig())
    assert everything.raw_records == 3 and sorted(everything.partitions)[0] == "2024-01-01"

    con.execute("DELETE FROM conversations WHERE partition_date = DATE '2024-01-01'")  # simulate a stale day
    one_day = build_conversations(con, CleaningConfig(), partitions=["2024-01-02"])
    assert (one_day.raw_records, one_day.kept, one_day.partitions) == (1, 1, ["2024-01-02"])
    assert con.execute("SELECT count(*) FROM conversations").fetchall() == [(1,)]  # 01-01 left alone
    build_conversations(con, CleaningConfig(), partitions=["2024-01-01"])
    assert con.execute("SELECT count(*) FROM conversations").fetchall() == [(2,)]


def test_exact_duplicates_are_found_across_partitions(con, tmp_path):
    ingest_lines(con, tmp_path, [on_day("2024-01-01", ENGLISH), on_day("2024-01-05", ENGLISH.upper())])
    build_conversations(con, CleaningConfig(batch_records=1))  # one partition per transaction

    assert verdicts(con) == {1: "kept", 2: "duplicate"}
    assert "another partition" in con.execute("SELECT detail FROM quarantine WHERE line_no = 2").fetchall()[0][0]
    # rebuilding the later day alone still sees the kept copy in the earlier one
    assert build_conversations(con, CleaningConfig(), partitions=["2024-01-05"]).by_reason == {"duplicate": 1}


def test_near_duplicates_are_flagged_not_removed(con, tmp_path):
    ingest_lines(con, tmp_path, [
        on_day("2024-01-01", "What is the capital of France, and why is it there?"),
        on_day("2024-01-02", "what is the capital of france and why is it there 2", "Tell me more."),
        on_day("2024-01-02", "Something else entirely: how do magnets work?"),
    ])
    result = build_conversations(con, CleaningConfig())
    rows = dict(con.execute("SELECT line_no, near_duplicate_of FROM conversations").fetchall())
    first = con.execute("SELECT conversation_id FROM conversations WHERE line_no = 1").fetchall()[0][0]
    assert result.kept == 3 and rows == {1: None, 2: first, 3: None}


def test_stats_histogram_and_language_mix(con, tmp_path):
    from sdpo_platform.cleaning import language_mix, length_histogram
    from sdpo_platform.warehouse import stats

    ingest_lines(con, tmp_path, [on_day("2024-01-01", ENGLISH), on_day("2024-01-01", "Wie geht es dir und was ist das?", "Und dann?"),
                                 "not json", on_day("2024-01-02", ENGLISH + " " + "and the cat is on the mat " * 40)])
    build_conversations(con, CleaningConfig())
    numbers = stats(con)
    assert numbers["raw_records"] == 4 == numbers["conversations_kept"] + numbers["quarantined"]
    assert numbers["quarantine_by_reason"] == {"invalid_json": 1, "language": 1}
    assert all(isinstance(numbers[k], int) for k in ("raw_records", "conversations_kept", "interactions_total", "quarantined"))
    histogram = length_histogram(con)
    assert sum(b["count"] for b in histogram) == 2 and histogram[0]["bucket"] == "0-250" and histogram[0]["count"] == 1
    assert [b["count"] for b in length_histogram(con, ["2024-01-02"])][:4] == [0, 0, 0, 1]
    assert language_mix(con) == {"en": 2, "de": 1}


def test_language_heuristic_accuracy_on_the_labelled_sample(con):
    from pathlib import Path

    from sdpo_platform.language import labelled_sample, measure_accuracy

    here = Path(__file__).resolve().parent
    report = measure_accuracy(con, labelled_sample(here / "data" / "language_sample.jsonl", here.parents[1] / "shared" / "data"))
    assert report["n"] >= 250
    assert report["accuracy"] >= 0.9, report["errors"]
    assert report["english_precision"] >= 0.97 and report["english_recall"] >= 0.95


def test_reconciliation_check_fails_only_the_partition_that_lost_a_record(con, tmp_path):
    from sdpo_platform.checks import check_conversations

    ingest_lines(con, tmp_path, [on_day("2024-01-01", ENGLISH), "{bad", on_day("2024-01-02", ENGLISH + " Or not?"), "[1]"])
    con.execute("UPDATE raw_records SET partition_date = DATE '2024-01-02' WHERE line_no = 4")
    build_conversations(con, CleaningConfig())
    assert check_conversations(con, CleaningConfig()).passed

    con.execute("DELETE FROM quarantine WHERE stage = 'conversations' AND line_no = 4")  # a record silently lost
    assert not check_conversations(con, CleaningConfig()).passed
    assert not check_conversations(con, CleaningConfig(), ["2024-01-02"]).passed
    assert check_conversations(con, CleaningConfig(), ["2024-01-01"]).passed


def test_sharegpt_chunk_ids_are_joined_by_default_and_kept_apart_when_configured(con, tmp_path):
    """FastChat-style `identity_0, identity_1` ids are separate conversations; only the knob can tell."""
    records = [sharegpt(("human", ENGLISH), ("gpt", "Paris."), ("human", f"Why is that so, part {i}?"), id=f"identity_{i}") for i in range(3)]
    ingest_lines(con, tmp_path, [json.dumps(r) for r in records])

    joined = build_conversations(con, CleaningConfig())
    assert (joined.kept, joined.records_kept, joined.quarantined) == (1, 3, 0)
    assert con.execute("SELECT source_id FROM conversations").fetchall() == [("identity",)]

    apart = build_conversations(con, CleaningConfig(join_sharegpt_chunks=False))
    assert (apart.kept, apart.records_kept, apart.quarantined) == (3, 3, 0)
    assert sorted(con.execute("SELECT source_id FROM conversations").fetchall()) == [(f"identity_{i}",) for i in range(3)]


def test_source_ids_that_carry_pii_are_stored_as_salted_hashes_and_still_tell_ids_apart(con, tmp_path):
    records = [dict(openai(("user", ENGLISH), ("assistant", "Paris."), ("user", f"And question {i}?")), conversation_id=cid)
               for i, cid in enumerate(["jane.doe@example.com", "bob@example.org", "jane.doe@example.com", "plain-id-7"])]
    ingest_lines(con, tmp_path, [json.dumps(r) for r in records])

    build_conversations(con, CleaningConfig())

    ids = dict(con.execute("SELECT line_no, source_id FROM conversations").fetchall())
    assert ids[4] == "plain-id-7"
    assert ids[1].startswith("sha256:") and ids[2].startswith("sha256:") and ids[1] != ids[2]
    assert verdicts(con)[3] == "duplicate_id"  # the same e-mail id with other content: still the same id
    stored = " ".join(str(v) for v in con.execute("SELECT * FROM conversations").fetchall()[0])
    details = " ".join(d for (d,) in con.execute("SELECT detail FROM quarantine").fetchall())
    assert "@example" not in stored + details


def test_hh_text_before_the_first_turn_is_dropped_with_a_redacted_message_level_row(con, tmp_path):
    transcript = ("Notes from jane.doe@example.com, card 4111 1111 1111 1111\n\nHuman: " + ENGLISH
                  + "\n\nAssistant: Paris.\n\nHuman: And why is that so?")
    ingest_lines(con, tmp_path, [json.dumps({"chosen": transcript})])

    result = build_conversations(con, CleaningConfig())

    assert (result.kept, result.quarantined, result.messages_dropped) == (1, 0, 1)
    messages = json.loads(con.execute("SELECT to_json(messages) FROM conversations").fetchone()[0])
    assert [m["role"] for m in messages] == ["user", "assistant", "user"] and "Notes" not in str(messages)
    reason, detail, index = con.execute("SELECT reason, detail, message_index FROM quarantine WHERE level = 'message'").fetchone()
    assert (reason, index) == ("text_before_first_turn", None)
    assert "Notes from <EMAIL>, card <CREDIT_CARD>" in detail


def test_the_preview_of_an_unparsable_line_is_redacted_before_it_is_cut(con, tmp_path):
    """An e-mail straddling the 120-character cut must not survive as `jane.doe@exam`."""
    line = '{"messages": "' + "x" * 95 + ' jane.doe@example.com and more text after it, never closed'
    assert line.index("@") < 120 < line.index("@") + 12
    ingest_lines(con, tmp_path, [line])

    build_conversations(con, CleaningConfig())

    (detail,) = con.execute("SELECT detail FROM quarantine WHERE reason = 'invalid_json'").fetchone()
    assert "jane" not in detail and "<EMAIL>" in detail and detail.endswith("…")
