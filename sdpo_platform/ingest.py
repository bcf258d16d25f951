"""Raw interaction logs → `raw_records`: one row per source record, per daily partition, never crashing.

What a file is, is decided from its bytes, not only its name:
- container (`formats.open_container`): gzip (magic bytes) around JSONL, a JSON array, one JSON
  document or Parquet (`PAR1`); a JSON array is read record by record (`JsonArrayReader`), so a
  truncated array keeps its complete records and its tail gets one 'truncated_json_array' row, and a
  gzip cut off early keeps what was read before the cut and gets one 'truncated_file' row;
- record format (`formats.detect_format` over the first records, or the caller's `format`):
  wildchat | sharegpt | openai | hh_rlhf. A file whose records match none gets an 'unknown_format'
  quarantine row and an entry in `IngestResult.errors`, both naming the file; a binary file (NUL bytes
  or not UTF-8 in its first 8 KiB) is not ingested at all, a text file is (its records are then
  quarantined one by one by cleaning, `invalid_json` / `unknown_schema`), so nothing goes unaccounted
  and `format=` can re-ingest it later. A file holding no record at all gets 'empty_file', whatever its
  container. These file-level rows describe a path's latest attempt only (`file_quarantine`).

Records are stored as text exactly as read (invalid JSON included): judging them is the cleaning
stage's job, and keeping the text means a rejected record can still be inspected. Lines (and Parquet
rows, `parquet_utf8`) that are not UTF-8 are kept (bytes replaced by U+FFFD) with
`read_error = 'invalid_utf8'`; records longer than
`IngestConfig.max_record_bytes` keep only their first 4 KiB with `read_error = 'record_too_large'`;
cleaning quarantines both with that reason, so nothing read is ever silently dropped.

Partitions: `partition_date` is the record's own UTC day when it carries a timestamp (WildChat
`timestamp`, OpenAI `created`, ... see `formats.RECORD_TIMESTAMP_PATHS`), else the file's arrival day
(mtime, UTC), or the caller's `partition` for every record when given.

Storage: rows are written clustered by partition day (up to `CLUSTER_RECORDS` records of a file at a time, in
day order), so that cleaning, which reads a few days at a time, skips the other days' row groups.

Idempotency: `source_files` holds each path's content hash (and the format used). The same bytes
again add nothing (unless a different `format`, or a `partition` other than its rows' day, is forced: then the file
is re-read); a changed file
replaces all its rows (the old rows' partitions are reported in `partitions` so the next
stages rebuild them); `record_id = sha256(source_file, line_no, raw_text)`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pyarrow as pa

from sdpo_platform import parquet_utf8
from sdpo_platform.config import IngestConfig
from sdpo_platform.file_quarantine import STAGE, TRUNCATION_REASONS, clear_file, note_file, reject_file
from sdpo_platform.formats import (
    FORMATS,
    RECORD_TIMESTAMP_PATHS,
    Container,
    JsonArrayReader,
    UnknownFormatError,
    decoded,
    detect_format,
    open_container,
)
from sdpo_platform.progress import Progress
from sdpo_platform.warehouse import ROW_GROUP_ROWS, connect, fetch_scalar

__all__ = ["IngestResult", "JsonArrayReader", "ingest_files", "ingest_inbox", "record_days", "STAGE", "TRUNCATION_REASONS"]

_SNIFF_RECORDS = 50
# What reading a file can raise when its bytes are broken (bad gzip, truncated Parquet, ...): the file is rejected.
_UNREADABLE_FILE = (OSError, UnicodeDecodeError, EOFError, RecursionError, duckdb.Error, pa.ArrowException)


@dataclass
class IngestResult:
    files: int = 0  # files looked at (rejected and unchanged ones included)
    records_new: int = 0  # rows added to raw_records by this call
    records_total: int = 0  # rows in raw_records after this call
    files_rejected: int = 0  # unreadable or binary files, not stored (each has a quarantine row)
    files_unchanged: int = 0  # same path and same content hash as before: nothing done
    files_replaced: int = 0  # same path, new content: old rows removed, new rows added
    by_file: dict[str, int] = field(default_factory=dict)  # source_file → new records from it
    formats: dict[str, str] = field(default_factory=dict)  # source_file → record format used
    partitions: list[str] = field(default_factory=list)  # ISO days whose raw rows changed (added or removed)
    errors: list[str] = field(default_factory=list)  # one line per rejected file, naming it


def ingest_inbox(con: duckdb.DuckDBPyConnection, inbox_dir: str | Path, partition: dt.date | str | None = None,
                 format: str | None = None, cfg: IngestConfig | None = None, progress: Progress | None = None) -> IngestResult:
    """Ingest every non-hidden file under `inbox_dir` (recursively, in path order)."""
    inbox_dir = Path(inbox_dir)
    paths = sorted(
        p for p in inbox_dir.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(inbox_dir).parts)
    )
    return ingest_files(con, paths, partition=partition, format=format, cfg=cfg, progress=progress)


def ingest_files(con: duckdb.DuckDBPyConnection, paths: Iterable[str | Path], partition: dt.date | str | None = None,
                 format: str | None = None, cfg: IngestConfig | None = None, progress: Progress | None = None) -> IngestResult:
    """Ingest the given files; bad files are quarantined and listed in `errors`, never raised.

    `format` forces the record format for every file (else detected per file); `partition` forces the
    partition day of every record (else the record's own timestamp, else the file's mtime day).
    `progress(bytes done, bytes total)` is called after each file (skipped and rejected ones included).
    """
    if format is not None and format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    cfg = cfg or IngestConfig()
    partition_day = dt.date.fromisoformat(partition) if isinstance(partition, str) else partition
    result, touched = IngestResult(), set()
    paths = [Path(path).expanduser().resolve() for path in paths]
    sizes = [path.stat().st_size if path.is_file() else 0 for path in paths]
    bytes_total, bytes_done = sum(sizes), 0
    for path, size in zip(paths, sizes):
        try:
            _ingest_path(con, path, partition_day, format, cfg, result, touched)
        finally:
            bytes_done += size
            if progress is not None:
                progress(bytes_done, bytes_total)
    result.partitions = sorted(str(day) for day in touched)
    result.records_total = fetch_scalar(con, "SELECT count(*) FROM raw_records")
    return result


def _ingest_path(con, path: Path, partition_day: dt.date | None, format: str | None, cfg: IngestConfig,
                 result: IngestResult, touched: set) -> None:
    """One file, whole or not at all, into `result` and the set of `touched` days; never raises for bad input."""
    source_file = str(path)
    result.files += 1
    try:
        digest = file_hash(path)
    except OSError as error:
        _reject(con, result, source_file, "unreadable_file", f"{source_file}: {type(error).__name__}: {error}")
        return
    previous = con.execute(
        "SELECT file_hash, source_format FROM source_files WHERE source_file = ?", [source_file]).fetchall()
    if previous and previous[0][0] == digest and format in (None, previous[0][1]) and not _moved(con, source_file, partition_day):
        clear_file(con, source_file, rejections_only=True)  # of a content the path held in between
        result.files_unchanged += 1
        return
    con.begin()  # a file is ingested whole or not at all (its replacement included)
    try:
        if previous:
            touched |= remove_file_rows(con, source_file)
            result.files_replaced += 1
        clear_file(con, source_file)  # an earlier attempt's rows, a rejection included
        outcome = _ingest_one(con, path, source_file, digest, partition_day, format, cfg)
    except _UNREADABLE_FILE as error:
        con.rollback()
        _reject(con, result, source_file, "unreadable_file", f"{source_file}: {type(error).__name__}: {error}")
        return
    except UnknownFormatError as error:
        con.rollback()
        _reject(con, result, source_file, "unknown_format", str(error))
        return
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


def _ingest_one(con, path: Path, source_file: str, file_hash: str, partition_day: dt.date | None,
                format: str | None, cfg: IngestConfig) -> tuple[int, str | None, set]:
    """(new records, format, partition days) for one file, inside the caller's transaction."""
    params = {"source_file": source_file, "file_hash": file_hash, "file_day": _arrival_day(path), "partition": partition_day}
    with open_container(path, cfg.max_record_bytes) as container:
        sample = [] if container.kind == "empty" else container.sample(_SNIFF_RECORDS)
        used_format = format or _detect(container, source_file, sample)
        params["format"] = used_format
        con.execute(_CREATE_STAGE_SQL).fetchall()
        new = staged = 0
        if container.kind == "parquet":
            con.execute("CREATE OR REPLACE TEMP TABLE ingest_batch (record_id VARCHAR, line_no BIGINT, raw_text VARCHAR, read_error VARCHAR)")
            _stage_parquet(con, container.path, source_file)
            _stage(con, params)
            con.execute("DROP TABLE IF EXISTS ingest_batch")
        else:
            for batch in _batches(container.byte_records(), cfg.batch_records, source_file):
                con.register("ingest_batch", batch)  # the Arrow batch is read in place, not copied first
                try:
                    staged += _stage(con, params)
                finally:
                    con.unregister("ingest_batch")
                if staged >= CLUSTER_RECORDS:
                    new, staged = new + _store_clustered(con, params), 0
        new += _store_clustered(con, params)
        con.execute("DROP TABLE IF EXISTS ingest_stage").fetchall()
        note_file(con, source_file, container, used_format, new, sample)
    _remember_file(con, source_file, file_hash, container.kind, used_format, new)
    days = {row[0] for row in con.execute(
        "SELECT DISTINCT partition_date FROM raw_records WHERE source_file = ?", [source_file]).fetchall()}
    return new, used_format, days


