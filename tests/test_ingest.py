"""Raw ingestion: formats, idempotency, unreadable files, and the ShareGPT slice writer."""

from __future__ import annotations

import gzip
import io
import json

import pytest

from sdpo_platform.ingest import JsonArrayReader, ingest_files, ingest_inbox
from sdpo_platform.paths import inbox_dir
from sdpo_platform.sharegpt import sharegpt_path, write_sharegpt_slice
from sdpo_platform.warehouse import connect

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

    assert (first.records_new, second.records_new) == (1, 0)
    assert second.records_total == 1
    assert con.execute("SELECT count(*) FROM quarantine").fetchall()[0][0] == 1  # the .txt, once


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

    assert result.files == 4 and result.files_rejected == 4 and result.records_new == 0
    rows = con.execute("SELECT reason, detail FROM quarantine WHERE stage = 'raw_interaction_logs' ORDER BY detail").fetchall()
    assert sorted(reason for reason, _ in rows) == ["unknown_format", "unreadable_file", "unreadable_file", "unreadable_file"]
    assert any("missing.jsonl" in detail for _, detail in rows)


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
