"""Multi-turn conversations: turn k's prompt is every earlier message and answer, then message k.

One rule, `extend`, grows a prompt by an answer and the next message, in each of
the three forms a prompt is sent in: completion text (turns joined by a blank
line), chat messages (the server applies its template), or token ids. The
recorded history (`workload.history=recorded`: the dataset's answers) is
folded once before the run, so both backends send the very same prompts; the
generated history folds in the answer the server actually gave (the load
generator's streamed text; the simulator's output tokens), which is what a
chat client does and what makes an answer's own KV blocks reusable.

Conversations start by the arrival process at `rate / turns per conversation`,
so `workload.rate` stays requests per second; every later turn is sent
`think_s` after the previous answer ends.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

import numpy as np

from experiments.loadgen.arrivals import schedule

SEP = "\n\n"  # between turns of a completion prompt
Prompt = Union[str, list[int], list[dict[str, str]]]


def first(user: Any, chat: bool) -> Prompt:
    """Turn 0's prompt: the message alone."""
    return [{"role": "user", "content": user}] if chat else user


def extend(prompt: Prompt, answer: Any, user: Any) -> Prompt:
    """`prompt` followed by its `answer` and the next message, in `prompt`'s own form."""
    if isinstance(prompt, str):
        return f"{prompt}{SEP}{answer}{SEP}{user}"
    if prompt and isinstance(prompt[0], dict):
        return [*prompt, {"role": "assistant", "content": answer}, {"role": "user", "content": user}]
    return [*prompt, *answer, *user]


def conversation_rate(wcfg, workload) -> float:
    """Conversations per second that offer `workload.rate` requests per second."""
    return wcfg.rate * workload.num_conversations / len(workload.items)


def starts(wcfg, workload):
    """The workload config conversations start by (its rate in conversations per second)."""
    return dataclasses.replace(wcfg, rate=conversation_rate(wcfg, workload))


def offsets(wcfg, workload) -> Optional[np.ndarray]:
    """When each request is due, from the run's start: a trace's or the arrival process's time for independent
    requests; for a conversation's first turn its start, NaN for later turns (due after the answer before)."""
    items = workload.items
    if not workload.num_conversations:
        return schedule(wcfg, len(items), [it.timestamp for it in items] if workload.has_timestamps else None)
    first_turns = [i for i, it in enumerate(items) if it.turn == 0]
    begin = schedule(starts(wcfg, workload), len(first_turns))
    if begin is None:
        return None
    out = np.full(len(items), np.nan)
    out[first_turns] = begin
    return out


def recorded(items, parts, chat: bool = False) -> list[Prompt]:
    """Every turn's prompt under the recorded history; `parts[i]`: (message, recorded answer) of `items[i]`."""
    out: list[Prompt] = []
    for i, it in enumerate(items):
        user = parts[i][0]
        out.append(first(user, chat) if it.turn == 0 else extend(out[-1], parts[i - 1][1], user))
    return out
