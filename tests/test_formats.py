"""Every log format in every container reaches `conversations` the same way; detection and override."""

from __future__ import annotations

import gzip
import itertools
import json
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sdpo_platform.cleaning import build_conversations
from sdpo_platform.config import CleaningConfig
from sdpo_platform.formats import detect_format, open_container, record_format
from sdpo_platform.ingest import ingest_files
from sdpo_platform.warehouse import connect
from sdpo_platform.wildchat import ingest_wildchat

HH_RLHF = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh_rlhf" / "harmless-base-test.jsonl.gz"
Q, A, F = "How do I reverse a list in Python?", "Use reversed() or slicing with a step of -1.", "Can you show me the code?"
ANY_LANGUAGE = CleaningConfig(languages=[])


@pytest.fixture()
def con(sdpo_home):
    connection = connect()
    yield connection
    connection.close()


def wildchat_row(i: int, day: str = "2024-03-05") -> dict:
    return {
        "conversation_hash": f"hash{i}", "model": "gpt-4", "timestamp": f"{day} 10:00:0{i % 10}+00:00",
        "conversation": [
            {"role": "user", "content": f"{Q} #{i}", "timestamp": f"{day} 10:00:00+00:00", "language": "English", "toxic": False},
            {"role": "assistant", "content": A, "timestamp": f"{day} 10:00:05+00:00", "language": "English", "toxic": False},
            {"role": "user", "content": F, "timestamp": f"{day} 10:01:00+00:00", "language": "English", "toxic": False},
        ],
        "turn": 2, "language": "English", "toxic": False, "redacted": False, "hashed_ip": f"ip{i}", "country": "France",
    }


def kept(con) -> list[tuple]:
    return con.execute(
        "SELECT source_format, partition_date::VARCHAR, [m.role FOR m IN messages] FROM conversations ORDER BY source_file, line_no"
    ).fetchall()


@pytest.mark.parametrize("container", ["jsonl", "jsonl.gz", "json", "json.gz"])
def test_wildchat_in_every_text_container_partitions_by_conversation_time(con, tmp_path, container):
    rows = [wildchat_row(0, "2024-03-05"), wildchat_row(1, "2024-03-06")]
    text = "\n".join(json.dumps(r) for r in rows) if container.startswith("jsonl") else json.dumps(rows, indent=2)
    path = tmp_path / f"wild.{container}"
    if container.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)

    result = ingest_files(con, [path])
    assert result.formats == {str(path.resolve()): "wildchat"} and result.partitions == ["2024-03-05", "2024-03-06"]
    build_conversations(con, ANY_LANGUAGE)
    assert kept(con) == [("wildchat", "2024-03-05", ["user", "assistant", "user"]),
                         ("wildchat", "2024-03-06", ["user", "assistant", "user"])]


def test_parquet_and_gzipped_parquet_in_wildchat_schema(con, tmp_path):
    table = pa.Table.from_pylist([{**wildchat_row(i), "timestamp": None} for i in range(3)])
    table = table.set_column(table.schema.get_field_index("timestamp"), "timestamp",
                             pa.array([1709632800000] * 3, pa.timestamp("ms", tz="UTC")))  # 2024-03-05 10:00 UTC
    pq.write_table(table, tmp_path / "wild.parquet")
    (tmp_path / "wild2.parquet.gz").write_bytes(gzip.compress((tmp_path / "wild.parquet").read_bytes()))

    result = ingest_files(con, [tmp_path / "wild.parquet", tmp_path / "wild2.parquet.gz"])

    assert result.records_new == 6 and result.partitions == ["2024-03-05"] and not result.errors
    assert con.execute("SELECT min(line_no), max(line_no) FROM raw_records").fetchall() == [(1, 3)]
    cleaned = build_conversations(con, ANY_LANGUAGE)
    assert cleaned.kept == 3 and cleaned.by_reason == {"duplicate": 3}  # the second file repeats the first


def test_wildchat_through_datasets_from_a_local_parquet_in_the_hub_schema(con, tmp_path):
    pq.write_table(pa.Table.from_pylist([wildchat_row(i) for i in range(4)]), tmp_path / "train-00000.parquet")

    result = ingest_wildchat(con, "parquet", data_files=str(tmp_path / "train-00000.parquet"), limit=3)

    assert result.records_new == 3 and list(result.formats.values()) == ["wildchat"]
    assert result.partitions == ["2024-03-05"]
    assert build_conversations(con, ANY_LANGUAGE).kept == 3
    user_hash = con.execute("SELECT user_hash FROM conversations ORDER BY line_no LIMIT 1").fetchall()[0][0]
    assert user_hash and "ip0" not in user_hash
    assert ingest_wildchat(con, "parquet", data_files=str(tmp_path / "train-00000.parquet"), limit=3).records_new == 0