def record_days(paths: Iterable[str | Path], cfg: IngestConfig | None = None) -> list[str]:
    """ISO days that ingesting `paths` would put records on (no forced partition), computed with ingestion's own
    readers and day rule but nothing stored or hashed, so a sensor can ask about a large drop of files without
    copying them into memory. Files that ingestion would reject whole (unreadable, binary, empty) give no day."""
    cfg = cfg or IngestConfig()
    days: set[dt.date] = set()
    con = connect(":memory:")  # the warehouse's session settings: days are UTC days, as when ingesting
    try:
        for path in paths:
            try:
                days |= _file_days(con, Path(path).expanduser().resolve(), cfg)
            except (*_UNREADABLE_FILE, UnknownFormatError):  # ingestion rejects such a file whole: no day
                continue
    finally:
        con.close()
    return sorted(str(day) for day in days)


def _file_days(con, path: Path, cfg: IngestConfig) -> set[dt.date]:
    params = _day_params({"partition": None, "file_day": _arrival_day(path)})
    days_sql = "SELECT DISTINCT partition_date FROM ({})"
    with open_container(path, cfg.max_record_bytes) as container:
        if container.kind == "empty":
            return set()
        _detect(container, str(path), container.sample(_SNIFF_RECORDS))  # raises for binary content, as ingestion does
        if container.kind == "parquet":
            with _parquet_rows(con, container.path) as (rows, parquet_params):  # a gzipped file's decompressed copy
                return {row[0] for row in con.execute(days_sql.format(_DATED_SQL.format(rows=rows)), {**params, **parquet_params}).fetchall()}
        days = set()
        for batch in _batches(container.byte_records(), cfg.batch_records, None):
            con.register("ingest_batch", batch)
            try:
                days |= {row[0] for row in con.execute(days_sql.format(_DATED_SQL.format(rows="ingest_batch")), params).fetchall()}
            finally:
                con.unregister("ingest_batch")
        return days


