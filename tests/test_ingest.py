"""Raw ingestion: formats, idempotency, unreadable files, and the ShareGPT slice writer."""

from __future__ import annotations

import gzip
import io
import json

import pytest
from pathlib import Path

from sdpo_platform.ingest import JsonArrayReader, ingest_files, ingest_inbox
from sdpo_platform.paths import inbox_dir
from sdpo_platform.sharegpt import sharegpt_path, write_sharegpt_slice
from sdpo_platform.warehouse import connect, stats

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.fixture()
def con(sdpo_home):
    connection = connect()
    yield connection
    connection.close()


@pytest.fixture()
def logs(tmp_path):
    """Where the tests write their log files (tmp_path itself also holds the data root)."""
    path = tmp_path / "logs"
    path.mkdir()
    return path


def raw_rows(con):
    return con.execute("SELECT source_file, line_no, raw_text FROM raw_records ORDER BY source_file, line_no").fetchall()


def test_jsonl_keeps_invalid_lines_skips_blank_ones_and_numbers_physical_lines(con, logs):
    path = logs / "day.jsonl"
    path.write_text(json.dumps(CHAT) + "\n\n   \n{not json\r\n" + json.dumps(CHAT) + "\n")

    result = ingest_files(con, [path])

    assert result.records_new == 3 and result.records_total == 3 and result.files_rejected == 0
    assert result.by_file == {str(path.resolve()): 3}
    assert [(line, text) for _, line, text in raw_rows(con)] == [
        (1, json.dumps(CHAT)), (4, "{not json"), (5, json.dumps(CHAT))
    ]


def test_ingesting_the_same_files_twice_adds_nothing(con, logs):
    (logs / "a.jsonl").write_text(json.dumps(CHAT) + "\n")
    (logs / "notes.txt").write_text("hello")
    first = ingest_inbox(con, logs)
    second = ingest_inbox(con, logs)

    assert (first.records_new, second.records_new) == (2, 0)  # the .txt is text: kept for inspection
    assert second.records_total == 2 and second.files_unchanged == 2
    assert con.execute("SELECT reason FROM quarantine").fetchall() == [("unknown_format",)]  # the .txt, once
    assert any("notes.txt" in error for error in first.errors) and not second.errors


def test_gzip_and_json_array_formats(con, logs):
    with gzip.open(logs / "a.jsonl.gz", "wt") as out:
        out.write(json.dumps(CHAT) + "\n" + json.dumps({"x": 1}) + "\n")
    with gzip.open(logs / "b.json.gz", "wt") as out:
        json.dump([CHAT, {"y": 2}], out, indent=2)
    (logs / "c.json").write_text(json.dumps(CHAT))  # a single document is one record

    result = ingest_files(con, sorted(logs.iterdir()))

    assert result.records_new == 5 and result.files_rejected == 0
    texts = [json.loads(text) for _, _, text in raw_rows(con)]
    assert texts == [CHAT, {"x": 1}, CHAT, {"y": 2}, CHAT]


def test_truncated_json_array_keeps_complete_records_and_notes_the_tail(con, logs):
    path = logs / "cut.json"
    path.write_text(json.dumps([CHAT, {"n": 2}, CHAT], indent=1)[:-40])

    result = ingest_files(con, [path])

    assert result.records_new == 2 and result.files_rejected == 0
    assert [line for _, line, _ in raw_rows(con)] == [1, 2]
    reasons = con.execute("SELECT stage, reason FROM quarantine").fetchall()
    assert reasons == [("raw_interaction_logs", "truncated_json_array")]


def test_unreadable_and_unknown_files_are_quarantined_not_raised(con, logs):
    (logs / "bad.jsonl.gz").write_bytes(b"not gzip at all")
    (logs / "latin1.jsonl").write_bytes('{"a": "caf\xe9"}\n'.encode("latin-1"))
    (logs / "data.parquet.bak").write_bytes(b"\x00")
    missing = logs / "missing.jsonl"

    result = ingest_files(con, [*sorted(logs.iterdir()), missing])

    # not-gzip bytes behind .gz: text of no format (kept for inspection); Latin-1 and NUL bytes: binary
    assert result.files == 4 and result.files_rejected == 3 and result.records_new == 1
    rows = con.execute("SELECT reason, detail FROM quarantine WHERE stage = 'raw_interaction_logs' ORDER BY detail").fetchall()
    assert sorted(reason for reason, _ in rows) == ["unknown_format", "unknown_format", "unknown_format", "unreadable_file"]
    assert any("missing.jsonl" in detail for _, detail in rows)
    assert len(result.errors) == 4 and all(str(logs) in error for error in result.errors)
    assert stats(con)["files_rejected"] == result.files_rejected  # one meaning of "rejected" in both reports


