"""Triple extraction (x, y, o), informativeness flag, and the conversation-level split."""

from __future__ import annotations

import json

import pytest

from sdpo_platform.cleaning import build_conversations
from sdpo_platform.config import CleaningConfig, InteractionConfig
from sdpo_platform.ingest import ingest_files
from sdpo_platform.interactions import extract_interactions
from sdpo_platform.warehouse import connect


@pytest.fixture()
def con(sdpo_home):
    connection = connect()
    yield connection
    connection.close()


def load(con, directory, conversations: list[list[tuple[str, str]]], cleaning=CleaningConfig(min_messages=2, languages=[])):
    """Ingest chats given as [(role, text), ...] and clean them; returns line_no → conversation_id."""
    path = directory / "chats.jsonl"
    path.write_text("\n".join(json.dumps({"messages": [{"role": r, "content": t} for r, t in turns]}) for turns in conversations) + "\n")
    ingest_files(con, [path])
    build_conversations(con, cleaning)
    return dict(con.execute("SELECT line_no, conversation_id FROM conversations").fetchall())


def triples(con, conversation_id):
    rows = con.execute(
        "SELECT turn_index, context, response, followup FROM interactions WHERE conversation_id = ? ORDER BY turn_index",
        [conversation_id],
    ).fetchall()
    return [(turn, [(m["role"], m["content"]) for m in context], response, followup) for turn, context, response, followup in rows]


def test_first_middle_and_last_turns_with_system_message_and_truncation(con, tmp_path):
    chat = [("system", "S"), ("user", "u1"), ("assistant", "a1"), ("user", "u2"), ("assistant", "a2"),
            ("user", "u3"), ("assistant", "a3"), ("user", "u4"), ("assistant", "a4")]
    ids = load(con, tmp_path, [chat])

    result = extract_interactions(con, InteractionConfig(max_context_messages=4))

    assert result.conversations == 1 and result.total == 3  # a4 is last: no follow-up, no triple
    assert triples(con, ids[1]) == [
        (2, [("user", "u1")], "a1", "u2"),  # first turn; system message dropped from x
        (4, [("user", "u1"), ("assistant", "a1"), ("user", "u2")], "a2", "u3"),
        # last 4 before a3 are a1 u2 a2 u3: trimmed to start with the user
        (6, [("user", "u2"), ("assistant", "a2"), ("user", "u3")], "a3", "u4"),
    ]
    ids_in_table = [row[0] for row in con.execute("SELECT interaction_id FROM interactions ORDER BY turn_index").fetchall()]
    assert ids_in_table == [f"{ids[1]}:2", f"{ids[1]}:4", f"{ids[1]}:6"]


def test_context_of_exactly_max_messages_starts_with_user(con, tmp_path):
    chat = [("user", "u1"), ("assistant", "a1"), ("user", "u2"), ("assistant", "a2"), ("user", "u3"), ("assistant", "a3"), ("user", "u4")]
    ids = load(con, tmp_path, [chat])
    extract_interactions(con, InteractionConfig(max_context_messages=5))
    last = triples(con, ids[1])[-1]
    assert last == (5, [("user", "u1"), ("assistant", "a1"), ("user", "u2"), ("assistant", "a2"), ("user", "u3")], "a3", "u4")


def test_merged_same_role_messages_and_assistant_first_conversations(con, tmp_path):
    chats = [
        [("user", "u1"), ("user", "u1b"), ("assistant", "a1"), ("assistant", "a1b"), ("user", "u2")],
        [("assistant", "greeting"), ("user", "u1"), ("assistant", "a1"), ("user", "u2")],  # quarantined by cleaning
        [("user", "only"), ("assistant", "answer")],  # no follow-up: no triple
    ]
    ids = load(con, tmp_path, chats)

    result = extract_interactions(con, InteractionConfig())

    assert set(ids) == {1, 3} and result.total == 1
    assert triples(con, ids[1]) == [(1, [("user", "u1\n\nu1b")], "a1\n\na1b", "u2")]
    no_triples = con.execute("SELECT line_no, reason FROM quarantine WHERE stage = 'interactions'").fetchall()
    assert no_triples == [(3, "no_interactions")]


def test_informativeness_flags_bare_acknowledgements_and_short_followups(con, tmp_path):
    followups = ["Thanks!", "ok, GREAT.", "Thank you so much :)", "k", "No, that's wrong: the capital is Canberra.",
                 "Can you make it shorter?", "Thanks, but use Python instead."]
    chats = [[("user", "question"), ("assistant", "answer"), ("user", followup)] for followup in followups]
    ids = load(con, tmp_path, chats)

    result = extract_interactions(con, InteractionConfig(min_followup_chars=2))

    flags = dict(con.execute("SELECT followup, informative_reason FROM interactions").fetchall())
    assert flags == {
        "Thanks!": "acknowledgement", "ok, GREAT.": "acknowledgement", "Thank you so much :)": "acknowledgement",
        "k": "too_short", "No, that's wrong: the capital is Canberra.": "feedback",
        "Can you make it shorter?": "feedback", "Thanks, but use Python instead.": "other",
    }
    assert result.total == len(ids) == 7 and result.informative == 3
    assert result.by_reason["acknowledgement"] == 3


