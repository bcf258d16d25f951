"""Raw interaction logs → `raw_records`: one row per source record, idempotent, never crashing on a file.

Accepted files: `.jsonl`, `.json` and their `.gz` forms. A record's identity is
sha256(source_file, line_no, raw_text), so re-ingesting a file adds nothing. Records are stored as
text exactly as read (invalid JSON included): judging them is the cleaning stage's job, and keeping
the text means a rejected record can still be inspected from the quarantine.

- JSONL: DuckDB reads the file (`read_text`, or the decompressed text for `.gz`) and splits it into
  lines; `line_no` is the 1-based physical line; blank lines are not records.
- JSON: a top-level array is parsed record by record (`JsonArrayReader`), so a truncated array keeps
  its complete records; `line_no` is the 1-based index in the array and `raw_text` the record
  re-serialized on one line. Any other document is a single record (line 1).

A file that cannot be read (missing, not UTF-8, corrupt gzip) or has an unknown extension gets one
'raw_interaction_logs' quarantine row and counts in `files_rejected`; a truncated/malformed tail of a
JSON array gets one 'truncated_json_array' row (the file is still ingested).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import duckdb

from sdpo_platform.warehouse import fetch_scalar

STAGE = "raw_interaction_logs"
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
JSON_SUFFIXES = (".json", ".json.gz")
_INSERT_BATCH = 2_000
_READ_CHUNK_CHARS = 1 << 20


@dataclass
class IngestResult:
    files: int = 0  # files looked at (rejected ones included)
    records_new: int = 0  # rows added to raw_records by this call
    records_total: int = 0  # rows in raw_records after this call
    files_rejected: int = 0  # unreadable or unknown-format files (each has a quarantine row)
    by_file: dict[str, int] = field(default_factory=dict)  # source_file → new records from it


class JsonArrayReader:
    """Iterate over the elements of a JSON array without loading the whole document.

    `json.JSONDecoder.raw_decode` runs over a buffer that grows by chunks; a failed decode with more
    input left just means the element is not complete yet. After iteration, `complete` tells whether
    the closing bracket was reached and `records` how many elements were decoded; an incomplete array
    (cut-off download, bad element) keeps everything before the break.
    """

    def __init__(self, stream: IO[str], chunk_chars: int = _READ_CHUNK_CHARS):
        self._stream = stream
        self._chunk_chars = chunk_chars
        self._decoder = json.JSONDecoder()
        self.complete = False
        self.records = 0

    def __iter__(self) -> Iterator[object]:
        buf, pos, eof = "", 0, False

        def more() -> bool:
            nonlocal buf, pos, eof
            chunk = self._stream.read(self._chunk_chars)
            if not chunk:
                eof = True
                return False
            buf, pos = buf[pos:] + chunk, 0
            return True

        def skip_whitespace() -> bool:
            """Advance to the next non-space character; False at end of input."""
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos].isspace():
                    pos += 1
                if pos < len(buf) or not more():
                    return pos < len(buf)

        if not skip_whitespace() or buf[pos] != "[":
            return
        pos += 1
        expect_value = True
        while skip_whitespace():
            if buf[pos] == "]":
                self.complete = True
                return
            if not expect_value:
                if buf[pos] != ",":
                    return
                pos += 1
                expect_value = True
                continue
            try:
                value, end = self._decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if eof or not more():
                    return
                continue
            if end == len(buf) and not eof and more():
                continue  # a bare number/literal may go on in the next chunk
            pos, expect_value = end, False
            self.records += 1
            yield value


def ingest_inbox(con: duckdb.DuckDBPyConnection, inbox_dir: str | Path) -> IngestResult:
    """Ingest every non-hidden file under `inbox_dir` (recursively, in path order)."""
    paths = sorted(
        p for p in Path(inbox_dir).rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(inbox_dir).parts)
    )
    return ingest_files(con, paths)


def ingest_files(con: duckdb.DuckDBPyConnection, paths: Iterable[str | Path]) -> IngestResult:
    """Ingest the given files; unreadable or unknown files are quarantined, never raised."""
    result = IngestResult()
    for path in paths:
        path = Path(path).expanduser().resolve()
        source_file = str(path)
        result.files += 1
        name = path.name.lower()
        if not name.endswith(JSONL_SUFFIXES + JSON_SUFFIXES):
            _quarantine_file(con, source_file, "unknown_format", f"unsupported file type: {path.name}")
            result.files_rejected += 1
            continue
        con.begin()  # a file is ingested whole or not at all
        try:
            reader = _ingest_jsonl if name.endswith(JSONL_SUFFIXES) else _ingest_json
            new = reader(con, path, source_file)
        except (OSError, UnicodeDecodeError, EOFError, RecursionError, duckdb.Error) as error:
            con.rollback()
            _quarantine_file(con, source_file, "unreadable_file", f"{path.name}: {type(error).__name__}: {error}")
            result.files_rejected += 1
            continue
        except BaseException:
            con.rollback()
            raise
        con.commit()
        result.by_file[source_file] = new
        result.records_new += new
    result.records_total = fetch_scalar(con, "SELECT count(*) FROM raw_records")
    return result


# Lines of one text → (line_no, raw_text) rows, blank lines dropped, CR of CRLF files removed.
_LINES_SQL = """
    WITH file AS (SELECT string_split(content, chr(10)) AS lines FROM {source}),
    numbered AS (
        SELECT generate_subscripts(lines, 1) AS line_no, rtrim(unnest(lines), chr(13)) AS raw_text FROM file
    )
    SELECT line_no, raw_text FROM numbered WHERE NOT regexp_matches(raw_text, '^\\s*$')
