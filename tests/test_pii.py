"""PII redaction before anything leaves raw_records, counts per conversation, salted user ids, the check."""

from __future__ import annotations

import json

import pytest

from sdpo_platform.checks import check_pii
from sdpo_platform.cleaning import build_conversations
from sdpo_platform.config import CleaningConfig
from sdpo_platform.ingest import ingest_files
from sdpo_platform.pii import redact
from sdpo_platform.warehouse import connect


@pytest.fixture()
def con(sdpo_home):
    connection = connect()
    yield connection
    connection.close()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("write to jane.doe+work@mail.example.co.uk today", "write to <EMAIL> today"),
        ("call +1 (555) 123-4567 or 555.123.4567", "call <PHONE> or <PHONE>"),
        ("UK office +44 20 7946 0958", "UK office <PHONE>"),
        ("card 4111 1111 1111 1111 exp 12/27", "card <CREDIT_CARD> exp 12/27"),
        ("card 4111-1111-1111-1111", "card <CREDIT_CARD>"),
        ("server 10.0.0.255 and 2001:db8:85a3::8a2e:370:7334", "server <IP_ADDRESS> and <IP_ADDRESS>"),
        ("key sk-proj-AbCdEfGhIjKlMnOpQrStUvWxYz012345", "key <API_KEY>"),
        ("aws AKIAIOSFODNN7EXAMPLE ok", "aws <API_KEY> ok"),
        ("gh ghp_" + "a" * 36, "gh <API_KEY>"),
        ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig", "Authorization: <BEARER_TOKEN>"),
        ("db postgres://admin:s3cr3t@db.internal:5432/app now", "db <URL_WITH_CREDENTIALS> now"),
    ],
)
def test_each_pattern_gets_its_typed_placeholder(con, text, expected):
    assert redact(con, text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "card 4111 1111 1111 1112 fails Luhn",  # 16 digits, not a card: left to the phone rule only if it looks like one
        "in 2023-04-09 at 12:30 we sold 10 000 000 units",
        "see https://example.com/path?x=1 and C++ std::vector",
        "order 1234567890123",  # 13 digits, Luhn-invalid
    ],
)
def test_non_pii_numbers_and_urls_stay(con, text):
    redacted = redact(con, text)
    assert "<CREDIT_CARD>" not in redacted and "<URL_WITH_CREDENTIALS>" not in redacted and "<EMAIL>" not in redacted
    if "1112" not in text:
        assert redacted == text


def test_cleaning_redacts_counts_per_conversation_and_hashes_user_ids(con, tmp_path):
    record = {
        "conversation_hash": "h1", "hashed_ip": "203.0.113.9", "timestamp": "2024-05-01 08:00:00+00:00",
        "conversation": [
            {"role": "user", "content": "My email is bob@example.com and my card is 4111 1111 1111 1111. What is the capital of France?"},
            {"role": "assistant", "content": "Paris. Please do not share bob@example.com or cards here."},
            {"role": "user", "content": "ok, my server is 192.168.1.20, thanks for the answer"},
        ],
    }
    (tmp_path / "w.jsonl").write_text(json.dumps(record) + "\n")
    ingest_files(con, [tmp_path / "w.jsonl"])

    build_conversations(con, CleaningConfig(user_id_salt="pepper"))
    messages, counts, user_hash = con.execute("SELECT messages, pii_counts, user_hash FROM conversations").fetchall()[0]
    text = " ".join(m["content"] for m in messages)
    assert "bob@example.com" not in text and "4111" not in text and "192.168.1.20" not in text
    assert text.count("<EMAIL>") == 2 and "<CREDIT_CARD>" in text and "<IP_ADDRESS>" in text
    assert counts == {"email": 2, "credit_card": 1, "ip_address": 1}
    assert "203.0.113.9" not in user_hash and len(user_hash) == 64

    build_conversations(con, CleaningConfig(user_id_salt="another salt"))
    assert con.execute("SELECT user_hash FROM conversations").fetchall()[0][0] != user_hash
    assert check_pii(con, ["2024-05-01"]).passed


def test_quarantine_details_are_redacted_too(con, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"messages": [{"role": "user", "content": "x"}]}\n{broken json from alice@corp.com\n')
    ingest_files(con, [tmp_path / "bad.jsonl"])
    build_conversations(con, CleaningConfig())
    details = [row[0] for row in con.execute("SELECT detail FROM quarantine WHERE stage = 'conversations'").fetchall()]
    assert any("<EMAIL>" in d for d in details) and not any("alice@corp.com" in d for d in details)


def test_check_fails_only_the_partition_where_a_pattern_survives(con, tmp_path):
    lines = [json.dumps({"created": created, "messages": [
        {"role": "user", "content": f"What is the capital of France, and why is it there? ({created})"},
        {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "Why is that so?"}]})
        for created in (1714550400, 1714636800)]  # 2024-05-01, 2024-05-02
    (tmp_path / "two_days.jsonl").write_text("\n".join(lines) + "\n")
    ingest_files(con, [tmp_path / "two_days.jsonl"])
    build_conversations(con, CleaningConfig())
    assert check_pii(con).passed and con.execute("SELECT count(*) FROM conversations").fetchall() == [(2,)]
    # a leak slipped in by hand (e.g. a buggy upstream writer) on one day only
    con.execute("""UPDATE conversations SET messages = list_append(messages, {'role': 'user', 'content': 'mail me: eve@example.org'})
                   WHERE partition_date = DATE '2024-05-02'""")
    report = check_pii(con)
    assert not report.passed
    assert check_pii(con, ["2024-05-01"]).passed and not check_pii(con, ["2024-05-02"]).passed
