import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from experiments.loadgen import thrift_compact as T
from experiments.loadgen.row_groups import footer


def test_a_parquet_footer_reads_and_writes_back_byte_for_byte():
    buf = io.BytesIO()
    table = pa.table({"a": np.arange(10), "l": [[0.5] * i for i in range(10)], "s": ["x"] * 10, "b": [True] * 10})
    pq.write_table(table, buf, row_group_size=3, compression="zstd")
    data = buf.getvalue()
    n = int.from_bytes(data[-8:-4], "little")
    meta, end = T.loads(data[-8 - n:-8])
    assert end == n and T.dumps(meta) == data[-8 - n:-8]
    assert meta[3][1] == 10 and len(meta[4][1][1]) == 4  # num_rows, row groups
    assert footer(data) == meta


def test_every_type_round_trips():
    s = {1: (T.TRUE, True), 2: (T.FALSE, False), 3: (T.BYTE, -7), 4: (T.I16, -300), 5: (T.I32, 2**31 - 1),
         6: (T.I64, -(2**62)), 7: (T.DOUBLE, 0.1), 8: (T.BINARY, b"\x00\xff"),
         30: (T.LIST, (T.I32, list(range(-20, 20)))),
         31: (T.LIST, (T.TRUE, [True, False, True])), 32: (T.SET, (T.BINARY, [b"a"])),
         33: (T.MAP, (T.BINARY, T.I64, [(b"k", 1), (b"j", -2)])), 34: (T.MAP, (0, 0, [])),
         200: (T.STRUCT, {1: (T.LIST, (T.STRUCT, [{1: (T.I64, 5)}, {}]))})}
    enc = T.dumps(s)
    assert T.loads(enc) == (s, len(enc))


def test_an_unknown_type_is_an_error_not_a_wrong_value():
    with pytest.raises(ValueError, match="unknown type"):
        T.loads(bytes([0x1E]))  # field 1 of type 14
