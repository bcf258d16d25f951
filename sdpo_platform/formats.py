"""What a log file is: its container (gzip? JSONL, JSON array, one document, Parquet) and its record format.

Containers are recognised from the bytes (gzip and Parquet magic numbers, the first non-blank
character), with the name only as a tie-breaker (`.jsonl`/`.ndjson` are always line-delimited), so a
`.json` holding JSONL or a gzip without `.gz` still reads. Every container yields the same thing:
`(line_no, raw_text, read_error)` per record, streamed, so memory does not grow with the file. A gzip cut
off early (an interrupted copy) reads up to the cut and sets `Container.cut_off`, and bytes that are not
UTF-8 are passed through as read in every text container, so one bad byte costs one record, not the file.

Record formats, recognised from the keys of the first records (`detect_format`):

| format    | shape                                                                                  |
|-----------|----------------------------------------------------------------------------------------|
| wildchat  | `conversation: [{role, content, timestamp, ...}]`, `conversation_hash`, `hashed_ip`, `timestamp` |
| sharegpt  | `id`, `conversations: [{from: human/gpt/system, value}]`; ids `X_0, X_1` are chunks of X |
| openai    | `messages: [{role, content}]`, content a string or a list of `{type: text, text}` parts  |
| hh_rlhf   | `chosen` (or `transcript`/`text`): `"\\n\\nHuman: … \\n\\nAssistant: …"`                  |
"""

from __future__ import annotations

import codecs
import contextlib
import gzip
import io
import json
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

FORMATS = ("wildchat", "sharegpt", "openai", "hh_rlhf")
# Where a record's own time is, first found wins (JSON paths; ISO strings or epoch numbers).
RECORD_TIMESTAMP_PATHS = (
    "$.timestamp", "$.created", "$.created_at", "$.create_time", "$.conversation[0].timestamp",
    "$.messages[0].timestamp",
)
LINE_DELIMITED_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz")
HH_TRANSCRIPT_KEYS = ("chosen", "transcript", "text")
_HH_MARKER = re.compile(r"(^|\n\n)Human: ")
_GZIP_MAGIC = b"\x1f\x8b"
_PARQUET_MAGIC = b"PAR1"
_PREVIEW_CHARS = 4096
_READ_CHUNK_CHARS = 1 << 20


class UnknownFormatError(ValueError):
    """A file whose records match no known format; the message names the file."""


def record_format(record: object) -> str | None:
    """The format one parsed record has, or None."""
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("conversation"), list):
        return "wildchat"
    if isinstance(record.get("conversations"), list):
        return "sharegpt"
    if isinstance(record.get("messages"), list):
        return "openai"
    if any(isinstance(record.get(key), str) and _HH_MARKER.search(record[key]) for key in HH_TRANSCRIPT_KEYS):
        return "hh_rlhf"
    return None


def detect_format(sample: list[object]) -> str | None:
    """The most common format among the sampled records (ties: the first seen); None if none matches."""
    counts = Counter(fmt for fmt in map(record_format, sample) if fmt)
    return counts.most_common(1)[0][0] if counts else None


class JsonArrayReader:
    """Iterate over the elements of a JSON array without loading the whole document.

    `json.JSONDecoder.raw_decode` runs over a buffer that grows by chunks; a failed decode with more
    input left just means the element is not complete yet. After iteration, `complete` tells whether
    the closing bracket was reached and `records` how many elements were decoded; an incomplete array
    (cut-off download, bad element) keeps everything before the break. `texts()` yields each element's
    source text instead of the parsed value (what ingestion stores).
    """

    def __init__(self, stream: IO[str], chunk_chars: int = _READ_CHUNK_CHARS):
        self._stream = stream
        self._chunk_chars = chunk_chars
        self._decoder = json.JSONDecoder()
        self.complete = False
        self.records = 0

    def __iter__(self) -> Iterator[object]:
        return (value for value, _ in self._elements())

    def texts(self) -> Iterator[str]:
        return (text for _, text in self._elements())

    def _elements(self) -> Iterator[tuple[object, str]]:
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
            text, pos, expect_value = buf[pos:end], end, False
            self.records += 1
            yield value, text


