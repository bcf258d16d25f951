"""Parquet logs whose strings are not all UTF-8: one bad value costs its row, not the file.

DuckDB's Parquet reader (which ingestion uses) stops at the first string that is not UTF-8, so such a
file used to be rejected whole, while a JSONL file loses only the bad line. Arrow reads the bytes as
they are and can say which batches hold bad strings (`RecordBatch.validate(full=True)`, in C++, cheap
next to ingestion). A clean file keeps DuckDB's fast path; a file with bad strings is read here instead:
the rows that hold one keep their values with the bad bytes replaced (U+FFFD) and are flagged
'invalid_utf8', as a bad JSONL line is, so cleaning quarantines them with the file and row number.

Not covered: a dictionary-encoded column with int8 indices (a pandas categorical) whose dictionary holds
a bad string fails inside Arrow's own reader, so that file is still rejected whole ('unreadable_file').
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

BATCH_ROWS = 8192
# `repaired_table`'s columns: the file's row as one struct (so no name of the file's can collide with ours),
# its 1-based row number in the file (DuckDB's file_row_number + 1) and 'invalid_utf8' or null.
ROW, LINE_NO, READ_ERROR = "row", "line_no", "read_error"


def file_is_utf8(path: str | Path) -> bool:
    """Whether every string in the file is UTF-8 (one streaming pass over its batches)."""
    return all(_is_valid(batch) for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS))


def has_column(path: str | Path, name: str) -> bool:
    """Whether the file has a top-level column `name` (from its footer)."""
    return name in pq.ParquetFile(path).schema_arrow.names


def repaired_batch(batch: pa.RecordBatch) -> tuple[pa.RecordBatch, list[bool]]:
    """`batch` with every string made UTF-8 (bad bytes replaced by U+FFFD), and which rows had bad bytes."""
    if _is_valid(batch):
        return batch, [False] * batch.num_rows
    raw = pa.RecordBatch.from_arrays(
        [column.view(_as_binary(column.type)) for column in batch.columns], schema=pa.schema(
            [field.with_type(_as_binary(field.type)) for field in batch.schema]))
    rows, bad = [], []
    for row in raw.to_pylist():  # only batches that hold a bad value: rare, so plain Python is fine
        flagged = [False]
        rows.append({field.name: _decoded(row[field.name], field.type, flagged) for field in batch.schema})
        bad.append(flagged[0])
    return pa.RecordBatch.from_pylist(rows, schema=batch.schema), bad


def repaired_table(path: str | Path) -> pa.Table:
    """The whole file with its strings repaired, as `ROW`, `LINE_NO`, `READ_ERROR` columns.

    Types DuckDB reads differently from Arrow than from Parquet are cast to what its Parquet reader
    gives (half floats to float, durations to their integer count), so the rows read as they would on
    the clean path. Held in memory: only files with a bad string come here."""
    parquet = pq.ParquetFile(path)
    row_type = pa.struct(list(_duckdb_schema(parquet.schema_arrow)))
    schema = pa.schema([(ROW, row_type), (LINE_NO, pa.int64()), (READ_ERROR, pa.string())])
    batches, offset = [], 0
    for batch in parquet.iter_batches(batch_size=BATCH_ROWS):
        fixed, bad = repaired_batch(batch)
        rows = fixed.to_struct_array().cast(row_type)
        line_nos = pa.array(range(offset + 1, offset + batch.num_rows + 1), pa.int64())
        batches.append(pa.RecordBatch.from_arrays([rows, line_nos, pa.array(["invalid_utf8" if b else None for b in bad], pa.string())], schema=schema))
        offset += batch.num_rows
    return pa.Table.from_batches(batches, schema=schema)


def _is_valid(batch: pa.RecordBatch) -> bool:
    try:
        batch.validate(full=True)  # checks UTF-8 of every string, nested ones included
    except pa.ArrowInvalid:
        return False
    return True


def _mapped(t: pa.DataType, leaf) -> pa.DataType:
    """`t` with `leaf` applied to every non-nested type inside it (lists, maps, structs, dictionaries)."""
    if pa.types.is_dictionary(t):
        return pa.dictionary(t.index_type, _mapped(t.value_type, leaf), t.ordered)
    if pa.types.is_large_list(t):
        return pa.large_list(t.value_field.with_type(_mapped(t.value_type, leaf)))
    if pa.types.is_fixed_size_list(t):
        return pa.list_(t.value_field.with_type(_mapped(t.value_type, leaf)), t.list_size)
    if pa.types.is_map(t):
        return pa.map_(t.key_field.with_type(_mapped(t.key_type, leaf)), t.item_field.with_type(_mapped(t.item_type, leaf)))
    if pa.types.is_list(t):
        return pa.list_(t.value_field.with_type(_mapped(t.value_type, leaf)))
    if pa.types.is_struct(t):
        return pa.struct([t.field(i).with_type(_mapped(t.field(i).type, leaf)) for i in range(t.num_fields)])
    return leaf(t)


def _binary_leaf(t: pa.DataType) -> pa.DataType:
    """Each string type as the binary type of the same layout (a zero-copy view)."""
    if pa.types.is_string(t):
        return pa.binary()
    if pa.types.is_large_string(t):
        return pa.large_binary()
    if pa.types.is_string_view(t):
        return pa.binary_view()
    return t


def _duckdb_leaf(t: pa.DataType) -> pa.DataType:
    """What DuckDB's Parquet reader gives where its Arrow scan differs (or cannot read the type at all)."""
    if pa.types.is_float16(t):
        return pa.float32()
    if pa.types.is_duration(t):
        return pa.int64()
    return t


def _as_binary(t: pa.DataType) -> pa.DataType:
    return _mapped(t, _binary_leaf)


def _duckdb_schema(schema: pa.Schema) -> pa.Schema:
    return pa.schema([field.with_type(_mapped(field.type, _duckdb_leaf)) for field in schema])


def _decoded(value, t: pa.DataType, flagged: list[bool]):
    """`value`, read through the binary view of type `t`, with the bytes of `t`'s strings decoded as UTF-8
    (binary columns stay bytes); `flagged[0]` is set when some were not UTF-8."""
    if value is None:
        return None
    if pa.types.is_dictionary(t):
        return _decoded(value, t.value_type, flagged)
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            flagged[0] = True
            return value.decode("utf-8", "replace")
    if pa.types.is_map(t):  # a list of (key, item) pairs
        return [(_decoded(k, t.key_type, flagged), _decoded(v, t.item_type, flagged)) for k, v in value]
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return [_decoded(v, t.value_type, flagged) for v in value]
    if pa.types.is_struct(t):
        return {f.name: _decoded(value[f.name], f.type, flagged) for f in t}
    return value
