"""The GPU check command: refuses to pass without a GPU, reads pytest's report test by test, one table."""

from __future__ import annotations

from experiments.bench import gpu_check


def test_without_a_gpu_it_says_so_and_exits_non_zero(capsys):
    assert gpu_check.main([]) == 2
    assert "no CUDA device here" in capsys.readouterr().out


def test_each_gpu_test_is_a_row_of_the_table(tmp_path, monkeypatch):
    def fake_run(cmd, timeout_s):
        (tmp_path / "gpu_tests.xml").write_text(
            '<testsuites><testsuite><testcase name="test_a" time="1.5"/>'
            '<testcase name="test_b" time="0.2"><failure message="assert 1 == 2"/></testcase>'
            '<testcase name="test_c" time="0"><skipped message="needs green contexts"/></testcase>'
            '</testsuite></testsuites>')
        return 1, "", 2.0

    monkeypatch.setattr(gpu_check, "_run", fake_run)
    checks = gpu_check.gpu_tests(tmp_path, 60)
    assert [(c.name, c.passed) for c in checks] == [("test test_a", True), ("test test_b", False),
                                                    ("test test_c", False)]
    assert checks[1].detail == "assert 1 == 2" and checks[2].detail.startswith("skipped")
    text = gpu_check.table(checks)
    assert "test test_b" in text and "NO" in text and text.count("\n") == 3
