import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from experiments.loadgen.rows import write_rows


def test_rows_read_back_as_pandas_wrote_them_without_dictionaries_for_the_lists(tmp_path):
    rng = np.random.default_rng(0)
    df = pd.DataFrame({
        "request_id": np.arange(50),
        "token_times_s": [list(np.cumsum(rng.exponential(0.01, rng.integers(1, 40)))) for _ in range(50)],
        "itl_s": [rng.exponential(0.01, rng.integers(0, 40)) for _ in range(50)],
        "error": [None] * 49 + ["timeout"],
        "ttft_s": rng.exponential(0.1, 50),
    })
    write_rows(df, tmp_path / "ours.parquet")
    df.to_parquet(tmp_path / "pandas.parquet", index=False)
    ours, theirs = pq.ParquetFile(tmp_path / "ours.parquet"), pq.ParquetFile(tmp_path / "pandas.parquet")
    assert ours.schema_arrow.equals(theirs.schema_arrow, check_metadata=True)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "ours.parquet"), pd.read_parquet(tmp_path / "pandas.parquet"))
    columns = {ours.metadata.row_group(0).column(i).path_in_schema: ours.metadata.row_group(0).column(i)
               for i in range(ours.metadata.num_columns)}
    assert columns["token_times_s.list.element"].compression == "ZSTD"
    assert not columns["token_times_s.list.element"].dictionary_page_offset
    assert columns["request_id"].dictionary_page_offset is not None
