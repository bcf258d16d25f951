"""Every kind of bad input gets a clear reason in quarantine: never a crash, never a silent loss."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from sdpo_platform.checks import check_conversations
from sdpo_platform.cleaning import build_conversations
from sdpo_platform.config import CleaningConfig, IngestConfig
from sdpo_platform.ingest import ingest_files
from sdpo_platform.warehouse import connect, stats

GOOD_TURNS = [("user", "What is the capital of France and why is it there?"), ("assistant", "Paris, for historical reasons."),
              ("user", "Why is that the answer?")]


def chat(turns=GOOD_TURNS, **extra) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns], **extra}


@pytest.fixture()
def con(sdpo_home):
    connection = connect()
    yield connection
    connection.close()


def run(con, path, cleaning=CleaningConfig(), ingest=None):
    result = ingest_files(con, [path], cfg=ingest)
    cleaned = build_conversations(con, cleaning)
    return result, cleaned


def reasons(con) -> dict[int, str]:
    return dict(con.execute(
        "SELECT line_no, reason FROM quarantine WHERE stage = 'conversations' AND level = 'record' ORDER BY line_no").fetchall())


def assert_reconciled(con):
    numbers = stats(con)
    assert numbers["raw_records"] == numbers["conversations_kept"] + numbers["quarantined"]
    assert sum(numbers["quarantine_by_reason"].values()) == numbers["quarantined"]
    assert check_conversations(con, CleaningConfig()).failures == [] or numbers["conversations_kept"] == 0


def test_invalid_json_lines(con, tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(chat()) + '\n{"messages": [\n' + "plain words\n")
    _, cleaned = run(con, path)
    assert reasons(con) == {2: "invalid_json", 3: "invalid_json"} and cleaned.kept == 1
    detail = con.execute("SELECT detail FROM quarantine WHERE line_no = 3").fetchall()[0][0]
    assert detail == "not valid JSON: plain words"
    assert_reconciled(con)


def test_invalid_utf8_line_is_kept_and_quarantined(con, tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(json.dumps(chat()).encode() + b'\n{"messages": "caf\xe9"}\n')
    ingested, cleaned = run(con, path)
    assert ingested.records_new == 2 and reasons(con) == {2: "invalid_utf8"}
    raw = con.execute("SELECT raw_text, read_error FROM raw_records WHERE line_no = 2").fetchall()[0]
    assert raw == ('{"messages": "caf\ufffd"}', "invalid_utf8")
    assert_reconciled(con)


def test_wrong_content_types(con, tmp_path):
    records = [chat([("user", 42), ("assistant", "a"), ("user", "b")]),
               chat([("user", {"text": "hi"}), ("assistant", "a"), ("user", "b")]),
               chat([("user", "q"), ("assistant", None), ("user", "b")]),
               {"messages": "not a list"}]
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(map(json.dumps, records)) + "\n")
    run(con, path)
    assert reasons(con) == {1: "invalid_content", 2: "invalid_content", 3: "invalid_content", 4: "unknown_schema"}
    details = [r[0] for r in con.execute("SELECT detail FROM quarantine ORDER BY line_no").fetchall()]
    assert details[:3] == ["message 0 content is UBIGINT", "message 0 content is OBJECT", "message 1 content is NULL"]
    assert_reconciled(con)


def test_unknown_roles_and_missing_fields(con, tmp_path):
    records = [chat([("user", "q"), ("robot", "beep"), ("user", "b")]),
               {"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]},
               {"messages": [{"content": "no role"}, {"role": "assistant", "content": "a"}]},
               {"id": "no conversation at all"}]
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(map(json.dumps, records)) + "\n")
    run(con, path)
    assert reasons(con) == {1: "unknown_role", 2: "invalid_content", 3: "unknown_role", 4: "unknown_schema"}
    details = dict(con.execute("SELECT line_no, detail FROM quarantine WHERE stage = 'conversations'").fetchall())
    assert details[1] == "message 1 has role robot" and details[2] == "message 0 content is missing"
    assert details[3] == "message 0 has role NULL"
    assert_reconciled(con)


def test_empty_file_and_whitespace_file(con, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.json").write_text("  \n\n ")
    result = ingest_files(con, [tmp_path / "empty.jsonl", tmp_path / "blank.json"])
    assert result.records_new == 0 and not result.errors
    rows = con.execute("SELECT reason, level FROM quarantine ORDER BY source_file").fetchall()
    assert rows == [("empty_file", "file"), ("empty_file", "file")]
    assert ingest_files(con, [tmp_path / "empty.jsonl"]).files_unchanged == 1


def test_ten_megabyte_message(con, tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_text(json.dumps(chat([("user", "x " * 5_000_000), ("assistant", "a"), ("user", "b")])) + "\n"
                    + json.dumps(chat()) + "\n")
    _, cleaned = run(con, path)
    assert reasons(con) == {1: "message_too_long"} and cleaned.kept == 1
    assert con.execute("SELECT detail FROM quarantine WHERE line_no = 1").fetchall()[0][0] == "longest message 10000000 chars > 4096"
    # with a lower ingest limit the record is not even held in full
    con.execute("DELETE FROM source_files")
    con.execute("DELETE FROM raw_records")
    _, cleaned = run(con, path, ingest=IngestConfig(max_record_bytes=1_000_000))
    assert reasons(con) == {1: "record_too_large"}
    assert con.execute("SELECT length(raw_text) FROM raw_records WHERE line_no = 1").fetchall() == [(4096,)]
    assert_reconciled(con)


def test_file_in_an_unknown_format_is_named_in_the_error(con, tmp_path):
    text = tmp_path / "orders.jsonl"
    text.write_text('{"order": 1, "sku": "A"}\n{"order": 2, "sku": "B"}\n')
    binary = tmp_path / "photo.png"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")

    result = ingest_files(con, [text, binary])

    assert len(result.errors) == 2
    assert str(text.resolve()) in result.errors[0] and "unknown_format" in result.errors[0]
    assert str(binary.resolve()) in result.errors[1] and "binary" in result.errors[1]
    assert result.records_new == 2  # the text file's records are kept for inspection, then quarantined
    build_conversations(con, CleaningConfig())
    assert reasons(con) == {1: "unknown_schema", 2: "unknown_schema"}
    detail = con.execute("SELECT detail FROM quarantine WHERE level = 'file' AND source_file LIKE '%orders%'").fetchall()[0][0]
    assert "orders.jsonl" in detail and "order, sku" in detail
    assert_reconciled(con)


def test_duplicate_conversation_ids_with_different_content(con, tmp_path):
    first = {"conversation_hash": "same", "conversation": [{"role": r, "content": c} for r, c in GOOD_TURNS]}
    second = {"conversation_hash": "same", "conversation": [{"role": r, "content": c + " (edited)"} for r, c in GOOD_TURNS]}
    path = tmp_path / "w.jsonl"
    path.write_text(json.dumps(first) + "\n" + json.dumps(second) + "\n" + json.dumps(first) + "\n")
    run(con, path)
    assert reasons(con) == {2: "duplicate_id", 3: "duplicate"}
    assert_reconciled(con)


def test_conversations_that_start_with_the_assistant(con, tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(chat([("system", "s"), ("assistant", "Hello! How can I help?")] + GOOD_TURNS)) + "\n")
    run(con, path)
    assert reasons(con) == {1: "starts_with_assistant"}
    assert_reconciled(con)


def test_blank_messages_are_dropped_and_recorded_at_message_level(con, tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(chat([GOOD_TURNS[0], ("user", "   "), *GOOD_TURNS[1:]])) + "\n")
    _, cleaned = run(con, path)
    assert cleaned.kept == 1 and cleaned.messages_dropped == 1
    rows = con.execute("SELECT reason, level, message_index FROM quarantine").fetchall()
    assert rows == [("empty_message", "message", 1)]
    assert_reconciled(con)


def numbered_chats(n: int) -> list[dict]:
    """`n` conversations that differ (so none is a duplicate of another)."""
    return [chat([("user", f"Question {i}: what is the capital of France and why is it there?"), *GOOD_TURNS[1:]]) for i in range(n)]


@pytest.mark.parametrize("container", ["jsonl", "json", "json.gz"])
def test_invalid_utf8_costs_one_record_in_every_text_container(con, tmp_path, container):
    """One bad byte in a JSON array is one `invalid_utf8` record, as in JSONL, not a rejected file."""
    first, last = (json.dumps(record).encode() for record in numbered_chats(2))
    bad = b'{"messages": "caf\xe9"}'
    data = b"\n".join([first, bad, last]) + b"\n" if container == "jsonl" else b"[" + b",\n".join([first, bad, last]) + b"]"
    path = tmp_path / f"a.{container}"
    path.write_bytes(gzip.compress(data) if container.endswith(".gz") else data)

    ingested, cleaned = run(con, path)

    assert ingested.records_new == 3 and ingested.files_rejected == 0 and not ingested.errors
    assert reasons(con) == {2: "invalid_utf8"} and cleaned.kept == 2
    raw = con.execute("SELECT raw_text, read_error FROM raw_records WHERE line_no = 2").fetchall()[0]
    assert raw == ('{"messages": "caf\ufffd"}', "invalid_utf8")
    assert_reconciled(con)


@pytest.mark.parametrize("gzipped", [False, True])
def test_invalid_utf8_costs_one_record_in_parquet_too(con, tmp_path, gzipped):
    """DuckDB's Parquet reader stops at the first string that is not UTF-8 (the file used to be rejected
    whole); the row holding it is kept, flagged and quarantined, nested strings included, and the sensor's
    day query reads the file too."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sdpo_platform.ingest import record_days

    chats = numbered_chats(3)
    texts = [m["content"].encode() for c in chats for m in c["messages"]]
    texts[4] = b"Paris, caf\xe9 au lait."  # record 2's assistant turn: a Latin-1 byte
    offsets = pa.array([0, *np.cumsum([len(t) for t in texts])], pa.int32()).buffers()[1]
    content = pa.Array.from_buffers(pa.string(), len(texts), [None, offsets, pa.py_buffer(b"".join(texts))])  # unvalidated
    roles = pa.array([m["role"] for c in chats for m in c["messages"]])
    messages = pa.ListArray.from_arrays(pa.array([0, 3, 6, 9], pa.int32()), pa.StructArray.from_arrays([roles, content], ["role", "content"]))
    path = tmp_path / "chats.parquet"
    pq.write_table(pa.table({"messages": messages, "timestamp": ["2026-03-01T10:00:00Z"] * 3}), path)
    if gzipped:  # read through a decompressed copy, by ingestion and by the sensor alike
        path = path.rename(tmp_path / "chats.parquet.gz")
        path.write_bytes(gzip.compress(path.read_bytes()))

    ingested, cleaned = run(con, path)

    assert ingested.records_new == 3 and ingested.files_rejected == 0 and not ingested.errors
    assert reasons(con) == {2: "invalid_utf8"} and cleaned.kept == 2
    raw_text, read_error = con.execute("SELECT raw_text, read_error FROM raw_records WHERE line_no = 2").fetchall()[0]
    assert read_error == "invalid_utf8" and json.loads(raw_text)["messages"][1]["content"] == "Paris, caf\ufffd au lait."
    stored_days = [d for (d,) in con.execute("SELECT DISTINCT partition_date::VARCHAR FROM raw_records ORDER BY 1").fetchall()]
    assert record_days([path]) == stored_days and "2026-03-01" in stored_days  # the bad row sits on the arrival day
    assert_reconciled(con)


