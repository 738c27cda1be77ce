"""A run's rows on disk: `requests.parquet`, one row per request, its per-token lists included.

One encoding for every such file (a job's, a goodput probe's, the simulation cache's, a sweep's): zstd at level 1,
and no dictionary for the per-token lists, whose values are nearly all distinct (a dictionary costs the writer
a hash per token time and saves nothing). A 4,000-request simulated run writes in ~60% of pandas' default
(snappy, dictionaries everywhere); the same frame reads back.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from experiments.loadgen import row_groups


def write_table(table: pa.Table, where: str | Path | io.BytesIO) -> None:
    plain = [f.name for f in table.schema if not (pa.types.is_list(f.type) or pa.types.is_large_list(f.type))]
    pq.write_table(table, where, compression="zstd", compression_level=1, use_dictionary=plain)


def encoded(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    write_table(table, buf)
    return buf.getvalue()


def write_rows(df: pd.DataFrame, path: str | Path) -> None:
    """`df.to_parquet(path, index=False)`, encoded as `write_table` does (the same pandas metadata)."""
    write_table(pa.Table.from_pandas(df, preserve_index=False), path)


def _constant(v: Any, n: int) -> pa.Array:
    return pa.array([v] * n, type=pa.array([v]).type)  # the type of n >= 1 values, for n = 0 too


def with_columns(table: pa.Table, extra: dict[str, Any]) -> pa.Table:
    """A run's rows with its job-level columns (those the rows do not have already)."""
    for k, v in extra.items():
        if k not in table.column_names:
            table = table.append_column(k, _constant(v, table.num_rows))
    return table


def join_rows(runs: list[tuple[Path, dict[str, Any]]], out: Path) -> None:
    """Several runs' rows files as one (a sweep's jobs, a goodput search's probes), per-token lists included, each
    tagged with its columns, written whole or not at all. The table is what Arrow's `concat_tables` of the tagged
    runs gives; when every run's columns are that table's, the file is the runs' encoded row groups copied
    (`row_groups`: the paper presets' 200 million token times never decoded), else it is joined as Arrow tables."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    files = [Path(f).read_bytes() for f, _ in runs]
    schemas = [pq.read_schema(pa.BufferReader(b)) for b in files]
    tagged = [with_columns(s.empty_table(), extra).schema for s, (_, extra) in zip(schemas, runs)]
    schema = pa.concat_tables([s.empty_table() for s in tagged], promote_options="permissive").schema
    copied = False
    # Each run's own columns copied as they are on disk, so they must be the joined table's; its tags are encoded
    # here, as the join types them (an int tag beside float ones: a float column).
    if all(list(s) == list(schema)[:len(s)] and t.names == schema.names for s, t in zip(schemas, tagged)):
        parts = [(b, _tags(schema, len(s), extra)) for b, s, (_, extra) in zip(files, schemas, runs)]
        with open(tmp, "wb") as f:
            copied = row_groups.concat(parts, schema, f, encoded)
    if not copied:
        write_table(pa.concat_tables([with_columns(pq.read_table(pa.BufferReader(b)), extra)
                                      for b, (_, extra) in zip(files, runs)], promote_options="permissive"), tmp)
    os.replace(tmp, out)


def _tags(schema: pa.Schema, start: int, extra: dict[str, Any]):
    fields = list(schema)[start:]
    if not fields:
        return None
    return lambda n: pa.table([_constant(extra[f.name], n).cast(f.type) for f in fields], schema=pa.schema(fields))
