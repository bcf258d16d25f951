"""PII redaction before anything leaves raw_records, counts per conversation, salted user ids, the check."""

from __future__ import annotations

import json
import re

import pytest

from sdpo_platform.checks import check_pii
from sdpo_platform.cleaning import build_conversations
from sdpo_platform.config import CleaningConfig
from sdpo_platform.ingest import ingest_files
from sdpo_platform import pii
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


def clean_two_days(con, tmp_path, **fields):
    """One conversation on 2024-05-01 and one on 2024-05-02 (`fields` formatted with its timestamp), cleaned."""
    lines = [json.dumps({"created": created, **{k: v.format(created=created) for k, v in fields.items()}, "messages": [
        {"role": "user", "content": f"What is the capital of France, and why is it there? ({created})"},
        {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "Why is that so?"}]})
        for created in (1714550400, 1714636800)]  # 2024-05-01, 2024-05-02
    (tmp_path / "two_days.jsonl").write_text("\n".join(lines) + "\n")
    ingest_files(con, [tmp_path / "two_days.jsonl"])
    build_conversations(con, CleaningConfig())


def test_check_fails_only_the_partition_where_a_pattern_survives(con, tmp_path):
    clean_two_days(con, tmp_path)
    assert check_pii(con).passed and con.execute("SELECT count(*) FROM conversations").fetchall() == [(2,)]
    # a leak slipped in by hand (e.g. a buggy upstream writer) on one day only
    con.execute("""UPDATE conversations SET messages = list_append(messages, {'role': 'user', 'content': 'mail me: eve@example.org'})
                   WHERE partition_date = DATE '2024-05-02'""")
    report = check_pii(con)
    assert not report.passed
    leaked_id = con.execute("SELECT conversation_id FROM conversations WHERE partition_date = DATE '2024-05-02'").fetchone()[0]
    assert report.description.endswith(f"PII left on 2024-05-02: ['email'] in 1 text(s), e.g. ['{leaked_id}']")  # where and what
    assert check_pii(con, ["2024-05-01"]).passed and not check_pii(con, ["2024-05-02"]).passed


# --- leaks the check could not see (it runs the same patterns) -------------------------------------------------
LEAKS = [
    # a trailing number does not hide a card; a card is found before the phone rule sees its groups
    ("Please charge my card 4111111111111111 123 for the order", "Please charge my card <CREDIT_CARD> 123 for the order"),
    ("My card is 5105 1051 0510 5100 10/25 and it is declined", "My card is <CREDIT_CARD> 10/25 and it is declined"),
    ("amex 3782 822463 10005, visa19 4111-1111-1111-1111-003", "amex <CREDIT_CARD>, visa19 <CREDIT_CARD>"),
    # IPv6 with one leading group or none
    ("ping fe80::1ff:fe23:4567:890a now", "ping <IP_ADDRESS> now"),
    ("listen on ::1 and fe80::1%eth0 and ::ffff:192.168.1.1", "listen on <IP_ADDRESS> and <IP_ADDRESS>%eth0 and <IP_ADDRESS>"),
    # national formats: trunk 0, `+cc (0)`, IN mobiles
    ("UK mobile 07700 900123, Berlin 030 1234567", "UK mobile <PHONE>, Berlin <PHONE>"),
    ("DE +49 (0)30 12345678 or AU 0412 345 678", "DE <PHONE> or AU <PHONE>"),
    ("IN 98765 43210, JP 03-1234-5678, FR 01 23 45 67 89", "IN <PHONE>, JP <PHONE>, FR <PHONE>"),
    # keys
    ("config: aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY what is wrong",
     "config: aws_secret_access_key = <API_KEY> what is wrong"),
    ('{"SecretAccessKey": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"}', '{"SecretAccessKey": "<API_KEY>"}'),
    ("stripe sk_live_51H8abcdefghijklmnopqrstuv and sk_test_4eC39HqLyjWDarjtT1zdp7dc", "stripe <API_KEY> and <API_KEY>"),
    ("rk_live_51H8abcdefghijklmnopqrstuv pk_live_51H8abcdefghijklmnopqrstuv", "<API_KEY> <API_KEY>"),
    ("The header is Authorization: Basic dXNlcjpwYXNzd29yZA== but", "The header is Authorization: <BASIC_AUTH> but"),
    ("token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.dBjftJeZ4CVPmB92K27uhbUJU1p1r_wW1gFWFOEjXk ok", "token <API_KEY> ok"),
]


@pytest.mark.parametrize("text, expected", LEAKS)
def test_realistic_variants_are_redacted_and_the_check_sees_them(con, text, expected):
    assert redact(con, text) == expected
    # the check's macro finds the raw text, not the redacted one
    found = con.execute("SELECT sdpo_pii_found($t), sdpo_pii_found(sdpo_redact_pii($t))", {"t": text}).fetchall()[0]
    assert found[0] and found[1] == []