def test_stats_count_as_rejected_what_ingest_rejects_and_only_note_an_empty_or_unknown_file(con, logs):
    (logs / "empty.jsonl").write_text("")
    (logs / "other.jsonl").write_text('{"question": "a", "answer": "b"}\n')  # stored, of no known format
    result = ingest_files(con, sorted(logs.iterdir()))
    counts = stats(con)
    assert result.files_rejected == counts["files_rejected"] == 0
    assert counts["files_by_reason"] == {"empty_file": 1, "unknown_format": 1} and len(result.errors) == 1


def test_a_rejection_lasts_only_until_the_path_is_ingested(con, logs):
    """A path's file-level rejection describes its latest attempt: a new rejection replaces it (no pile of rows
    per path) and a successful ingest removes it, so `files_rejected` counts files that are still bad."""

    path = logs / "day.jsonl.gz"
    whole = gzip.compress((json.dumps(CHAT) + "\n").encode())
    path.write_bytes(whole[:-8] + b"\0\0\0\0" + whole[-4:])  # a wrong CRC: unreadable, not merely cut off
    assert ingest_files(con, [path]).files_rejected == ingest_files(con, [path]).files_rejected == 1
    path.write_bytes(b"\x00\x01 binary")
    assert ingest_files(con, [path]).files_rejected == 1
    assert con.execute("SELECT reason FROM quarantine").fetchall() == [("unknown_format",)]  # only the latest

    path.write_bytes(whole)
    result = ingest_files(con, [path])

    assert (result.records_new, result.files_rejected, result.errors) == (1, 0, [])
    assert con.execute("SELECT count(*) FROM quarantine").fetchall() == [(0,)]
    assert stats(con)["files_rejected"] == 0

    path.unlink()  # gone for a while (its stored rows stay), then back as it was: found unchanged, no longer rejected
    assert ingest_files(con, [path]).files_rejected == 1
    path.write_bytes(whole)
    assert ingest_files(con, [path]).files_unchanged == 1 and stats(con)["files_rejected"] == 0


def test_json_array_reader_across_chunk_boundaries():
    records = [{"id": i, "text": "x" * (i * 7)} for i in range(20)] + [12345, "s", None]
    reader = JsonArrayReader(io.StringIO(json.dumps(records, indent=2)), chunk_chars=16)
    assert list(reader) == records and reader.complete and reader.records == len(records)


def test_sharegpt_slice_writes_parseable_original_records(sdpo_home):
    out = inbox_dir() / "sharegpt_slice.jsonl"
    assert write_sharegpt_slice(out, 50) == 50
    lines = out.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 50 and all("conversations" in r and "id" in r for r in records)
    assert records[0]["id"] == "QWJhYvA_0"

    # deterministic, and start shifts the window
    assert write_sharegpt_slice(out, 5, start=45) == 5
    assert [json.loads(line) for line in out.read_text().splitlines()] == records[45:]
    assert sharegpt_path().name == "ShareGPT_V3_unfiltered_cleaned_split.json"
    assert not list(out.parent.glob(".*.tmp"))


def chat_on(day: str, text: str = "What is the capital of France and why?") -> dict:
    return {"timestamp": f"{day}T09:30:00Z", "conversation": [
        {"role": "user", "content": text}, {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "Why is that so?"}]}


