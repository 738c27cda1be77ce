"""One rule grows a conversation's prompt, in each form a prompt is sent in."""

from __future__ import annotations

import numpy as np

from experiments.loadgen import conversations as conv
from experiments.loadgen.workloads import load_workload
from tests.helpers.experiment_configs import workload_cfg


def test_extend_appends_the_answer_and_the_next_message_in_the_prompts_own_form():
    assert conv.extend("hi", "hello", "how?") == "hi\n\nhello\n\nhow?"
    assert conv.extend([1, 2], [3], [4, 5]) == [1, 2, 3, 4, 5]
    assert conv.extend(conv.first("hi", chat=True), "hello", "how?") == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "how?"}]


def test_recorded_history_is_every_earlier_message_and_answer():
    wl = load_workload(workload_cfg(name="synthetic", multi_turn=True, num_requests=12, max_prompt_len=8192,
                                    max_total_len=10240))
    parts = [([f"u{i}"] * it.user_len, [f"a{i}"] * it.output_len) for i, it in enumerate(wl.items)]
    prompts = conv.recorded(wl.items, parts)
    assert [len(p) for p in prompts] == [it.prompt_len for it in wl.items]
    for i, it in enumerate(wl.items):
        if it.turn:
            assert prompts[i][: len(prompts[i - 1])] == prompts[i - 1]  # a prefix cache's whole point


def test_conversations_start_at_the_rate_that_offers_workload_rate_requests():
    w = workload_cfg(name="synthetic", multi_turn=True, num_requests=2000, rate=9.0, max_prompt_len=8192,
                     max_total_len=10240)
    wl = load_workload(w)
    off = conv.offsets(w, wl)
    starts = off[~np.isnan(off)]
    assert len(starts) == wl.num_conversations and np.isnan(off).sum() == len(wl.items) - wl.num_conversations
    per_conv = len(wl.items) / wl.num_conversations
    assert abs((len(starts) - 1) / starts[-1] * per_conv / 9.0 - 1) < 0.1