def _arrival_day(path: Path) -> dt.date:
    """The file's modification day (UTC): the partition of records that carry no usable timestamp."""
    return dt.datetime.fromtimestamp(path.stat().st_mtime, dt.timezone.utc).date()


def _detect(container: Container, source_file: str, sample: list[object]) -> str | None:
    """The file's record format from its `sample`; None for a text file of no known format; raises for a binary one."""
    found = detect_format(sample)
    if found is None and container.kind != "empty" and container.looks_binary():
        raise UnknownFormatError(f"{source_file}: unknown log format — binary content (NUL bytes or not UTF-8); not ingested")
    return found


def record_id(source_file: str, line_no: int, raw: bytes) -> str:
    """sha256(source_file, line_no, raw_text) joined by U+001F, from the record's UTF-8 bytes: the same value as the
    SQL `sha256(concat_ws(chr(31), source_file, line_no::VARCHAR, raw_text))` used for Parquet rows. Hashed here
    while the line is at hand, without joining it into a new string: hashlib uses the CPU's SHA instructions,
    several times faster than DuckDB's sha256."""
    digest = hashlib.sha256(f"{source_file}\x1f{line_no}\x1f".encode("utf-8"))
    digest.update(raw)
    return digest.hexdigest()


def _batches(records: Iterator[tuple[int, bytes, str | None]], size: int, source_file: str | None) -> Iterator[pa.Table]:
    """Arrow batches of `size` records from `Container.byte_records()`; with record ids unless `source_file` is None."""
    line_nos, datas, errors = [], [], []
    for line_no, data, read_error in records:
        line_nos.append(line_no)
        datas.append(data)
        errors.append(read_error)
        if len(datas) >= size:
            yield _arrow(line_nos, datas, errors, source_file)
            line_nos, datas, errors = [], [], []
    if datas:
        yield _arrow(line_nos, datas, errors, source_file)


