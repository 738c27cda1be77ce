"""Workloads: shipped traces, trace windows, file formats and their errors, ShareGPT roles, synthetic means."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments.loadgen.workloads import WorkloadError, load_workload
from tests.helpers.experiment_configs import workload_cfg


def test_shipped_traces_parse():
    moon = load_workload(workload_cfg(name="mooncake", num_requests=50, length_scale=0.05, max_prompt_len=2048,
                              max_total_len=4096))
    azure = load_workload(workload_cfg(name="azure", num_requests=50, time_scale=2.0))
    for w in (moon, azure):
        assert len(w.items) == 50 and w.has_timestamps
        ts = [i.timestamp for i in w.items]
        assert ts[0] == 0 and ts == sorted(ts)
    assert azure.items[-1].timestamp < 60  # 50 requests of a busy hour, at 2x speed


def test_trace_window_and_time_scale():
    full = load_workload(workload_cfg(name="azure", num_requests=10**6, window_s=60.0))
    fast = load_workload(workload_cfg(name="azure", num_requests=10**6, window_s=60.0, time_scale=3.0))
    assert len(full.items) == len(fast.items) > 10
    assert fast.items[-1].timestamp == pytest.approx(full.items[-1].timestamp / 3)
    assert full.items[-1].timestamp < 60


def test_burstgpt_csv(tmp_path):
    p = tmp_path / "burst.csv"
    p.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                 "5,ChatGPT,100,50,150,Conversation log\n7.5,ChatGPT,20,0,20,Conversation log\n"
                 "9,GPT-4,300,80,380,API log\n")
    w = load_workload(workload_cfg(name="burstgpt", path=str(p)))
    assert [(i.prompt_len, i.output_len, i.timestamp) for i in w.items] == [(100, 50, 0.0), (300, 80, 4.0)]


@pytest.mark.parametrize("name,content,where", [
    ("mooncake", '{"timestamp": 0, "input_length": 5, "output_length": 3}\n{"timestamp": 1, "input_length": 5}\n',
     ":2:"),
    ("mooncake", '{"timestamp": 0, "input_length": 5, "output_length": 3}\nnot json\n', ":2:"),
    ("azure", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,10,5\n"
              "2023-11-16 18:15:47.0000000,ten,5\n", ":3:"),
    ("azure", "TIME,ContextTokens\n1,2\n", ":1:"),
    ("sharegpt", "[{\"id\": 1}]", "record 0"),
    ("sharegpt", "[{\"id\": 1, ", "not valid JSON"),
])
def test_malformed_files_fail_naming_file_and_line(tmp_path, name, content, where):
    p = tmp_path / f"bad.{name}"
    p.write_text(content)
    with pytest.raises(WorkloadError) as e:
        load_workload(workload_cfg(name=name, path=str(p)))
    assert str(p) in str(e.value) and where in str(e.value)


def test_sharegpt_roles_checked_and_filters(tmp_path):
    data = [
        {"id": "a", "conversations": [{"from": "gpt", "value": "I start"}, {"from": "human", "value": "hi"}]},
        {"id": "b", "conversations": [{"from": "human", "value": "tell me a story"},
                                      {"from": "gpt", "value": "once upon a time there was a fox"}]},
        {"id": "c", "conversations": [{"from": "human", "value": "only a question"}]},
        {"id": "d", "conversations": [{"from": "human", "value": "x " * 3000}, {"from": "gpt", "value": "ok"}]},
    ]
    p = tmp_path / "sg.json"
    p.write_text(json.dumps(data))
    from semipd_engine.serving.tokenizer import builtin_tokenizer

    w = load_workload(workload_cfg(name="sharegpt", path=str(p), num_requests=10), builtin_tokenizer())
    assert [i.prompt_text for i in w.items] == ["tell me a story"]


def test_synthetic_matches_configured_means_and_filters():
    w = load_workload(workload_cfg(name="synthetic", num_requests=4000, max_prompt_len=10**6, max_total_len=10**7))
    p = np.array([i.prompt_len for i in w.items])
    o = np.array([i.output_len for i in w.items])
    assert abs(p.mean() / 161.3 - 1) < 0.1 and abs(o.mean() / 338.0 - 1) < 0.1
    f = load_workload(workload_cfg(name="synthetic", num_requests=500))
    assert all(i.prompt_len <= 1024 and i.prompt_len + i.output_len <= 2048 for i in f.items)


def test_a_sharegpt_file_cut_mid_record_keeps_its_complete_conversations(tmp_path, caplog):
    conv = {"id": "a", "conversations": [{"from": "human", "value": "tell me a story about a fox, please"},
                                         {"from": "gpt", "value": "once upon a time"}]}
    p = tmp_path / "cut.json"
    p.write_text(json.dumps([conv, conv, conv])[:-40])  # ends inside the third record
    with caplog.at_level("WARNING"):
        w = load_workload(workload_cfg(name="sharegpt", path=str(p), num_requests=10))
    assert len(w.items) == 2 and "2 complete conversations" in caplog.text
    p.write_text("{not json")
    with pytest.raises(WorkloadError, match="not valid JSON"):
        load_workload(workload_cfg(name="sharegpt", path=str(p)))


def test_shared_prefix_groups_and_mooncake_blocks_become_prompts_that_share_exactly_that():
    from experiments.loadgen.prompts import PromptBuilder, prompt_token_ids

    w = load_workload(workload_cfg(name="shared_prefix", num_prefix_groups=3, prefix_len=40, prompt_mean=20,
                                   num_requests=30))
    b = PromptBuilder(None, seed=0)
    ids = [prompt_token_ids(b, it) for it in w.items]
    assert [len(x) for x in ids] == [it.prompt_len for it in w.items]
    assert {it.prefix_group for it in w.items} == {0, 1, 2}
    for it, x in zip(w.items, ids):
        for jt, y in zip(w.items, ids):
            same = x[:40] == y[:40]
            assert same == (it.prefix_group == jt.prefix_group)
            if it is not jt:
                assert x[40:] != y[40:]  # the questions differ
    moon = load_workload(workload_cfg(name="mooncake", num_requests=4, length_scale=1 / 64, max_prompt_len=4096,
                                      max_total_len=8192))  # 512-token blocks become 8
    assert [it.hash_blocks[:2] for it in moon.items] == [(0, 1), (0, 14), (0, 28), (0, 42)]
    assert all(it.block_len == 8 for it in moon.items)
    ids = [prompt_token_ids(b, it) for it in moon.items]
    assert all(x[:8] == ids[0][:8] for x in ids) and ids[0][8:16] != ids[1][8:16]  # block 0 shared, then not
    with pytest.raises(WorkloadError, match="prefix_len"):
        load_workload(workload_cfg(name="shared_prefix", prefix_len=5000))


def test_drawn_conversations_grow_their_prompts_by_each_answer_and_message():
    wl = load_workload(workload_cfg(name="synthetic", multi_turn=True, num_requests=300, turns_mean=4.0,
                                    think_time_s=2.0, max_prompt_len=8192, max_total_len=10240))
    items = wl.items
    assert len(items) == 300 and 0 < wl.num_conversations < 300
    turns = [it.turn for it in items]
    assert 3.0 < len(items) / wl.num_conversations < 5.0  # turns_mean, less what the filters cut
    for prev, it in zip(items, items[1:]):
        if it.conversation == prev.conversation:
            assert it.turn == prev.turn + 1 and it.prompt_len == prev.prompt_len + prev.output_len + it.user_len
        else:
            assert it.turn == 0 and it.conversation == prev.conversation + 1 and it.prompt_len == it.user_len
    assert all(it.think_s == 0 for it in items if it.turn == 0)
    later = np.array([it.think_s for it in items if it.turn])
    assert 1.5 < later.mean() < 2.5 and later.std() > 1.0  # exponential, mean 2 s
    assert max(turns) >= 4
    # every turn passes the filters: a conversation ends before its first turn that would not
    tight = load_workload(workload_cfg(name="synthetic", multi_turn=True, num_requests=200, max_prompt_len=600,
                                       max_total_len=900, think_time_dist="constant", think_time_s=0.5))
    assert all(it.prompt_len <= 600 and it.prompt_len + it.output_len <= 900 for it in tight.items)
    assert {it.think_s for it in tight.items if it.turn} == {0.5}


def test_sharegpt_conversations_replay_their_turns_in_order(tmp_path):
    data = [{"id": "a", "conversations": [{"from": "human", "value": "hello " * 10}, {"from": "gpt", "value": "hi " * 20},
                                          {"from": "human", "value": "more " * 5}, {"from": "gpt", "value": "ok " * 8},
                                          {"from": "human", "value": "unanswered"}]},
            {"id": "b", "conversations": [{"from": "gpt", "value": "no user first"}, {"from": "human", "value": "x"}]},
            {"id": "c", "conversations": [{"from": "human", "value": "one " * 12}, {"from": "gpt", "value": "two " * 6}]}]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(data))
    wl = load_workload(workload_cfg(name="sharegpt", path=str(path), multi_turn=True, num_requests=10))
    by_conv = {}
    for it in wl.items:
        by_conv.setdefault(it.conversation, []).append(it)
    assert sorted(len(v) for v in by_conv.values()) == [1, 2]  # b has no user turn first; a's last has no answer
    two = next(v for v in by_conv.values() if len(v) == 2)
    assert two[0].user_text == "hello " * 10 and two[0].answer_text == "hi " * 20 and two[1].user_text == "more " * 5
    assert two[1].prompt_len == two[0].prompt_len + two[0].output_len + two[1].user_len
    assert len(load_workload(workload_cfg(name="sharegpt", path=str(path), multi_turn=True, num_requests=10,
                                          max_turns=1)).items) == 2


@pytest.mark.parametrize("kw, says", [({"name": "mooncake"}, "hash_ids"), ({"history": "mine"}, "workload.history"),
                                      ({"think_time_dist": "pareto"}, "think_time_dist"),
                                      ({"think_time_s": -1.0}, "think_time_s"), ({"turns_mean": 0.5}, "turns_mean")])
def test_bad_multi_turn_settings_are_named(kw, says):
    with pytest.raises(WorkloadError, match=says):
        load_workload(workload_cfg(**{"name": "synthetic", "multi_turn": True, **kw}))
