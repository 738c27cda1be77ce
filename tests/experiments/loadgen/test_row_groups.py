import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from experiments.loadgen import row_groups
from experiments.loadgen.rows import join_rows, with_columns, write_rows, write_table


def _run(path, seed, n, **kw):
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({
        "request_id": np.arange(n),
        "token_times_s": [list(np.cumsum(rng.exponential(0.01, rng.integers(1, 30)))) for _ in range(n)],
        "itl_s": [rng.exponential(0.01, rng.integers(0, 30)) for _ in range(n)],
        "error": [None] * n,
        "ttft_s": rng.exponential(0.1, n),
        "measured": rng.random(n) < 0.9,
        **kw,
    })
    write_rows(df, path)
    return path


def _arrow_join(runs):
    return pa.concat_tables([with_columns(pq.read_table(f), e) for f, e in runs], promote_options="permissive")


def _row_groups(path):
    return pq.read_metadata(path).num_row_groups


def test_copied_row_groups_read_back_as_the_arrow_join(tmp_path):
    # Parts of one and of several row groups; tags of every kind, one a part already has, one None in some parts,
    # an int among floats.
    big = _run(tmp_path / "big.parquet", 9, 70)
    pq.write_table(pq.read_table(big), big, row_group_size=25, compression="zstd",
                   use_dictionary=["request_id", "error", "ttft_s", "measured"])
    runs = [(_run(tmp_path / "a.parquet", 1, 40), {"job": "engine=unified", "rate": 2.0, "run_valid": True,
                                                    "slo_ttft_s": None, "ttft_s": 9.0}),
            (big, {"job": "engine=disagg", "rate": 3, "run_valid": False, "slo_ttft_s": 0.25, "ttft_s": 9.0}),
            (_run(tmp_path / "c.parquet", 2, 1), {"job": "x", "rate": 1.0, "run_valid": True, "slo_ttft_s": None,
                                                  "ttft_s": 1.0})]
    join_rows(runs, tmp_path / "joined.parquet")
    expected = _arrow_join(runs)
    got = pq.read_table(tmp_path / "joined.parquet")
    assert _row_groups(tmp_path / "joined.parquet") == 1 + 3 + 1  # copied, not re-encoded
    assert got.equals(expected) and got.schema.equals(expected.schema, check_metadata=True)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "joined.parquet"), expected.to_pandas())
    f = pq.ParquetFile(tmp_path / "joined.parquet")
    assert [f.metadata.row_group(i).num_rows for i in range(5)] == [40, 25, 25, 20, 1]
    cols = ["job", "token_times_s"]
    assert f.read_row_group(3, columns=cols).equals(expected.slice(90, 20).select(cols))
    assert pq.read_table(tmp_path / "joined.parquet", filters=[("rate", "=", 3.0)]).num_rows == 70


def test_parts_whose_own_columns_differ_are_joined_through_arrow(tmp_path):
    runs = [(_run(tmp_path / "a.parquet", 1, 10), {"job": "a"}),
            (_run(tmp_path / "b.parquet", 2, 10, error=["timeout"] * 10), {"job": "b"})]
    join_rows(runs, tmp_path / "joined.parquet")
    assert pq.read_table(tmp_path / "joined.parquet").equals(_arrow_join(runs))
    assert _row_groups(tmp_path / "joined.parquet") == 1


def test_a_file_with_a_page_index_is_refused_before_anything_is_written(tmp_path):
    p = tmp_path / "indexed.parquet"
    pq.write_table(pq.read_table(_run(tmp_path / "a.parquet", 1, 10)), p, write_page_index=True)
    out = tmp_path / "out.bin"
    with open(out, "wb") as f:
        assert not row_groups.concat([(p.read_bytes(), None)], pq.read_schema(p), f, lambda t: b"")
    assert out.stat().st_size == 0
    join_rows([(p, {"job": "a"})], tmp_path / "joined.parquet")  # joined through Arrow instead
    assert pq.read_table(tmp_path / "joined.parquet").equals(_arrow_join([(p, {"job": "a"})]))


def test_not_a_parquet_file_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="not a Parquet file"):
        row_groups.footer(b"PAR1 not really")
    with pytest.raises(ValueError, match="unexpected length"):
        row_groups.footer(b"PAR1" + bytes([0x15]) + (1).to_bytes(4, "little") + b"PAR1")  # a struct cut short


def test_a_run_without_rows_joins_as_arrow_joins_it(tmp_path):
    empty = tmp_path / "empty.parquet"
    write_table(pq.read_table(_run(tmp_path / "a.parquet", 1, 5)).slice(0, 0), empty)  # one row group, no rows
    runs = [(tmp_path / "a.parquet", {"job": "a", "rate": 1.0}), (empty, {"job": "b", "rate": 2.0})]
    join_rows(runs, tmp_path / "joined.parquet")
    expected = _arrow_join(runs)
    got = pq.read_table(tmp_path / "joined.parquet")
    assert got.equals(expected) and got.schema.equals(expected.schema, check_metadata=True)
    assert _row_groups(tmp_path / "joined.parquet") == 2
