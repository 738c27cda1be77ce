"""Parquet files joined by copying their encoded row groups: no page decoded, decompressed or encoded again.

A sweep's requests.parquet is every job's rows with a few job-level columns; a goodput search's is every probe's.
Read and written again through Arrow, the paper presets' 320,000-400,000 rows (over 200 million token times) cost
~8 s of a one-minute sweep, all of it decoding and re-encoding pages that do not change. Here each output row group
is a source row group's column chunks, copied as bytes, followed by its job-level columns' chunks (encoded once per
part and row count: a few hundred bytes); the footer lists the source footers' row groups with their offsets moved,
under the schema and key-value metadata (Arrow schema, pandas) that Arrow writes for the joined table. Arrow reads
the same table back. What this does not handle (page indexes, bloom filters, encryption, column chunks in other
files) is refused before anything is written, and the caller joins through Arrow.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import BinaryIO, Optional

import pyarrow as pa

from experiments.loadgen import thrift_compact as T

MAGIC = b"PAR1"
# parquet.thrift's field ids. FileMetaData: 3 num_rows, 4 row_groups. RowGroup: 1 columns, 2 total_byte_size,
# 3 num_rows, 5 file_offset, 6 total_compressed_size (7, ordinal, left out, as Arrow writes none). ColumnChunk:
# 1 file_path, 3 meta_data, 4-7 page index, 8-9 encryption. ColumnMetaData: 7 total_compressed_size,
# 9 data_page_offset, 10 index_page_offset, 11 dictionary_page_offset, 14-15 bloom filter.
_UNHANDLED_CHUNK = (1, 4, 5, 6, 7, 8, 9)
_UNHANDLED_META = (10, 14, 15)
Chunks = list[tuple[T.Struct, list[tuple[T.Struct, int, int]]]]


def footer(data: bytes | memoryview) -> T.Struct:
    if bytes(data[:4]) != MAGIC or bytes(data[-4:]) != MAGIC:
        raise ValueError("not a Parquet file")
    n = struct.unpack("<I", data[-8:-4])[0]
    try:
        meta, end = T.loads(data[-8 - n:-8])
    except IndexError:
        end = -1
    if end != n:
        raise ValueError("Parquet footer of unexpected length")
    return meta


def copyable(meta: T.Struct) -> Optional[Chunks]:
    """Per row group: the row group and, per column chunk, (chunk, first byte, length); None if a chunk cannot be
    moved by changing its page offsets alone."""
    out = []
    for rg in meta[4][1][1]:
        cols = []
        for cc in rg[1][1][1]:
            md = cc.get(3, (T.STRUCT, None))[1]
            if md is None or any(k in cc for k in _UNHANDLED_CHUNK) or any(k in md for k in _UNHANDLED_META):
                return None
            start = min(md[9][1], md[11][1]) if 11 in md else md[9][1]
            cols.append((cc, start, md[7][1]))
        out.append((rg, cols))
    return out


def _moved(cc: T.Struct, by: int) -> T.Struct:
    md = dict(cc[3][1])
    for k in (9, 11):
        if k in md:
            md[k] = (T.I64, md[k][1] + by)
    return {**cc, 3: (T.STRUCT, md)}


def concat(parts: list[tuple[bytes, Optional[Callable[[int], pa.Table]]]], schema: pa.Schema, out: BinaryIO,
           encode: Callable[[pa.Table], bytes]) -> bool:
    """Writes to `out` every part's rows (a Parquet file's bytes), each row group followed by the part's extra
    columns (`extra(n)`: a table of n rows, or None), under `schema`: the joined table's, whose leaves are each
    part's then its extras'. `encode` writes a table as the parts were written. False, and nothing written, when a
    part cannot be copied."""
    plans = []
    for data, extra in parts:
        chunks = copyable(footer(data))
        if chunks is None:
            return False
        plans.append((memoryview(data), chunks, extra))
    head = footer(encode(schema.empty_table()))  # the joined table's schema, column orders and metadata
    pos, row_groups, num_rows = len(MAGIC), [], 0
    out.write(MAGIC)
    for data, chunks, extra in plans:
        encoded: dict[int, tuple[memoryview, T.Struct, list]] = {}
        for rg, cols in chunks:
            n, size, first, new_cols = rg[3][1], rg[2][1], pos, []
            sources = [(data, cols)]
            if extra is not None:
                if n not in encoded:
                    enc = encode(extra(n))
                    ((erg, ecols),) = copyable(footer(enc))
                    encoded[n] = (memoryview(enc), erg, ecols)
                enc, erg, ecols = encoded[n]
                sources.append((enc, ecols))
                size += erg[2][1]
            for src, cs in sources:
                for cc, start, length in cs:
                    out.write(src[start:start + length])
                    new_cols.append(_moved(cc, pos - start))
                    pos += length
            row_groups.append({1: (T.LIST, (T.STRUCT, new_cols)), 2: (T.I64, size), 3: (T.I64, n),
                               5: (T.I64, first), 6: (T.I64, pos - first)})
            num_rows += n
    meta = T.dumps({**head, 3: (T.I64, num_rows), 4: (T.LIST, (T.STRUCT, row_groups))})
    out.write(meta)
    out.write(struct.pack("<I", len(meta)))
    out.write(MAGIC)
    return True