def _letters(i: int) -> str:
    """A tag that differs in letters, which the near-duplicate key keeps (digits it drops)."""
    return "".join(chr(ord("a") + d) for d in (i // 26 // 26, i // 26 % 26, i % 26))


def test_split_keeps_each_conversation_on_one_side_and_is_stable(con, tmp_path):
    chat = [("user", "u1"), ("assistant", "a1"), ("user", "u2"), ("assistant", "a2"), ("user", "u3")]
    load(con, tmp_path, [[(role, f"{text} {_letters(i)}") for role, text in chat] for i in range(40)])

    first = extract_interactions(con, InteractionConfig(validation_fraction=0.5))
    splits = con.execute("SELECT interaction_id, split FROM interactions ORDER BY 1").fetchall()
    second = extract_interactions(con, InteractionConfig(validation_fraction=0.5))

    straddling = con.execute(
        "SELECT count(*) FROM (SELECT conversation_id FROM interactions GROUP BY 1 HAVING count(DISTINCT split) > 1)"
    ).fetchall()[0][0]
    assert straddling == 0
    assert first.total == second.total == 80 and first.train + first.validation == 80
    assert 0 < first.validation < 80  # both sides populated at 50%
    assert con.execute("SELECT interaction_id, split FROM interactions ORDER BY 1").fetchall() == splits


def test_split_depends_on_content_not_on_where_the_file_lives(tmp_path, monkeypatch):
    """Conversation ids hash the source path; the split must not, or moving the inbox reshuffles it."""
    chats = [[("user", f"question {_letters(i)}"), ("assistant", f"answer {_letters(i)}"), ("user", "why")] for i in range(30)]
    by_content = []
    for place in ("here", "somewhere/else"):
        (tmp_path / place).mkdir(parents=True)
        monkeypatch.setenv("SDPO_HOME", str(tmp_path / place / "home"))
        with connect() as con:
            load(con, tmp_path / place, chats)
            extract_interactions(con, InteractionConfig(validation_fraction=0.5))
            by_content.append(sorted(con.execute("SELECT response, split FROM interactions").fetchall()))
    assert len(by_content[0]) == 30 and by_content[0] == by_content[1]
    assert {split for _, split in by_content[0]} == {"train", "validation"}


def test_near_duplicates_share_a_side_of_the_split(con, tmp_path):
    """A prompt re-sent with other casing, digits or punctuation must not leak across train/validation."""
    originals = [[("user", f"Explain {_letters(i)} please"), ("assistant", f"Here is {_letters(i)}."), ("user", "Shorter.")]
                 for i in range(30)]
    resent = [[("user", f"EXPLAIN {_letters(i)} PLEASE!! ({i})"), ("assistant", f"here is {_letters(i)}"), ("user", "no, longer")]
              for i in range(30)]
    load(con, tmp_path, originals + resent)
    extract_interactions(con, InteractionConfig(validation_fraction=0.5))
    pairs = con.execute("""
        SELECT count(DISTINCT c.conversation_id), count(DISTINCT c.near_duplicate_of), count(DISTINCT i.split)
        FROM conversations c JOIN interactions i USING (conversation_id) GROUP BY c.near_key""").fetchall()
    assert pairs == [(2, 1, 1)] * 30  # each original and its re-send: flagged, and on one side
    assert set(dict(con.execute("SELECT split, count(*) FROM interactions GROUP BY 1").fetchall())) == {"train", "validation"}


def test_only_the_given_partitions_are_rebuilt(con, tmp_path):
    lines = [json.dumps({"timestamp": f"2024-02-0{d}T00:00:00Z", "messages": [
        {"role": "user", "content": f"q{d}"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "o"}]})
        for d in (1, 2)]
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    ingest_files(con, [tmp_path / "p.jsonl"])
    build_conversations(con, CleaningConfig(min_messages=2, languages=[]))
    assert extract_interactions(con, InteractionConfig()).total == 2

    con.execute("DELETE FROM interactions WHERE partition_date = DATE '2024-02-01'")
    result = extract_interactions(con, InteractionConfig(), partitions=["2024-02-02"])
    assert (result.conversations, result.total, result.partitions) == (1, 1, ["2024-02-02"])
    days = con.execute("SELECT partition_date::VARCHAR FROM interactions").fetchall()
    assert days == [("2024-02-02",)]


def test_rebuilding_a_days_conversations_takes_its_old_triples_with_them(con, tmp_path):
    """When a changed file's conversations are rebuilt and a failed check then blocks the interactions stage,
    the day must not keep triples (and keep verdicts) of conversations that are gone."""
    cleaning = CleaningConfig(min_messages=2, languages=[])
    load(con, tmp_path, [[("user", "u1"), ("assistant", "a1"), ("user", "too long")],
                         [("user", "hello there"), ("assistant", "hi")]], cleaning)  # kept, but no follow-up
    extract_interactions(con, InteractionConfig())
    count = "SELECT (SELECT count(*) FROM interactions), (SELECT count(*) FROM quarantine WHERE stage = 'interactions')"
    assert con.execute(count).fetchone() == (1, 1)
    build_conversations(con, cleaning)  # the interactions stage does not follow
    assert con.execute(count).fetchone() == (0, 0)
    extract_interactions(con, InteractionConfig())
    assert con.execute(count).fetchone() == (1, 1)