def test_sharegpt_chunks_are_joined_in_order_from_a_truncated_array(con, tmp_path):
    records = [
        {"id": "abc_1", "conversations": [{"from": "gpt", "value": "Part two of the answer."}, {"from": "human", "value": F}]},
        {"id": "abc_0", "conversations": [{"from": "human", "value": Q}, {"from": "gpt", "value": A}]},
        {"id": "solo_0", "conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": Q + " (solo)"},
                                           {"from": "gpt", "value": A}, {"from": "human", "value": F}]},
        {"id": "cut", "conversations": [{"from": "human", "value": "this record is cut"}]},
    ]
    text = json.dumps(records, indent=1)
    (tmp_path / "sg.json").write_text(text[: text.rindex("this record is cut")])

    ingested = ingest_files(con, [tmp_path / "sg.json"])
    result = build_conversations(con, ANY_LANGUAGE)

    assert ingested.records_new == 3 and ingested.formats[str((tmp_path / "sg.json").resolve())] == "sharegpt"
    assert result.raw_records == 3 and result.kept == 2 and result.records_kept == 3 and result.quarantined == 0
    rows = con.execute("SELECT source_id, messages, len(record_ids) FROM conversations ORDER BY source_id").fetchall()
    assert [r[0] for r in rows] == ["abc", "solo"]
    # abc: chunk 0 then chunk 1 (file order was 1, 0); the two assistant parts merge
    assert [(m["role"], m["content"]) for m in rows[0][1]] == [("user", Q), ("assistant", A + "\n\nPart two of the answer."), ("user", F)]
    assert rows[0][2] == 2
    tail = con.execute("SELECT reason FROM quarantine WHERE stage = 'raw_interaction_logs'").fetchall()
    assert tail == [("truncated_json_array",)]


def test_openai_string_and_text_part_content_and_created_epoch_partition(con, tmp_path):
    record = {"created": 1709632800, "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "How do I reverse"}, {"type": "text", "text": "a list in Python?"}]},
        {"role": "assistant", "content": A}, {"role": "user", "content": [F]},
    ]}
    (tmp_path / "chat.jsonl").write_text(json.dumps(record) + "\n")
    assert ingest_files(con, [tmp_path / "chat.jsonl"]).partitions == ["2024-03-05"]
    build_conversations(con, ANY_LANGUAGE)
    messages = con.execute("SELECT messages FROM conversations").fetchall()[0][0]
    assert [m["content"] for m in messages] == ["Be brief.", "How do I reverse\na list in Python?", A, F]


def test_hh_rlhf_transcripts_from_the_shared_sample(con, tmp_path):
    lines = gzip.decompress(HH_RLHF.read_bytes()).decode().splitlines()[:40]
    (tmp_path / "hh.jsonl").write_text("\n".join(lines) + "\n")

    ingested = ingest_files(con, [tmp_path / "hh.jsonl"])
    result = build_conversations(con, CleaningConfig(languages=[], min_messages=2))

    assert list(ingested.formats.values()) == ["hh_rlhf"]
    assert result.raw_records == 40 and result.kept + result.quarantined == 40 and result.kept >= 30
    first = json.loads(lines[0])["chosen"]
    messages = con.execute("SELECT messages FROM conversations WHERE line_no = 1").fetchall()[0][0]
    assert messages[0] == {"role": "user", "content": first.split("\n\nHuman: ")[1].split("\n\nAssistant: ")[0]}
    assert {m["role"] for m in messages} == {"user", "assistant"}


