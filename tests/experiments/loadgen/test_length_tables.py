"""Length tables: the shipped ShareGPT table, `workload=sharegpt_lengths` drawing whole rows, and bad tables."""

from __future__ import annotations

import numpy as np
import pytest

from experiments.loadgen import length_tables
from experiments.loadgen.workloads import WorkloadError, load_workload
from tests.helpers.experiment_configs import workload_cfg


def _pairs(w) -> np.ndarray:
    return np.array([(i.prompt_len, i.output_len) for i in w.items])


def test_the_shipped_table_is_sharegpt_under_llama3s_tokenizer():
    t = length_tables.read(length_tables.SHARED_TABLE)
    keep = (t[:, 0] > 0) & (t[:, 1] > 0) & (t[:, 0] <= 1024) & (t.sum(1) <= 2048)
    # the tokenizer report's held-out third gives 105.2 / 265.3 under the paper's filter (3,529 pairs)
    assert len(t) == 11135 and keep.sum() == 10381
    assert t[keep, 0].mean() == pytest.approx(109.5, abs=0.1) and t[keep, 1].mean() == pytest.approx(267.6, abs=0.1)


def test_pairs_are_drawn_whole_within_the_filters_and_by_the_seed():
    table = {tuple(r) for r in length_tables.read(length_tables.SHARED_TABLE).tolist()}
    a = load_workload(workload_cfg(name="sharegpt_lengths", num_requests=3000, seed=1))
    pairs = _pairs(a)
    assert len(pairs) == 3000 and {tuple(p) for p in pairs.tolist()} <= table  # no prompt paired with another's answer
    assert pairs[:, 0].max() <= 1024 and pairs.sum(1).max() <= 2048 and pairs.min() >= 1
    assert np.array_equal(pairs, _pairs(load_workload(workload_cfg(name="sharegpt_lengths", num_requests=3000, seed=1))))
    assert not np.array_equal(pairs, _pairs(load_workload(workload_cfg(name="sharegpt_lengths", num_requests=3000,
                                                                       seed=2))))
    # the correlation of a dataset's prompt and answer lengths survives (independent draws would give ~0)
    t = length_tables.read(length_tables.SHARED_TABLE)
    ok = (t[:, 0] >= 4) & (t[:, 1] >= 1) & (t[:, 0] <= 1024) & (t.sum(1) <= 2048)
    assert np.corrcoef(pairs.T)[0, 1] == pytest.approx(np.corrcoef(t[ok].T)[0, 1], abs=0.05)


def test_a_table_of_ones_own_scaled_and_filtered(tmp_path):
    p = tmp_path / "lengths.csv"
    p.write_text("# my service\nprompt_len,output_len\n100,10\n3000,5\n40,0\n")
    w = load_workload(workload_cfg(name="sharegpt_lengths", path=str(p), num_requests=20, length_scale=0.5))
    assert {(i.prompt_len, i.output_len) for i in w.items} == {(50, 5)}  # 1500 > max_prompt_len; empty answer


@pytest.mark.parametrize("text, where", [
    ("prompt,output\n1,2\n", "first line must be the header"),
    ("prompt_len,output_len\n1,2\n3,x\n", "lengths.csv:3: expected two integers"),
    ("prompt_len,output_len\n1,-2\n", "lengths.csv:2: negative length"),
    ("prompt_len,output_len\n", "no rows"),
])
def test_a_bad_table_names_the_file_and_line(tmp_path, text, where):
    p = tmp_path / "lengths.csv"
    p.write_text(text)
    with pytest.raises(WorkloadError, match=where):
        load_workload(workload_cfg(name="sharegpt_lengths", path=str(p), num_requests=5))


def test_no_row_within_the_filters_is_an_error(tmp_path):
    p = tmp_path / "lengths.csv"
    p.write_text("prompt_len,output_len\n5000,10\n")
    with pytest.raises(WorkloadError, match="no row passes the length filters"):
        load_workload(workload_cfg(name="sharegpt_lengths", path=str(p), num_requests=5))
    with pytest.raises(WorkloadError, match="no such file"):
        load_workload(workload_cfg(name="sharegpt_lengths", path=str(tmp_path / "missing.csv"), num_requests=5))
