"""Raw interaction logs → `raw_records`: one row per source record, per daily partition, never crashing.

What a file is, is decided from its bytes, not only its name:
- container (`formats.open_container`): gzip (magic bytes) around JSONL, a JSON array, one JSON
  document or Parquet (`PAR1`); a JSON array is read record by record (`JsonArrayReader`), so a
  truncated array keeps its complete records and its tail gets one 'truncated_json_array' row;
- record format (`formats.detect_format` over the first records, or the caller's `format`):
  wildchat | sharegpt | openai | hh_rlhf. A file whose records match none gets an 'unknown_format'
  quarantine row and an entry in `IngestResult.errors`, both naming the file; a binary file (NUL bytes
  or not UTF-8 in its first 8 KiB) is not ingested at all, a text file is (its records are then
  quarantined one by one by cleaning, `invalid_json` / `unknown_schema`), so nothing goes unaccounted
  and `format=` can re-ingest it later.

Records are stored as text exactly as read (invalid JSON included): judging them is the cleaning
stage's job, and keeping the text means a rejected record can still be inspected. Lines that are not
UTF-8 are kept (bytes replaced by U+FFFD) with `read_error = 'invalid_utf8'`; records longer than
`IngestConfig.max_record_bytes` keep only their first 4 KiB with `read_error = 'record_too_large'`;
cleaning quarantines both with that reason, so nothing read is ever silently dropped.

Partitions: `partition_date` is the record's own UTC day when it carries a timestamp (WildChat
`timestamp`, OpenAI `created`, ... see `formats.RECORD_TIMESTAMP_PATHS`), else the file's arrival day
(mtime, UTC), or the caller's `partition` for every record when given.

Idempotency: `source_files` holds each path's content hash (and the format used). The same bytes
again add nothing (unless a different `format` is forced: then the file is re-read); a changed file
replaces all its rows (the old rows' partitions are reported in `partitions` so the next
stages rebuild them); `record_id = sha256(source_file, line_no, raw_text)`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pyarrow as pa

from sdpo_platform.config import IngestConfig
from sdpo_platform.formats import (
    FORMATS,
    RECORD_TIMESTAMP_PATHS,
    Container,
    JsonArrayReader,
    UnknownFormatError,
    detect_format,
    open_container,
)
from sdpo_platform.warehouse import fetch_scalar

__all__ = ["IngestResult", "JsonArrayReader", "ingest_files", "ingest_inbox", "STAGE"]

STAGE = "raw_interaction_logs"
_SNIFF_RECORDS = 50


@dataclass
class IngestResult:
    files: int = 0  # files looked at (rejected and unchanged ones included)
    records_new: int = 0  # rows added to raw_records by this call
    records_total: int = 0  # rows in raw_records after this call
    files_rejected: int = 0  # unreadable, empty or unknown-format files (each has a quarantine row)
    files_unchanged: int = 0  # same path and same content hash as before: nothing done
    files_replaced: int = 0  # same path, new content: old rows removed, new rows added
    by_file: dict[str, int] = field(default_factory=dict)  # source_file → new records from it
    formats: dict[str, str] = field(default_factory=dict)  # source_file → record format used
    partitions: list[str] = field(default_factory=list)  # ISO days whose raw rows changed (added or removed)
    errors: list[str] = field(default_factory=list)  # one line per rejected file, naming it


def ingest_inbox(con: duckdb.DuckDBPyConnection, inbox_dir: str | Path, partition: dt.date | str | None = None,
                 format: str | None = None, cfg: IngestConfig | None = None) -> IngestResult:
    """Ingest every non-hidden file under `inbox_dir` (recursively, in path order)."""
    inbox_dir = Path(inbox_dir)
    paths = sorted(
        p for p in inbox_dir.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(inbox_dir).parts)
    )
    return ingest_files(con, paths, partition=partition, format=format, cfg=cfg)


def ingest_files(con: duckdb.DuckDBPyConnection, paths: Iterable[str | Path], partition: dt.date | str | None = None,
                 format: str | None = None, cfg: IngestConfig | None = None) -> IngestResult:
    """Ingest the given files; bad files are quarantined and listed in `errors`, never raised.

    `format` forces the record format for every file (else detected per file); `partition` forces the
    partition day of every record (else the record's own timestamp, else the file's mtime day).
    """
    if format is not None and format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    cfg = cfg or IngestConfig()
    partition_day = dt.date.fromisoformat(partition) if isinstance(partition, str) else partition
    result, touched = IngestResult(), set()
    for path in paths:
        path = Path(path).expanduser().resolve()
        source_file = str(path)
        result.files += 1
        try:
            digest = file_hash(path)
        except OSError as error:
            _reject(con, result, source_file, "unreadable_file", f"{source_file}: {type(error).__name__}: {error}")
            continue
        previous = con.execute(
            "SELECT file_hash, source_format FROM source_files WHERE source_file = ?", [source_file]).fetchall()
        if previous and previous[0][0] == digest and format in (None, previous[0][1]):
            result.files_unchanged += 1
            continue
        con.begin()  # a file is ingested whole or not at all (its replacement included)
        try:
            if previous:
                touched |= _remove_file_rows(con, source_file)
                result.files_replaced += 1
            outcome = _ingest_one(con, path, source_file, digest, partition_day, format, cfg)
        except (OSError, UnicodeDecodeError, EOFError, RecursionError, duckdb.Error, pa.ArrowException) as error:
            con.rollback()
            _reject(con, result, source_file, "unreadable_file", f"{source_file}: {type(error).__name__}: {error}")
            continue
        except UnknownFormatError as error:
            con.rollback()
            _reject(con, result, source_file, "unknown_format", str(error))
            continue
        except BaseException:
            con.rollback()
            raise
        con.commit()
        new, used_format, days = outcome
        if used_format is None and new:
            result.errors.append(f"unknown_format: {source_file}: no record looks like {', '.join(FORMATS)}; "
                                 "its records are kept and quarantined by cleaning (pass format= to force one)")
        result.by_file[source_file] = new
        result.records_new += new
        if used_format:
            result.formats[source_file] = used_format
        touched |= days
    result.partitions = sorted(str(day) for day in touched)
    result.records_total = fetch_scalar(con, "SELECT count(*) FROM raw_records")
    return result


def _ingest_one(con, path: Path, source_file: str, file_hash: str, partition_day: dt.date | None,
                format: str | None, cfg: IngestConfig) -> tuple[int, str | None, set]:
    """(new records, format, partition days) for one file, inside the caller's transaction."""
    file_day = dt.datetime.fromtimestamp(path.stat().st_mtime, dt.timezone.utc).date()
    params = {"source_file": source_file, "file_hash": file_hash, "file_day": file_day, "partition": partition_day}
    with open_container(path, cfg.max_record_bytes) as container:
        if container.kind == "empty":
            _quarantine_file(con, source_file, "empty_file", f"{source_file}: no records (empty or whitespace only)")
            _remember_file(con, source_file, file_hash, container.kind, None, 0)
            return 0, None, set()
        used_format = format or _detect(container, source_file)
        if used_format is None:
            _quarantine_file(con, source_file, "unknown_format", _unknown_format_message(source_file, container.sample(_SNIFF_RECORDS)))
        params["format"] = used_format
        if container.kind == "parquet":
            con.execute("CREATE OR REPLACE TEMP TABLE ingest_batch (record_id VARCHAR, line_no BIGINT, raw_text VARCHAR, read_error VARCHAR)")
            _stage_parquet(con, container.path, source_file)
            new = _insert_staged(con, params)
            con.execute("DROP TABLE IF EXISTS ingest_batch")
        else:
            new = 0
            for batch in _batches(container.records(), cfg.batch_records, source_file):
                con.register("ingest_batch", batch)  # the Arrow batch is read in place, not copied first
                try:
                    new += _insert_staged(con, params)
                finally:
                    con.unregister("ingest_batch")
        if container.truncated_after is not None:
            _quarantine_file(
                con, source_file, "truncated_json_array",
                f"{source_file}: JSON array ends or breaks after record {container.truncated_after}; later content skipped",
            )
    _remember_file(con, source_file, file_hash, container.kind, used_format, new)
    days = {row[0] for row in con.execute(
        "SELECT DISTINCT partition_date FROM raw_records WHERE source_file = ?", [source_file]).fetchall()}
    return new, used_format, days