"""

_INSERT_SQL = """
    INSERT OR IGNORE INTO raw_records (record_id, source_file, line_no, raw_text)
    SELECT sha256(concat_ws(chr(31), $source_file, line_no::VARCHAR, raw_text)), $source_file, line_no, raw_text
    FROM ({rows})
"""


def _ingest_jsonl(con: duckdb.DuckDBPyConnection, path: Path, source_file: str) -> int:
    if not path.is_file():  # read_text treats its argument as a glob: a missing file reads as no rows
        raise FileNotFoundError(f"no such file: {path}")
    if path.name.lower().endswith(".gz"):
        with gzip.open(path, "rt", encoding="utf-8") as stream:
            text = stream.read()
        rows = _LINES_SQL.format(source="(SELECT $text AS content)")
        params = {"source_file": source_file, "text": text}
    else:
        rows = _LINES_SQL.format(source="read_text($path)")
        params = {"source_file": source_file, "path": str(path)}
    return fetch_scalar(con, _INSERT_SQL.format(rows=rows), params)


def _ingest_json(con: duckdb.DuckDBPyConnection, path: Path, source_file: str) -> int:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as stream:
        head = stream.read(4096)
        if not head.lstrip().startswith("["):
            text = head + stream.read()
            return _insert_rows(con, source_file, [1], [text]) if text.strip() else 0
        stream.seek(0)
        reader = JsonArrayReader(stream)
        new, line_nos, texts = 0, [], []
        for index, record in enumerate(reader, start=1):
            line_nos.append(index)
            texts.append(json.dumps(record, ensure_ascii=False))
            if len(texts) >= _INSERT_BATCH:
                new += _insert_rows(con, source_file, line_nos, texts)
                line_nos, texts = [], []
        new += _insert_rows(con, source_file, line_nos, texts)
    if not reader.complete:
        _quarantine_file(
            con, source_file, "truncated_json_array",
            f"{path.name}: JSON array ends or breaks after record {reader.records}; later content skipped",
        )
    return new


def _insert_rows(con: duckdb.DuckDBPyConnection, source_file: str, line_nos: list[int], texts: list[str]) -> int:
    if not texts:
        return 0
    rows = "SELECT unnest($line_nos::BIGINT[]) AS line_no, unnest($texts::VARCHAR[]) AS raw_text"
    params = {"source_file": source_file, "line_nos": line_nos, "texts": texts}
    return fetch_scalar(con, _INSERT_SQL.format(rows=rows), params)


def _quarantine_file(con: duckdb.DuckDBPyConnection, source_file: str, reason: str, detail: str) -> None:
    """One quarantine row per (file, reason): the id hashes both, so a retry does not add another."""
    con.execute(
        """
        INSERT INTO quarantine (record_id, stage, reason, detail, source_file, line_no)
        SELECT id, $stage, $reason, $detail, $source_file, NULL
        FROM (SELECT sha256(concat_ws(chr(31), 'file', $source_file, $reason)) AS id)
        WHERE NOT EXISTS (SELECT 1 FROM quarantine q WHERE q.record_id = id AND q.stage = $stage)
        """,
        {"stage": STAGE, "reason": reason, "detail": detail, "source_file": source_file},
    ).fetchall()