def test_partition_is_the_conversation_day_else_file_mtime_else_the_override(con, logs):
    import os

    stamped = logs / "stamped.jsonl"
    stamped.write_text(json.dumps(chat_on("2024-01-31")) + "\n" + json.dumps(chat_on("2024-02-01")) + "\n")
    unstamped = logs / "unstamped.jsonl"
    unstamped.write_text(json.dumps(CHAT) + "\n" + "{broken\n")
    os.utime(unstamped, (1709640000, 1709640000))  # 2024-03-05 12:00 UTC
    forced = logs / "forced.jsonl"
    forced.write_text(json.dumps(chat_on("2024-01-31")) + "\n")

    first = ingest_files(con, [stamped, unstamped])
    second = ingest_files(con, [forced], partition="2024-06-01")

    assert first.partitions == ["2024-01-31", "2024-02-01", "2024-03-05"] and second.partitions == ["2024-06-01"]
    rows = con.execute("SELECT source_file, line_no, partition_date::VARCHAR FROM raw_records ORDER BY 1, 2").fetchall()
    assert [(Path(f).name, line, day) for f, line, day in rows] == [
        ("forced.jsonl", 1, "2024-06-01"), ("stamped.jsonl", 1, "2024-01-31"), ("stamped.jsonl", 2, "2024-02-01"),
        ("unstamped.jsonl", 1, "2024-03-05"), ("unstamped.jsonl", 2, "2024-03-05"),
    ]


def test_changed_file_replaces_its_rows_and_reports_old_and_new_partitions(con, logs):
    path = logs / "day.jsonl"
    path.write_text(json.dumps(chat_on("2024-01-01")) + "\n" + json.dumps(chat_on("2024-01-02")) + "\n")
    assert ingest_files(con, [path]).records_new == 2
    unchanged = ingest_files(con, [path])
    assert (unchanged.records_new, unchanged.files_unchanged, unchanged.partitions) == (0, 1, [])

    path.write_text(json.dumps(chat_on("2024-01-02", "A new question about Spain?")) + "\n")
    changed = ingest_files(con, [path])

    assert changed.files_replaced == 1 and changed.records_new == 1 and changed.records_total == 1
    assert changed.partitions == ["2024-01-01", "2024-01-02"]  # 01-01 lost its rows: downstream must rebuild it
    assert "Spain" in con.execute("SELECT raw_text FROM raw_records").fetchall()[0][0]


def test_epoch_milliseconds_and_garbage_timestamps(con, logs):
    path = logs / "ts.jsonl"
    rows = [{**CHAT, "created": 1714550400000}, {**CHAT, "created": "not a date"}, {**CHAT, "timestamp": "1850-01-01"},
            {**CHAT, "created": "1714550400"}, {**CHAT, "created": "1714550400123.5"}, {**CHAT, "created": "42"}]
    path.write_text("\n".join(map(json.dumps, rows)) + "\n")
    result = ingest_files(con, [path], partition=None)
    days = [row[0] for row in con.execute("SELECT partition_date::VARCHAR FROM raw_records ORDER BY line_no").fetchall()]
    assert days[0] == days[3] == days[4] == "2024-05-01"  # epoch seconds or milliseconds, as numbers or digit strings
    assert days[1] == days[2] == days[5] != "1850-01-01"  # garbage, out-of-range and 1970 fall back to the file's day
    assert len(result.partitions) == 2


def test_record_days_agree_with_ingestion_without_storing_anything(con, logs):
    """The sensor's day scan (no warehouse, no hashing) gives the days ingestion then uses, file by file."""
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    from sdpo_platform.ingest import record_days

    files = {
        "stamped.jsonl": json.dumps(chat_on("2024-01-31")) + "\n{broken\n" + json.dumps(chat_on("2024-02-01")) + "\n",
        "array.json": json.dumps([chat_on("2024-02-03"), {**CHAT, "created": 1714550400000}]),
        "unstamped.jsonl": json.dumps(CHAT) + "\n",
        "garbage_ts.jsonl": json.dumps({**CHAT, "timestamp": "1850-01-01"}) + "\n",
        "empty.jsonl": "\n\n",
    }
    for name, text in files.items():
        (logs / name).write_text(text)
    (logs / "array.json.gz").write_bytes(gzip.compress(json.dumps([chat_on("2024-02-04")]).encode()))
    (logs / "cut.jsonl.gz").write_bytes(gzip.compress((json.dumps(chat_on("2024-02-06")) + "\n{").encode())[:-10])
    (logs / "bad_utf8.jsonl").write_bytes(json.dumps(chat_on("2024-02-05")).encode() + b"\n" + b'{"x": "\xff"}\n')
    (logs / "binary.bin").write_bytes(b"\x00\x01\x02" * 50)
    pq.write_table(pa.Table.from_pylist([{**CHAT, "created": 1709632800}]), logs / "chats.parquet")  # 2024-03-05
    for i, path in enumerate(sorted(logs.iterdir())):
        os.utime(path, (1712000000 + 86400 * i,) * 2)  # a different arrival day per file

    for path in sorted(logs.iterdir()):
        assert record_days([path]) == ingest_files(con, [path]).partitions, path.name
    everything = sorted(logs.iterdir())
    assert record_days(everything) == sorted({str(d[0]) for d in con.execute("SELECT DISTINCT partition_date FROM raw_records").fetchall()})
    assert "2024-05-01" in record_days(everything) and "2024-03-05" in record_days(everything)