def _detect(container: Container, source_file: str) -> str | None:
    """The file's record format; None for a text file of no known format; raises for a binary one."""
    found = detect_format(container.sample(_SNIFF_RECORDS))
    if found is None and container.looks_binary():
        raise UnknownFormatError(f"{source_file}: unknown log format — binary content (NUL bytes or not UTF-8); not ingested")
    return found


def _unknown_format_message(source_file: str, sample: list[object]) -> str:
    keys = sorted({key for record in sample if isinstance(record, dict) for key in record})[:12]
    return (
        f"{source_file}: unknown log format — no record looks like {', '.join(FORMATS)} "
        f"(top-level keys seen: {', '.join(keys) or 'none'}); ingested as-is, pass format= to force one"
    )


def record_id(source_file: str, line_no: int, raw_text: str) -> str:
    """sha256(source_file, line_no, raw_text), joined by U+001F: the same value as the SQL
    `sha256(concat_ws(chr(31), source_file, line_no::VARCHAR, raw_text))` used for Parquet rows. Hashed here
    while the line is at hand: hashlib uses the CPU's SHA instructions, several times faster than DuckDB's sha256."""
    return hashlib.sha256(f"{source_file}\x1f{line_no}\x1f{raw_text}".encode("utf-8")).hexdigest()


