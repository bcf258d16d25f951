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
    rejected = con.execute("SELECT line_no, reason FROM quarantine WHERE stage = 'conversations'").fetchall()
    return dict(kept + rejected)


def test_each_format_is_parsed_and_roles_normalized(con, tmp_path):
    records = [
        sharegpt(("human", ENGLISH), ("gpt", "Paris."), ("human", "Why is that so?")),
        openai(("system", "Be brief."), ("user", ENGLISH), ("assistant", "Paris."), ("user", "And what about Spain?")),
        wildchat(("user", ENGLISH), ("assistant", "Paris."), ("user", "Is that the truth?")),
        sharegpt(("user", ENGLISH), ("chatgpt", "Paris."), ("human", "And the largest city there?"), ("bard", "Paris too.")),
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
        json.dumps(openai(("user", [{"type": "text", "text": ENGLISH}]), ("assistant", "x"), ("user", "y"))),  # 4
        json.dumps(sharegpt(("human", ENGLISH), ("gpt", None), ("human", "y"))),               # 5
        json.dumps(openai(("user", "  "), ("assistant", "\n"))),                               # 6
        json.dumps(openai(("system", "s"), ("assistant", "Hello there!"), ("user", ENGLISH), ("assistant", "Paris."))),  # 7
        json.dumps(openai(("user", ENGLISH), ("assistant", "Paris."))),                        # 8
        json.dumps(openai(("user", ENGLISH), ("assistant", long_text), ("user", "Why is it so long?"))),  # 9
        json.dumps(openai(("user", "Wie geht es dir und was ist das?"), ("assistant", "Gut, und dir?"), ("user", "Auch gut, danke."))),  # 10
        json.dumps(openai(("user", ENGLISH), ("assistant", "Paris."), ("user", "Why is that so?"))),  # 11 kept
        json.dumps(openai(("user", ENGLISH.upper()), ("assistant", "  Paris. "), ("user", "why is   that so?"))),  # 12 duplicate
        json.dumps([1, 2, 3]),                                                                 # 13
    ]
    ingest_lines(con, tmp_path, lines)

    result = build_conversations(con, CleaningConfig(max_message_chars=2000))

    assert verdicts(con) == {
        1: "invalid_json", 2: "unknown_schema", 3: "unknown_role", 4: "invalid_content", 5: "invalid_content",
        6: "empty_conversation", 7: "starts_with_assistant", 8: "too_few_messages", 9: "message_too_long",
        10: "language", 11: "kept", 12: "duplicate", 13: "unknown_schema",
    }
    assert result.raw_records == result.kept + result.quarantined == 13
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


def test_conversation_ids_stay_unique_when_source_ids_repeat(con, tmp_path):
    lines = [json.dumps(sharegpt(("human", f"{ENGLISH} {i}"), ("gpt", "Paris."), ("human", "Why?"), id="same")) for i in range(3)]
    ingest_lines(con, tmp_path, lines)

    result = build_conversations(con, CleaningConfig(languages=[]))

    ids = [row[0] for row in con.execute("SELECT conversation_id FROM conversations").fetchall()]
    assert result.kept == 3 and len(set(ids)) == 3


def test_empty_language_list_keeps_every_language(con, tmp_path):
    line = json.dumps(openai(("user", "Wie geht es dir und was ist das?"), ("assistant", "Gut, und dir?"), ("user", "Auch gut, danke.")))
    ingest_lines(con, tmp_path, [line])
    assert build_conversations(con, CleaningConfig(languages=["en"])).kept == 0
    assert build_conversations(con, CleaningConfig(languages=[])).kept == 1
    assert con.execute("SELECT language FROM conversations").fetchall() == [("de",)]