def _arrow(line_nos: list[int], datas: list[bytes], errors: list[str | None], source_file: str | None) -> pa.Table:
    """The batch as Arrow, straight from the bytes: UTF-8 is checked for the whole batch by one cast (decoding each
    line in Python and encoding it back into Arrow cost more than reading, hashing and inserting together); only a
    batch that fails it is decoded line by line, its bad lines kept with U+FFFD and flagged 'invalid_utf8'."""
    try:
        text = pa.array(datas, pa.large_binary()).cast(pa.large_string())
    except pa.ArrowInvalid:
        for i, (data, error) in enumerate(zip(datas, errors)):
            if error is None:
                raw_text, errors[i] = decoded(data)
                datas[i] = raw_text.encode("utf-8") if errors[i] else data
        text = pa.array(datas, pa.large_binary()).cast(pa.large_string())
    columns = {"line_no": pa.array(line_nos, pa.int64()), "raw_text": text, "read_error": pa.array(errors, pa.string())}
    if source_file is None:
        return pa.table(columns)
    ids = [record_id(source_file, line_no, data) for line_no, data in zip(line_nos, datas)]
    return pa.table({"record_id": pa.array(ids, pa.string()), **columns})


# Parquet rows as JSON text (and no read error), so that every container reaches cleaning in the same shape.
# The row is packed from its columns, not `to_json(t)`: a column named `t` would take the alias's place.
_PARQUET_ROWS_SQL = """
    (SELECT file_row_number + 1 AS line_no, to_json(struct_pack(*COLUMNS(* EXCLUDE (file_row_number)))) AS raw_text,
            NULL::VARCHAR AS read_error
     FROM read_parquet($path, file_row_number = true))
"""
# The same for a file with strings that are not UTF-8, read by `parquet_utf8` and registered as `parquet_repaired`.
_REPAIRED_ROWS_SQL = f"""
    (SELECT {parquet_utf8.LINE_NO} AS line_no, to_json({parquet_utf8.ROW}) AS raw_text, {parquet_utf8.READ_ERROR} AS read_error
     FROM parquet_repaired)
"""


@contextmanager
def _parquet_rows(con, path: Path) -> Iterator[tuple[str, dict]]:
    """SQL for a Parquet file's rows (line_no, raw_text, read_error) and its parameters. DuckDB reads a
    clean file; it stops at the first string that is not UTF-8, so a file holding one is read by
    `parquet_utf8` and loses only the rows that hold one (kept, flagged 'invalid_utf8'), as JSONL does."""
    if parquet_utf8.file_is_utf8(path) and not parquet_utf8.has_column(path, "file_row_number"):  # DuckDB adds that one
        yield _PARQUET_ROWS_SQL, {"path": str(path)}
        return
    con.register("parquet_repaired", parquet_utf8.repaired_table(path))
    try:
        yield _REPAIRED_ROWS_SQL, {}
    finally:
        con.unregister("parquet_repaired")


def _stage_parquet(con, path: Path, source_file: str) -> None:
    with _parquet_rows(con, path) as (rows, params):
        con.execute(
            f"""
            INSERT INTO ingest_batch
            SELECT sha256(concat_ws(chr(31), $source_file, line_no::VARCHAR, raw_text)), line_no, raw_text, read_error
            FROM {rows}
            """,
            {**params, "source_file": source_file},
        )


# Raw records are clustered by day before they are stored: up to CLUSTER_RECORDS read records wait in a temp
# table with their day, then go to raw_records a few days at a time. Files interleave days (logs are written as
# they come; the benchmark's files hold 30 days each), and cleaning reads one batch of days at a time: unclustered,
# every row group holds every day and each batch reads the whole raw table (at 1M records, 30 batches read it 30
# times); clustered, a row group's zone map covers a few days and the others are skipped.
CLUSTER_RECORDS = 100_000
_CREATE_STAGE_SQL = """
    CREATE OR REPLACE TEMP TABLE ingest_stage (record_id VARCHAR, line_no BIGINT, raw_text VARCHAR, read_error VARCHAR,
                                               partition_date DATE)
"""