def _batches(records: Iterator[tuple[int, str, str | None]], size: int, source_file: str) -> Iterator[pa.Table]:
    columns: tuple[list, list, list, list] = ([], [], [], [])
    for line_no, raw_text, read_error in records:
        for column, value in zip(columns, (record_id(source_file, line_no, raw_text), line_no, raw_text, read_error)):
            column.append(value)
        if len(columns[0]) >= size:
            yield _arrow(columns)
            columns = ([], [], [], [])
    if columns[0]:
        yield _arrow(columns)


def _arrow(columns: tuple[list, list, list, list]) -> pa.Table:
    return pa.table({"record_id": pa.array(columns[0], pa.string()), "line_no": pa.array(columns[1], pa.int64()),
                     "raw_text": pa.array(columns[2], pa.large_string()), "read_error": pa.array(columns[3], pa.string())})


def _stage_parquet(con, path: Path, source_file: str) -> None:
    """Parquet rows as JSON text, so that every container reaches cleaning in the same shape."""
    con.execute(
        """
        INSERT INTO ingest_batch
        SELECT sha256(concat_ws(chr(31), $source_file, line_no::VARCHAR, raw_text)), line_no, raw_text, NULL
        FROM (SELECT file_row_number + 1 AS line_no, json_remove(to_json(t), '$.file_row_number') AS raw_text
              FROM read_parquet($path, file_row_number = true) t)
        """,
        {"path": str(path), "source_file": source_file},
    )


# The record's UTC day from its first timestamp-like field (ISO string, or epoch seconds/milliseconds);
# days outside 2000..2100 are treated as garbage and fall back to the file's day.
_INSERT_STAGED_SQL = """
    INSERT INTO raw_records (record_id, source_file, line_no, raw_text, partition_date, source_format,
                                       file_hash, read_error)
    SELECT record_id, $source_file, line_no, raw_text,
           coalesce($partition::DATE, CASE WHEN day BETWEEN DATE '2000-01-01' AND DATE '2100-01-01' THEN day END,
                    $file_day::DATE),
           $format, $file_hash, read_error
    FROM (
        SELECT *, (CASE WHEN json_type(ts) = 'VARCHAR' THEN try_cast(ts->>'$' AS TIMESTAMPTZ)
                        WHEN json_type(ts) IN ('BIGINT', 'UBIGINT', 'DOUBLE')
                        THEN try(to_timestamp(CASE WHEN ts::DOUBLE > 1e11 THEN ts::DOUBLE / 1000 ELSE ts::DOUBLE END))
                   END AT TIME ZONE 'UTC')::DATE AS day
        FROM (
            SELECT *, CASE WHEN read_error IS NULL AND json_valid(raw_text)
                           THEN list_filter(json_extract(raw_text, $timestamp_paths::VARCHAR[]),
                                            lambda x: x IS NOT NULL AND json_type(x) <> 'NULL')[1] END AS ts
            FROM ingest_batch
        )
    )
"""


def _insert_staged(con, params: dict) -> int:
    return fetch_scalar(con, _INSERT_STAGED_SQL, {**params, "timestamp_paths": list(RECORD_TIMESTAMP_PATHS)})


def _remove_file_rows(con, source_file: str) -> set:
    """Delete a changed file's raw rows and file-level quarantine rows; return the days they were in."""
    days = {row[0] for row in con.execute(
        "SELECT DISTINCT partition_date FROM raw_records WHERE source_file = ?", [source_file]).fetchall()}
    con.execute("DELETE FROM raw_records WHERE source_file = ?", [source_file])
    con.execute("DELETE FROM quarantine WHERE stage = ? AND source_file = ?", [STAGE, source_file])
    return days


def _remember_file(con, source_file: str, file_hash: str, container: str, fmt: str | None, n_records: int) -> None:
    con.execute(
        """
        INSERT OR REPLACE INTO source_files (source_file, file_hash, container, source_format, n_records, ingested_at)
        VALUES (?, ?, ?, ?, ?, current_timestamp)
        """,
        [source_file, file_hash, container, fmt, n_records],
    )


def file_hash(path: Path) -> str:
    """sha256 of the file's bytes: what makes re-ingesting the same file a no-op."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _reject(con, result: IngestResult, source_file: str, reason: str, detail: str) -> None:
    _quarantine_file(con, source_file, reason, detail)
    result.files_rejected += 1
    result.errors.append(f"{reason}: {detail}")


def _quarantine_file(con: duckdb.DuckDBPyConnection, source_file: str, reason: str, detail: str) -> None:
    """One quarantine row per (file, reason): the id hashes both, so a retry does not add another."""
    con.execute(
        """
        INSERT INTO quarantine (record_id, stage, reason, detail, source_file, line_no, level)
        SELECT id, $stage, $reason, $detail, $source_file, NULL, 'file'
        FROM (SELECT sha256(concat_ws(chr(31), 'file', $source_file, $reason)) AS id)
        WHERE NOT EXISTS (SELECT 1 FROM quarantine q WHERE q.record_id = id AND q.stage = $stage)
        """,
        {"stage": STAGE, "reason": reason, "detail": detail, "source_file": source_file},
    ).fetchall()