@pytest.mark.parametrize(
    "text",
    [
        "How does Bearer authentication work in a REST API?",
        "The ring bearer standing next to the groom was his nephew.",
        "BEARER TOKENS ARE SENT IN THE HEADER",
        "Use Authorization: Basic authentication only over TLS",
        "the population in 2019 2020 2021 2022 was 1000 1200 1350 1500",
        "Pi is 3.141 5926 5358 9793 and it goes on",
        "C++ std::vector<int> and a::b::c, dead::beef, at 12:30:45, ratio 3:2",
        "in 2023-04-09 we sold 10 000 000 units, 1 000 000 000 in total, 10 050 000 000 later",
        "the secret_access_key is missing from the file",
    ],
)
def test_near_misses_stay(con, text):
    assert redact(con, text) == text


def test_bearer_needs_a_token_that_looks_like_a_credential(con):
    assert redact(con, "Bearer abcdef1234567890") == "<BEARER_TOKEN>"  # has a digit
    assert redact(con, "bearer AbCdEfGhIjKlMnOpQrStUv") == "<BEARER_TOKEN>"  # 20+, lower and upper case
    assert redact(con, "bearer abcdefghijklmnopqrstuvwxyz") == "bearer abcdefghijklmnopqrstuvwxyz"  # a (long) word
    assert redact(con, "ring Bearer standing, Bearer x1y2z3w4v5") == "ring Bearer standing, <BEARER_TOKEN>"


def test_new_kinds_are_counted_per_conversation(con, tmp_path):
    record = {"messages": [
        {"role": "user", "content": "curl -H 'Authorization: Basic dXNlcjpwYXNzd29yZA==' with sk_live_51H8abcdefghijklmnopqrstuv "
                                    "from fe80::1ff:fe23:4567:890a, call 07700 900123"},
        {"role": "assistant", "content": "Do not share Bearer abcdef1234567890 or 4111111111111111 123 here."},
        {"role": "user", "content": "ok, thanks for the answer, that helps a lot"},
    ]}
    (tmp_path / "k.jsonl").write_text(json.dumps(record) + "\n")
    ingest_files(con, [tmp_path / "k.jsonl"])
    build_conversations(con, CleaningConfig())
    counts = con.execute("SELECT pii_counts FROM conversations").fetchall()[0][0]
    assert counts == {"basic_auth": 1, "api_key": 1, "ip_address": 1, "phone": 1, "bearer_token": 1, "credit_card": 1}


def test_check_scans_source_ids(con, tmp_path):
    clean_two_days(con, tmp_path, conversation_id="conv-{created}")
    assert check_pii(con).passed and con.execute("SELECT count(source_id) FROM conversations").fetchall() == [(2,)]
    # an id holding PII, whoever wrote it (the cleaning stage redacts it with `sdpo_redact_pii(source_id)`)
    con.execute("UPDATE conversations SET source_id = 'jane.doe@example.com' WHERE partition_date = DATE '2024-05-02'")
    assert check_pii(con, ["2024-05-01"]).passed and not check_pii(con, ["2024-05-02"]).passed
    assert con.execute("SELECT sdpo_redact_pii(source_id) FROM conversations WHERE partition_date = DATE '2024-05-02'"
                       ).fetchall() == [("<EMAIL>",)]


def test_card_redaction_is_the_old_replace_per_candidate_without_its_quadratic_cost(con):
    """Splitting on candidates and rebuilding gives what one `replace()` per Luhn-valid candidate gave."""
    pii.install_macros(con)
    parts = ["card 4111 1111 1111 1111 exp 12/27", "bad 4111 1111 1111 1112", "ok 5105-1051-0510-5100.",
             "order 1234567890123", "amex 3782 822463 10005", "x 4012888888881881!", "none 12 345 6789", "end"]
    text = " ".join(parts[i % len(parts)] for i in range(400))  # 200 valid cards among 300 candidates
    step = pii._replace_step("$t", "credit_card", "<CREDIT_CARD>", pii.CREDIT_CARD, (pii.DIGITS,))
    old = ("list_reduce(list_filter(regexp_extract_all($t, $p), lambda c: sdpo_luhn_valid(c)), "
           "lambda acc, c: replace(acc, c, '<CREDIT_CARD>'), $t)")
    new, before = con.execute(f"SELECT {step}, {old}", {"t": text, "p": pii.CREDIT_CARD}).fetchall()[0]
    assert new == before and new.count("<CREDIT_CARD>") == 200 and "4111 1111 1111 1112" in new


def test_patterns_keep_only_their_label_and_their_cues_are_in_every_match():
    samples = [text for text, _ in LEAKS] + ["Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig",
                                             "db postgres://admin:s3cr3t@db.internal:5432/app", "mail bob@example.com"]
    for kind, _, pattern, cues in pii.PATTERNS:
        compiled = re.compile(pattern)  # RE2 syntax used here is a subset of Python's
        assert compiled.groups == (1 if "(?P<keep>" in pattern else 0), kind  # `\1` in the replacement is the label
        for sample in samples:
            for match in compiled.finditer(sample):
                assert any(cue in match.group(0) for cue in cues if cue != pii.DIGITS) or (
                    pii.DIGITS in cues and re.search(r"\d", match.group(0))), (kind, match.group(0))
