"""Prefix caching in the multi-process engines: semi-PD's two workers share one cache over their one pool; a
disaggregated engine caches in its prefill instance. Outputs stay greedy-identical either way."""

from __future__ import annotations

import pytest

from tests.helpers.server import ServerProcess, metric, post_json


@pytest.mark.parametrize("engine", ["semipd", "disagg"])
def test_shared_prefixes_are_computed_once_and_outputs_unchanged(engine):
    base = list(range(2000, 2064))  # 4 full blocks of 16
    prompts = [base + [7, 8, 9], base[:48] + [10, 11], base + [7, 8, 9]]
    srv = ServerProcess(f"engine={engine}", "model=tiny", "engine.kv_cache_mb=32")
    try:
        answers, copied = [], []
        for p in prompts:  # one after the other: each finds what the ones before left in the cache
            status, r = post_json(srv.url + "/v1/completions", {"prompt": p, "max_tokens": 12, "temperature": 0,
                                                                 "ignore_eos": True})
            assert status == 200, r
            answers.append((r["choices"][0]["text"], r["usage"]["prompt_tokens_details"]["cached_tokens"]))
            copied.append(metric(srv.url, "kv_transfer_cached_blocks_total") or 0)
        assert [c for _, c in answers] == [0, 48, 64]
        assert answers[2][0] == answers[0][0]  # (disagg: decoded over blocks the decode instance had cached)
        assert metric(srv.url, "prefix_cache_hits_total") == 112
        if engine == "disagg":  # the decode instance kept the first prompt's 4 full blocks: 3, then 4 not copied
            assert copied == [0, 3, 7]
        status, _ = post_json(srv.url + "/reset_prefix_cache", {})
        assert status == 200
        status, r = post_json(srv.url + "/v1/completions", {"prompt": prompts[0], "max_tokens": 12,
                                                             "temperature": 0, "ignore_eos": True})
        assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == 0 and r["choices"][0]["text"] == answers[0][0]
    finally:
        srv.stop()
    off = ServerProcess(f"engine={engine}", "model=tiny", "engine.kv_cache_mb=32",
                        "engine.enable_prefix_caching=false")
    try:
        status, r = post_json(off.url + "/v1/completions", {"prompt": prompts[1], "max_tokens": 12,
                                                             "temperature": 0, "ignore_eos": True})
        assert status == 200 and r["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert r["choices"][0]["text"] == answers[1][0]  # the cached prefix changed nothing in the answer
    finally:
        off.stop()