def test_parquet_columns_named_like_the_readers_own_names_are_read_as_data(con, tmp_path):
    """`to_json(t)` took a column named `t` for the row, and DuckDB's own `file_row_number` clashed with a
    column of that name (the file was rejected): both files now ingest whole, their columns in the JSON."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    messages = [[{"role": "user", "content": "Hi there, what is the capital of France?"},
                 {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "Thanks!"}]]
    for name in ("t", "file_row_number"):
        path = tmp_path / f"{name}.parquet"
        pq.write_table(pa.table({name: ["2026-01-05T10:00:00Z"], "messages": messages}), path)
        ingested = ingest_files(con, [path])
        assert ingested.records_new == 1 and ingested.files_rejected == 0, name
        raw = con.execute("SELECT raw_text FROM raw_records WHERE source_file = ?", [str(path.resolve())]).fetchone()[0]
        assert json.loads(raw) == {name: "2026-01-05T10:00:00Z", "messages": messages[0]}


@pytest.mark.parametrize(("container", "cut", "stored", "complete"), [
    ("jsonl.gz", 12, 10, 9),  # the last line is cut in two: stored, then quarantined as invalid_json
    ("jsonl.gz", 4, 10, 10),  # only the gzip trailer is missing: every record is whole
    ("json.gz", 12, 9, 9),  # the array's cut element is skipped
])
def test_cut_off_gzip_keeps_the_records_before_the_cut(con, tmp_path, container, cut, stored, complete):
    records = numbered_chats(10)
    text = "\n".join(map(json.dumps, records)) + "\n" if container == "jsonl.gz" else json.dumps(records, indent=1)
    whole = gzip.compress(text.encode())
    path = tmp_path / f"logs.{container}"
    path.write_bytes(whole[:-cut])

    ingested, cleaned = run(con, path)

    assert ingested.records_new == stored and ingested.files_rejected == 0 and cleaned.kept == complete
    assert reasons(con) == ({} if stored == complete else {stored: "invalid_json"})
    rows = con.execute("SELECT reason, detail FROM quarantine WHERE level = 'file'").fetchall()
    assert [reason for reason, _ in rows] == ["truncated_file"] and f"{stored} records read up to the cut" in rows[0][1]
    assert stats(con)["files_rejected"] == 0 and stats(con)["files_by_reason"] == {"truncated_file": 1}
    assert_reconciled(con)

    path.write_bytes(whole)  # the complete file arrives: its note goes with the rows it described
    assert ingest_files(con, [path]).records_new == 10
    assert con.execute("SELECT count(*) FROM quarantine WHERE level = 'file'").fetchall() == [(0,)]


def test_files_without_records_are_empty_files(con, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = {"empty.jsonl": b"", "blank.json": b"  \n\n ", "form_feed.jsonl": b"\x0c\n \x0b\n", "array.json": b"[ ]\n",
             "array.json.gz": gzip.compress(b"[]"), "cut_array.json": b'[{"messages": '}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    pq.write_table(pa.table({"messages": pa.array([], pa.string())}), tmp_path / "no_rows.parquet")
    paths = sorted(path for path in tmp_path.iterdir() if path.is_file())

    result = ingest_files(con, paths)

    assert result.records_new == 0 and not result.errors and result.files_rejected == 0
    rows = dict(con.execute("SELECT regexp_extract(source_file, '[^/]+$'), reason FROM quarantine WHERE level = 'file'").fetchall())
    assert rows == {**{name: "empty_file" for name in files}, "no_rows.parquet": "empty_file", "cut_array.json": "truncated_json_array"}
    details = dict(con.execute("SELECT regexp_extract(source_file, '[^/]+$'), detail FROM quarantine").fetchall())
    assert details["array.json"].endswith("no records (an empty JSON array)")
    assert details["no_rows.parquet"].endswith("no records (a Parquet file without rows)")
    assert ingest_files(con, paths).files_unchanged == len(paths)