def test_format_override_wins_over_detection_and_reingests(con, tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": Q}], "conversation": "not a list"}) + "\n")
    with pytest.raises(ValueError, match="unknown format"):
        ingest_files(con, [path], format="csv")
    assert ingest_files(con, [path]).formats[str(path.resolve())] == "openai"
    again = ingest_files(con, [path], format="wildchat")
    assert again.files_replaced == 1 and again.records_new == 1
    assert con.execute("SELECT DISTINCT source_format FROM raw_records").fetchall() == [("wildchat",)]


def test_detect_format_by_majority_and_record_shapes():
    assert record_format({"conversation": []}) == "wildchat"
    assert record_format({"conversations": []}) == "sharegpt"
    assert record_format({"messages": []}) == "openai"
    assert record_format({"chosen": "\n\nHuman: hi\n\nAssistant: yo", "rejected": "..."}) == "hh_rlhf"
    assert record_format({"text": "plain text"}) is None and record_format([1]) is None
    assert detect_format([{"messages": []}, {"conversations": []}, {"conversations": []}, "x"]) == "sharegpt"
    assert detect_format([{"a": 1}]) is None


def test_a_cut_off_gzip_reads_up_to_the_cut_and_a_corrupt_one_raises(tmp_path):
    lines = [json.dumps({"n": i, "text": "x" * 50_000}) for i in range(40)]  # several read chunks
    whole = gzip.compress("\n".join(lines).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    with open_container(tmp_path / "cut.jsonl.gz", 1 << 20) as container:
        texts = [data.decode() for _, data, _ in container.byte_records()]
    assert container.cut_off and 0 < len(texts) < 40 and texts[:-1] == lines[: len(texts) - 1]
    assert lines[len(texts) - 1].startswith(texts[-1])  # the record the cut went through, as far as it got

    (tmp_path / "whole.jsonl.gz").write_bytes(whole)
    with open_container(tmp_path / "whole.jsonl.gz", 1 << 20) as container:
        assert [data.decode() for _, data, _ in container.byte_records()] == lines and not container.cut_off

    (tmp_path / "crc.jsonl.gz").write_bytes(whole[:-8] + bytes(4) + whole[-4:])
    with pytest.raises(OSError, match="CRC"), open_container(tmp_path / "crc.jsonl.gz", 1 << 20) as container:
        list(container.byte_records())


def test_parquet_repair_flags_only_rows_with_bad_strings_and_leaves_binary_columns_alone(tmp_path):
    from sdpo_platform.parquet_utf8 import LINE_NO, READ_ERROR, ROW, file_is_utf8, repaired_table

    def unchecked(values: list[bytes], large: bool = False) -> pa.Array:  # strings Arrow has not validated
        offsets = pa.array([0, *itertools.accumulate(map(len, values))], pa.int64() if large else pa.int32()).buffers()[1]
        return pa.Array.from_buffers(pa.large_string() if large else pa.string(), len(values), [None, offsets, pa.py_buffer(b"".join(values))])

    keys = unchecked([b"k", b"k\xff", b"k"])
    table = pa.table({
        "blob": pa.array([b"\xff\x00", b"ok", b"\xfe"], pa.binary()),  # bytes, not text: never flagged
        "tags": pa.LargeListArray.from_arrays(pa.array([0, 1, 2, 3], pa.int64()), unchecked([b"a", b"b", b"\xc3"], large=True)),
        "meta": pa.MapArray.from_arrays(pa.array([0, 1, 2, 3], pa.int32()), keys, pa.array(["v", "v", "v"])),
        # a dictionary column (int8 indices fail inside Arrow's own reader: such a file is still rejected whole)
        "kind": pa.DictionaryArray.from_arrays(pa.array([0, 1, 0], pa.int32()), unchecked([b"chat", b"caf\xe9"])),
        "line_no": [7, 8, 9],  # a column named like ours stays the file's
        "half": pa.array([1.5, 2.0, None], pa.float16()),  # DuckDB cannot scan Arrow half floats: read as float, as Parquet is
    })
    path = tmp_path / "mixed.parquet"
    pq.write_table(table, path)

    assert not file_is_utf8(path)
    repaired = repaired_table(path)
    rows = repaired.to_pylist()
    assert [r[READ_ERROR] for r in rows] == [None, "invalid_utf8", "invalid_utf8"] and [r[LINE_NO] for r in rows] == [1, 2, 3]
    rows = [r[ROW] for r in rows]
    assert [r["blob"] for r in rows] == [b"\xff\x00", b"ok", b"\xfe"] and [r["line_no"] for r in rows] == [7, 8, 9]
    assert rows[1]["meta"] == [("k\ufffd", "v")] and rows[2]["tags"] == ["\ufffd"] and rows[0]["tags"] == ["a"]
    assert [r["kind"] for r in rows] == ["chat", "caf\ufffd", "chat"] and rows[0]["half"] == 1.5
    with duckdb.connect() as con:
        con.register("parquet_repaired", repaired)
        first = json.loads(con.execute("SELECT to_json(row) FROM parquet_repaired WHERE line_no = 1").fetchone()[0])
    assert first["line_no"] == 7 and first["half"] == 1.5 and first["kind"] == "chat"
    pq.write_table(pa.table({"text": ["fine"]}), tmp_path / "clean.parquet")
    assert file_is_utf8(tmp_path / "clean.parquet")


def test_the_repaired_parquet_path_reads_rows_as_duckdbs_parquet_reader_does(tmp_path):
    """Cleaning and the day rule see the same JSON whichever path read the file (here a clean one, both ways)."""
    import datetime as dt

    from sdpo_platform.parquet_utf8 import LINE_NO, ROW, repaired_table

    table = pa.table({
        "conversations": [[{"from": "human", "value": "hi"}], [{"from": "gpt", "value": "yo"}]],
        "timestamp": pa.array([dt.datetime(2026, 3, 1, 10, 0, 0, 123456), None], pa.timestamp("us", tz="UTC")),
        "took": pa.array([dt.timedelta(days=1), dt.timedelta(seconds=2)], pa.duration("us")),
        "score": pa.array([0.5, None], pa.float16()),
        "meta": pa.array([[("k", "v")], []], pa.map_(pa.string(), pa.string())),
        "blob": pa.array([b"\x00", None], pa.binary()),
    })
    path = tmp_path / "clean.parquet"
    pq.write_table(table, path)
    with duckdb.connect() as con:
        direct = con.execute("SELECT json_remove(to_json(t), '$.file_row_number') FROM read_parquet(?, file_row_number = true) t "
                             "ORDER BY file_row_number", [str(path)]).fetchall()
        con.register("parquet_repaired", repaired_table(path))
        repaired = con.execute(f"SELECT to_json({ROW}) FROM parquet_repaired ORDER BY {LINE_NO}").fetchall()
    assert [json.loads(r) for (r,) in repaired] == [json.loads(r) for (r,) in direct]