def _store_clustered(con, params: dict) -> int:
    """Move the staged records to raw_records, whole days at a time in day order (groups of consecutive days
    of at least a quarter row group, so that a file of many small days does not cost a statement per day)."""
    day_counts = con.execute("SELECT partition_date, count(*) FROM ingest_stage GROUP BY 1 ORDER BY 1").fetchall()
    groups, first, rows = [], None, 0
    for day, count in day_counts:
        first, rows = first or day, rows + count
        if rows >= ROW_GROUP_ROWS // 4:
            groups.append((first, day))
            first, rows = None, 0
    if first is not None:
        groups.append((first, day_counts[-1][0]))
    for first, last in groups:
        con.execute(
            """INSERT INTO raw_records (record_id, source_file, line_no, raw_text, partition_date, source_format, file_hash, read_error)
               SELECT record_id, $source_file, line_no, raw_text, partition_date, $format, $file_hash, read_error
               FROM ingest_stage WHERE partition_date BETWEEN $first AND $last""",
            {"source_file": params["source_file"], "format": params["format"], "file_hash": params["file_hash"],
             "first": first, "last": last},
        ).fetchall()
    con.execute("DELETE FROM ingest_stage").fetchall()
    return sum(count for _, count in day_counts)


# The record's UTC day from its first timestamp-like field (ISO string, or epoch seconds/milliseconds, as a
# number or a string of digits);
# days outside 2000..2100 are treated as garbage and fall back to the file's day. Over `{rows}` (`ingest_batch`, a
# registered Arrow batch, or Parquet rows), every column kept: ingestion stores the rows, the sensor only their days.
_DATED_SQL = """
    SELECT * EXCLUDE (ts, epoch, day),
           coalesce($partition::DATE, CASE WHEN day BETWEEN DATE '2000-01-01' AND DATE '2100-01-01' THEN day END,
                    $file_day::DATE) AS partition_date
    FROM (
        SELECT *, (coalesce(CASE WHEN json_type(ts) = 'VARCHAR' THEN try_cast(ts->>'$' AS TIMESTAMPTZ) END,
                            try(to_timestamp(CASE WHEN epoch > 1e11 THEN epoch / 1000 ELSE epoch END)))
                   AT TIME ZONE 'UTC')::DATE AS day
        FROM (
        SELECT *, CASE WHEN json_type(ts) IN ('BIGINT', 'UBIGINT', 'DOUBLE') THEN ts::DOUBLE
                       WHEN json_type(ts) = 'VARCHAR' THEN try_cast(ts->>'$' AS DOUBLE) END AS epoch  -- "1736035200" too
        FROM (
            SELECT *, CASE WHEN read_error IS NULL AND json_valid(raw_text)
                           THEN list_filter(json_extract(raw_text, $timestamp_paths::VARCHAR[]),
                                            lambda x: x IS NOT NULL AND json_type(x) <> 'NULL')[1] END AS ts
            FROM {rows}
        ))
    )
"""
_STAGE_SQL = f"""
    INSERT INTO ingest_stage (record_id, line_no, raw_text, read_error, partition_date)
    SELECT record_id, line_no, raw_text, read_error, partition_date FROM ({_DATED_SQL.format(rows="ingest_batch")})
"""


def _day_params(params: dict) -> dict:
    return {"partition": params["partition"], "file_day": params["file_day"], "timestamp_paths": list(RECORD_TIMESTAMP_PATHS)}


def _stage(con, params: dict) -> int:
    return fetch_scalar(con, _STAGE_SQL, _day_params(params))


def _moved(con, source_file: str, partition_day: dt.date | None) -> bool:
    """Whether a forced `partition_day` differs from the day of a stored row of the file: the same bytes must then
    be re-read onto that day (`--partition` on an ingested file), else a forced day would be silently ignored."""
    if partition_day is None:
        return False
    return bool(fetch_scalar(con, "SELECT count(*) FROM raw_records WHERE source_file = $file AND partition_date IS DISTINCT FROM $day",
                             {"file": source_file, "day": partition_day}))


def remove_file_rows(con, source_file: str) -> set:
    """Delete a file's raw rows (it changed, or `forget` erases it); return the days they were in."""
    days = {row[0] for row in con.execute(
        "SELECT DISTINCT partition_date FROM raw_records WHERE source_file = ?", [source_file]).fetchall()}
    con.execute("DELETE FROM raw_records WHERE source_file = ?", [source_file])
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
    reject_file(con, source_file, reason, detail)
    result.files_rejected += 1
    result.errors.append(f"{reason}: {detail}")
