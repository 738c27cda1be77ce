"""The simulator benchmark's main path, ours alone, on a small workload."""

import json

from experiments.bench import simulator as bench


def test_ours_alone_writes_positive_numbers(tmp_path, capsys):
    out = tmp_path / "bench.json"
    res = bench.main(["--requests", "200", "--rate", "24", "--repeats", "2", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(res))
    assert data["requests"] == 200 and data["rate"] == 24 and data["notes"] == []
    (ours,) = data["results"]
    assert ours["simulator"] == "ours" and ours["model"] == "llama3-8b"
    assert ours["requests"] == ours["finished"] == 200
    assert len(ours["runs"]) == 2
    for run in ours["runs"]:
        assert run["finished"] == 200
        assert run["wall_s"] > 0 and run["makespan_s"] > 0
        assert run["iterations"] >= run["fast_forwarded"] >= 0
        assert run["events"] >= 200  # one arrival each, at least
    assert 0 < ours["wall_s_min"] <= ours["wall_s_median"]
    assert ours["sim_req_per_s"] == 200 / ours["wall_s_min"] > 0
    assert "ratio_vs_simdistserve" not in ours
    assert "ours" in capsys.readouterr().out  # the table


def test_semipd_has_no_simdistserve_counterpart(tmp_path):
    res = bench.main(["--requests", "50", "--engine", "semipd", "--repeats", "1",
                      "--simdistserve", str(tmp_path)])
    assert [r["simulator"] for r in res["results"]] == ["ours"]
    assert any("no counterpart" in n for n in res["notes"])