def test_sensor_question_survives_a_file_that_vanished_after_listing(con, logs):
    import contextlib

    from sdpo_platform.inbox import pending_partitions

    path = logs / "gone.jsonl"
    path.write_text(json.dumps(chat_on("2024-01-31")) + "\n")
    ingest_files(con, [path])
    path.unlink()
    connect = lambda: contextlib.nullcontext(con)  # noqa: E731
    assert pending_partitions([str(path.resolve())], connect) == ["2024-01-31"]  # its stored rows' day; no crash
    assert pending_partitions([str(logs / "never.jsonl")], connect) == []


def test_record_days_are_utc_days_whatever_the_host_time_zone(con, logs, monkeypatch):
    """A timestamp without offset is read as UTC by ingestion; the sensor's day scan must read it the same way
    on a host whose local zone is not UTC (DuckDB sessions otherwise take the host's zone)."""
    import time

    from sdpo_platform.ingest import record_days

    path = logs / "late.jsonl"
    path.write_text(json.dumps({**CHAT, "timestamp": "2024-03-05 03:30:00"}) + "\n")  # read as UTC+8 local: 03-04 in UTC
    monkeypatch.setenv("TZ", "Asia/Singapore")
    time.tzset()
    try:
        assert record_days([path]) == ingest_files(con, [path]).partitions == ["2024-03-05"]
    finally:
        monkeypatch.undo()
        time.tzset()


def test_forcing_another_partition_on_an_ingested_file_moves_its_rows(con, logs):
    """`sdpo ingest FILE --partition DAY` on a file already stored under its own days re-reads it onto DAY (the old
    days are reported, to be rebuilt); the same forced day again is a no-op, and so is no forced day."""
    path = logs / "day.jsonl"
    path.write_text(json.dumps(chat_on("2024-01-05")) + "\n")
    assert ingest_files(con, [path]).partitions == ["2024-01-05"]

    moved = ingest_files(con, [path], partition="2024-03-01")
    assert (moved.files_replaced, moved.records_new, moved.partitions) == (1, 1, ["2024-01-05", "2024-03-01"])
    assert con.execute("SELECT partition_date::VARCHAR, count(*) FROM raw_records GROUP BY 1").fetchall() == [("2024-03-01", 1)]
    for again in (ingest_files(con, [path], partition="2024-03-01"), ingest_files(con, [path])):
        assert (again.files_unchanged, again.records_new, again.partitions) == (1, 0, [])


def test_the_raw_records_check_counts_in_sql_and_names_what_is_wrong():
    import duckdb

    from sdpo_platform.checks import check_raw_records

    con = duckdb.connect()
    con.execute("CREATE TABLE raw_records (record_id VARCHAR, source_file VARCHAR, line_no BIGINT)")
    assert not check_raw_records(con).passed  # empty
    con.execute("INSERT INTO raw_records VALUES ('a', 'f', 1), ('b', 'f', 2)")
    assert check_raw_records(con).passed
    con.execute("INSERT INTO raw_records VALUES ('a', 'f', 3), (NULL, 'f', 4), ('c', NULL, -1)")
    report = check_raw_records(con)
    assert not report.passed and all(name in report.description for name in (
        "records_without_id", "repeated_ids", "records_without_source_file", "records_without_line"))