@dataclass
class Container:
    """One opened file: `kind` says how records are laid out; `records()` streams them."""

    source: Path
    kind: str  # jsonl | json_array | json_document | parquet | empty
    compressed: bool
    max_record_bytes: int
    path: Path  # the file to read (a decompressed temporary copy for gzipped Parquet)
    truncated_after: int | None = None  # JSON array that broke off: records read before the break
    cut_off: bool = False  # gzip data that ends before its end marker: only what came before the cut was read

    def _binary(self) -> BinaryIO:
        return _open_gzip(self.path) if self.compressed and self.kind != "parquet" else open(self.path, "rb")

    def records(self) -> Iterator[tuple[int, str, str | None]]:
        """(line_no, raw_text, read_error) per record."""
        for line_no, data, read_error in self.byte_records():
            yield (line_no, *(decoded(data) if read_error is None else (data.decode("utf-8"), read_error)))

    def byte_records(self) -> Iterator[tuple[int, bytes, str | None]]:
        """(line_no, data, read_error) per record, as bytes: what ingestion streams. When `read_error` is None the
        bytes are the record as read and their UTF-8 is *not* checked yet (`decoded`, or a whole batch at once:
        far cheaper than line by line); otherwise they are valid UTF-8 (a preview of an oversized record).
        Sets `truncated_after` and `cut_off` for the pass that reads to the end."""
        self.truncated_after, self.cut_off = None, False
        if self.kind not in ("jsonl", "json_array", "json_document"):
            return
        with self._binary() as stream:
            if self.kind == "jsonl":
                yield from self._jsonl_records(stream)
            elif self.kind == "json_array":
                # surrogateescape: a bad byte survives decoding (inside a string it is just a character), so the
                # element's bytes come back as read and get 'invalid_utf8' like a JSONL line, not the whole file
                reader = JsonArrayReader(io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape"))
                for index, text in enumerate(reader.texts(), start=1):
                    yield index, *self._limited(text.encode("utf-8", "surrogateescape"))
                if not reader.complete:
                    self.truncated_after = reader.records
            else:
                yield 1, *self._limited(stream.read(self.max_record_bytes + 1))
            self.cut_off = getattr(stream.raw, "cut_off", False)

    def _jsonl_records(self, stream: BinaryIO) -> Iterator[tuple[int, bytes, str | None]]:
        limit = self.max_record_bytes
        line_no = 0
        while line := stream.readline(limit + 1):
            line_no += 1
            if len(line) > limit and not line.endswith(b"\n"):
                while (rest := stream.readline(1 << 20)) and not rest.endswith(b"\n"):
                    pass  # skip the rest of an oversized line without holding it
                yield line_no, _preview(line), "record_too_large"
                continue
            if line_no == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            line = line.rstrip(b"\r\n")
            if not line or line.isspace():  # blank (the same test as `not line.strip()`, without copying the line)
                continue
            yield line_no, *self._limited(line)

    def _limited(self, data: bytes) -> tuple[bytes, str | None]:
        if len(data) > self.max_record_bytes:
            return _preview(data), "record_too_large"
        return data, None

    def looks_binary(self) -> bool:
        """NUL bytes or invalid UTF-8 in the first 8 KiB: not a text log at all."""
        if self.kind == "parquet":
            return False
        with self._binary() as stream:
            head = stream.read(8192)
        try:
            codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        except UnicodeDecodeError:
            return True
        return b"\x00" in head

    def sample(self, n: int) -> list[object]:
        """Up to `n` parsed records from the start of the file (for format detection)."""
        if self.kind == "parquet":
            import pyarrow.parquet as pq

            from sdpo_platform.parquet_utf8 import repaired_batch

            batches = pq.ParquetFile(self.path).iter_batches(batch_size=n)
            first = next(batches, None)
            return repaired_batch(first)[0].to_pylist() if first is not None else []
        parsed = []
        for checked, (_, text, error) in enumerate(self.records()):
            if checked >= 20 * n or len(parsed) >= n:
                break
            if error is None:
                with contextlib.suppress(json.JSONDecodeError, RecursionError):
                    parsed.append(json.loads(text))
        return parsed


def decoded(data: bytes) -> tuple[str, str | None]:
    """A record's text; a record that is not UTF-8 is kept with its bad bytes replaced (U+FFFD), flagged 'invalid_utf8'."""
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError:
        return data.decode("utf-8", "replace"), "invalid_utf8"


def _preview(data: bytes) -> bytes:
    """The first 4 KiB of an oversized record, as valid UTF-8."""
    return data[:_PREVIEW_CHARS].decode("utf-8", "replace").encode("utf-8")


class _GzipUpToCut(io.RawIOBase):
    """Gzip data that stops at a cut instead of raising: `gzip` raises EOFError when the file ends before its end
    marker, and a buffered read that hits it drops what it had gathered. Reading through `read1` (at most one
    decompression step, nothing held back) and turning that EOFError into end-of-data plus `cut_off` keeps every
    byte before the cut. Anything else (bad header, CRC mismatch) still raises: that file is unreadable."""

    def __init__(self, path: Path):
        self._gzip = gzip.open(path, "rb")
        self.cut_off = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        try:
            data = self._gzip.read1(len(buffer))
        except EOFError:
            self.cut_off = True
            return 0
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._gzip.close()
        super().close()


def _open_gzip(path: Path, mode: str = "rb") -> io.BufferedReader:
    return io.BufferedReader(_GzipUpToCut(path), buffer_size=_READ_CHUNK_CHARS)


@contextlib.contextmanager
def open_container(path: str | Path, max_record_bytes: int) -> Iterator[Container]:
    """Recognise the container of `path` from its bytes; raises OSError/EOFError if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    with open(path, "rb") as raw:
        compressed = raw.read(2) == _GZIP_MAGIC
    opener = _open_gzip if compressed else open
    with opener(path, "rb") as stream:
        magic = stream.read(4)
    with contextlib.ExitStack() as stack:
        target = path
        if magic == _PARQUET_MAGIC:
            kind = "parquet"
            if compressed:  # Parquet needs random access: decompress once to a temporary file
                tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sdpo-ingest-"))) / "data.parquet"
                with gzip.open(path, "rb") as source, open(tmp, "wb") as out:
                    shutil.copyfileobj(source, out)
                target = tmp
        else:
            kind = _text_kind(path, opener, max_record_bytes)
        yield Container(source=path, kind=kind, compressed=compressed, max_record_bytes=max_record_bytes, path=target)


def _text_kind(path: Path, opener, max_record_bytes: int) -> str:
    with opener(path, "rb") as stream:
        first = b""
        while chunk := stream.read(1 << 16):
            stripped = chunk.lstrip(b" \t\r\n\xef\xbb\xbf")
            if stripped:
                first = stripped[:1]
                break
        if not first:
            return "empty"
    if path.name.lower().endswith(LINE_DELIMITED_SUFFIXES):
        return "jsonl"
    if first == b"[":
        return "json_array"
    with opener(path, "rb") as stream:
        first_line = stream.readline(max_record_bytes + 1).strip()
        try:
            json.loads(first_line)
            return "jsonl"  # a document on one line reads the same either way
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            pass
        if first != b"{":
            return "jsonl"  # not JSON at all: every line becomes an invalid_json record (or an unknown format)
        rest = first_line + stream.read(max_record_bytes)
    try:
        json.loads(rest)
        return "json_document"  # one pretty-printed document
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return "jsonl"
