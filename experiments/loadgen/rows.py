"""A run's rows on disk: `requests.parquet`, one row per request, its per-token lists included.

One encoding for every such file (a job's, a goodput probe's, the simulation cache's, a sweep's): zstd at level 1,
and no dictionary for the per-token lists, whose values are nearly all distinct (a dictionary costs the writer
a hash per token time and saves nothing). A 4,000-request simulated run writes in ~60% of pandas' default
(snappy, dictionaries everywhere); the same frame reads back.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


def write_table(table: pa.Table, path: str | Path) -> None:
    plain = [f.name for f in table.schema if not (pa.types.is_list(f.type) or pa.types.is_large_list(f.type))]
    pq.write_table(table, path, compression="zstd", compression_level=1, use_dictionary=plain)


def write_rows(df: pd.DataFrame, path: str | Path) -> None:
    """`df.to_parquet(path, index=False)`, encoded as `write_table` does (the same pandas metadata)."""
    write_table(pa.Table.from_pandas(df, preserve_index=False), path)
