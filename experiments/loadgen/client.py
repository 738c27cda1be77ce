"""Load generator for any OpenAI-compatible server: plan, dispatch, record, summarise.

The whole schedule is computed first and dispatched against absolute monotonic
times; each request's clock starts at its scheduled time. Connections are
opened before the run so TCP set-up never lands in a TTFT. Writes
DIR/requests.parquet (one row per request) and DIR/summary.json.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import aiohttp
import orjson
import pandas as pd

from experiments.analysis import request_metrics as M
from experiments.loadgen import conversations as conv
from experiments.loadgen.arrivals import interarrival_distribution
from experiments.loadgen.lengths import format_lengths
from experiments.loadgen.lengths import report as report_lengths
from experiments.loadgen.prompts import PromptBuilder, prompt_token_ids, turn_parts
from experiments.loadgen.result import RunResult, SLOs, measured, offered_rate, workload_run
from experiments.loadgen.rows import write_rows
from experiments.loadgen.workloads import Workload, load_workload

log = logging.getLogger(__name__)


class LoadgenError(RuntimeError):
    pass


ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


def check_config(lcfg, tokenizer, slo=None, wcfg=None) -> None:
    """Settings that cannot work together fail before anything is sent, naming the key."""
    definition = getattr(slo, "tpot_definition", "mean")
    try:
        M.check_tpot_definition(definition)
    except ValueError as e:
        raise LoadgenError(str(e)) from None
    if definition != "mean" and not lcfg.stream:
        raise LoadgenError(f"slo.tpot_definition={definition} judges the gaps between tokens, which an answer sent "
                           f"whole does not show: loadgen.stream=true, or slo.tpot_definition=mean")
    if lcfg.endpoint not in ENDPOINTS:
        raise LoadgenError(f"loadgen.endpoint={lcfg.endpoint!r}: expected one of {', '.join(ENDPOINTS)}")
    if lcfg.over_context not in CONTEXT_POLICIES:
        raise LoadgenError(f"loadgen.over_context={lcfg.over_context!r}: expected one of {', '.join(CONTEXT_POLICIES)}")
    if lcfg.endpoint == "chat" and lcfg.prompt_format == "token_ids":
        raise LoadgenError("loadgen.endpoint=chat sends text messages: loadgen.prompt_format=token_ids needs "
                           "loadgen.endpoint=completions")
    if (getattr(wcfg, "multi_turn", False) and wcfg.history == "generated" and lcfg.prompt_format == "token_ids"
            and (not lcfg.tokenizer or lcfg.tokenizer == "none")):
        raise LoadgenError("workload.history=generated with loadgen.prompt_format=token_ids re-encodes each answer "
                           "into the next turn's ids where the server does not return them (return_token_ids): it "
                           "needs loadgen.tokenizer (or workload.history=recorded)")
    if lcfg.endpoint == "chat" and tokenizer is not None and not getattr(tokenizer, "chat_template", None):
        raise LoadgenError(f"loadgen.endpoint=chat sizes prompts under the chat template, and tokenizer "
                           f"{lcfg.tokenizer!r} has none: name one that has (loadgen.tokenizer=DIR), or "
                           f"loadgen.tokenizer=none for approximate lengths")


@dataclass
class Planned:
    idx: int
    prompt: Any  # str, list[int], or chat messages (a conversation's turn)
    prompt_tokens: int  # expected, -1 if unknown
    output_tokens: int
    offset: Optional[float]  # seconds from start; None in a closed loop; NaN: a turn due after the one before
    # A conversation's turn: `prompt` is its recorded history; with the generated history the prompt sent is the
    # previous prompt sent, the answer received and `user` (conversations.extend), its length known only then.
    conversation: Optional[int] = None
    turn: int = 0
    think_s: float = 0.0
    user: Any = None  # this turn's message
    answer: Any = None  # its recorded answer (the next turn's recorded history)
    exact: bool = True  # prompt_tokens is the length sent (else an estimate: the recorded history's)


@dataclass
class Record:
    idx: int
    scheduled: float = math.nan
    send: float = math.nan
    first_token: float = math.nan
    finish: float = math.nan
    token_times: list[float] = field(default_factory=list)
    prompt_tokens: Optional[int] = None
    output_tokens: Optional[int] = None
    cached_tokens: Optional[int] = None  # usage.prompt_tokens_details.cached_tokens, where the server says
    chunks: int = 0
    status: Optional[int] = None
    error: Optional[str] = None


def plan(workload: Workload, wcfg, lcfg, tokenizer) -> list[Planned]:
    offsets = conv.offsets(wcfg, workload)
    builder = PromptBuilder(tokenizer, seed=wcfg.seed)
    chat = lcfg.endpoint == "chat"
    if workload.num_conversations:
        return _plan_turns(workload, wcfg, lcfg, builder, offsets)
    out = []
    for i, it in enumerate(workload.items):
        if lcfg.prompt_format == "token_ids":
            prompt, n = prompt_token_ids(builder, it), it.prompt_len
        elif it.hash_blocks:  # a trace's whole content blocks as text of about their length each, then the rest
            full = min(len(it.hash_blocks), it.prompt_len // it.block_len)
            prompt = "".join(builder.block_text(h, it.block_len) for h in it.hash_blocks[:full])
            if it.prompt_len > full * it.block_len:
                prompt += builder.text(it.prompt_len - full * it.block_len, chat)[0]
            n = builder.count(prompt, chat)
        elif it.prefix_group is not None:  # its group's system prompt, then a question
            head = builder.prefix_text(it.prefix_group, it.prefix_len)
            prompt = head + builder.text(max(1, it.prompt_len - it.prefix_len), chat)[0]
            n = builder.count(prompt, chat)
        elif it.prompt_text is not None:
            prompt, n = it.prompt_text, builder.count(it.prompt_text, chat)
        else:
            prompt, n = builder.text(it.prompt_len, chat)
        out.append(Planned(i, prompt, n, it.output_len, None if offsets is None else float(offsets[i])))
    return out


def _plan_turns(workload: Workload, wcfg, lcfg, builder: PromptBuilder, offsets) -> list[Planned]:
    """Every turn with its recorded-history prompt (conversations.extend over the recorded answers)."""
    chat, ids = lcfg.endpoint == "chat", lcfg.prompt_format == "token_ids"
    parts = [turn_parts(builder, it, ids) for it in workload.items]
    out: list[Planned] = []
    for i, (it, prompt) in enumerate(zip(workload.items, conv.recorded(workload.items, parts, chat))):
        user, answer = parts[i]
        n = len(prompt) if ids else builder.count(prompt, chat)
        out.append(Planned(i, prompt, n, it.output_len, None if offsets is None else float(offsets[i]),
                           conversation=it.conversation, turn=it.turn, think_s=it.think_s, user=user, answer=answer,
                           exact=it.turn == 0 or wcfg.history == "recorded"))
    return out


class LoadGenerator:
    def __init__(self, lcfg, wcfg, model: str, tokenizer=None):
        self.lcfg, self.wcfg, self.model = lcfg, wcfg, model
        # A conversation's next prompt takes the answer the server gave (workload.history=generated): as text, or
        # as ids: the very ids where the server returns them (vLLM's return_token_ids), else the text re-encoded,
        # as a client holding only text must (a random model's answer rarely re-encodes to its own ids).
        self.generated = getattr(wcfg, "multi_turn", False) and wcfg.history == "generated"
        self.want_ids = self.generated and lcfg.prompt_format == "token_ids"
        self.tokenizer = tokenizer
        base = lcfg.base_url.rstrip("/")
        self.url = base + ENDPOINTS[lcfg.endpoint]
        self.stop = asyncio.Event()
        self.signalled: Optional[str] = None  # the signal that stopped the run (SIGTERM, SIGINT)
        self.loop_lag: list[float] = []
        self.t0 = 0.0

    def payload(self, p: Planned, prompt: Any = None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model}
        prompt = p.prompt if prompt is None else prompt
        if self.lcfg.endpoint == "chat":
            body["messages"] = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        body.update({"max_tokens": p.output_tokens, "temperature": 0.0, "stream": self.lcfg.stream})
        if self.lcfg.ignore_eos:
            body["ignore_eos"] = True
        if self.lcfg.stream:
            body["stream_options"] = {"include_usage": True}
        if self.want_ids:
            body["return_token_ids"] = True
        return body

    async def one(self, session: aiohttp.ClientSession, p: Planned, rec: Record, prompt: Any = None,
                  text: Optional[list[str]] = None, ids: Optional[list[int]] = None) -> None:
        """Send `p` (or `prompt` in its place) and record what came back; the answer's text is appended to
        `text` and the ids the server returned (return_token_ids) to `ids`, where given."""
        body = orjson.dumps(self.payload(p, prompt))
        rec.send = time.monotonic()
        try:
            async with session.post(self.url, data=body, headers={"Content-Type": "application/json"}) as resp:
                rec.status = resp.status
                if resp.status != 200:
                    rec.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                    return
                if not self.lcfg.stream:
                    obj = await resp.json()
                    rec.first_token = rec.finish = time.monotonic()
                    rec.token_times = [rec.finish]
                    self._usage(obj, rec)
                    if text is not None and obj.get("choices"):
                        c = obj["choices"][0]
                        text.append(c.get("text") if "text" in c else (c.get("message") or {}).get("content") or "")
                        if ids is not None and c.get("token_ids"):
                            ids.extend(c["token_ids"])
                    return
                async for line in resp.content:
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        break
                    now = time.monotonic()
                    obj = orjson.loads(data)
                    if "error" in obj:
                        rec.error = f"stream error: {obj['error'].get('message')}"
                        break
                    ch = obj.get("choices")
                    if ch:
                        c = ch[0]
                        piece = c.get("text") if "text" in c else (c.get("delta") or {}).get("content")
                        if piece:
                            rec.chunks += 1
                            rec.token_times.append(now)
                            if math.isnan(rec.first_token):
                                rec.first_token = now
                            if text is not None:
                                text.append(piece)
                        if ids is not None and c.get("token_ids"):
                            ids.extend(c["token_ids"])
                    self._usage(obj, rec)
            rec.finish = time.monotonic()
            if rec.error is None and math.isnan(rec.first_token) and (rec.output_tokens or 0) > 0:
                rec.error = "stream ended without any token text"
        except asyncio.TimeoutError:
            rec.error = f"timeout after {self.lcfg.request_timeout_s}s"
        except asyncio.CancelledError:
            rec.error = "interrupted"
            raise
        except (aiohttp.ClientError, ConnectionError) as e:
            rec.error = f"{type(e).__name__}: {e}"
        except orjson.JSONDecodeError as e:
            rec.error = f"bad SSE chunk: {e}"

    def _on_signal(self, sig: int) -> None:
        self.signalled = signal.Signals(sig).name
        self.stop.set()

    @staticmethod
    def _usage(obj, rec: Record) -> None:
        u = obj.get("usage")
        if u:
            rec.prompt_tokens = u.get("prompt_tokens")
            rec.output_tokens = u.get("completion_tokens")
            details = u.get("prompt_tokens_details")
            if isinstance(details, dict) and details.get("cached_tokens") is not None:
                rec.cached_tokens = details["cached_tokens"]

    async def _lag_monitor(self) -> None:
        period = 0.01
        while not self.stop.is_set():
            t = time.monotonic()
            await asyncio.sleep(period)
            self.loop_lag.append(max(0.0, time.monotonic() - t - period))

    async def run(self, planned: list[Planned], progress=None) -> list[Record]:
        records = [Record(p.idx) for p in planned]
        timeout = aiohttp.ClientTimeout(total=self.lcfg.request_timeout_s)
        conn = aiohttp.TCPConnector(limit=self.lcfg.max_connections, keepalive_timeout=600, force_close=False)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self._on_signal, sig)
            except (NotImplementedError, RuntimeError):
                pass
        # A full collection over a large heap stalls the loop for tens of ms (seen at 800 req/s): keep
        # the cyclic collector off while dispatching; a run's objects are bounded and freed afterwards.
        gc.freeze()
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            return await self._run(planned, records, conn, timeout, progress)
        finally:
            if gc_was_enabled:
                gc.enable()
            gc.unfreeze()

    async def _run(self, planned, records, conn, timeout, progress) -> list[Record]:
        async with aiohttp.ClientSession(connector=conn, timeout=timeout,
                                         headers=auth_headers(self.lcfg.api_key)) as session:
            await self._prewarm(session)
            monitor = asyncio.create_task(self._lag_monitor())
            tasks: list[asyncio.Task] = []

            def done(_):
                if progress is not None:
                    progress.update(1)

            if planned and planned[0].offset is None:
                await self._closed_loop(session, planned, records, tasks, done)
            else:
                await self._open_loop(session, planned, records, tasks, done)
            pending = [t for t in tasks if not t.done()]
            if pending:
                stopper = asyncio.create_task(self.stop.wait())
                waiter = asyncio.gather(*pending, return_exceptions=True)
                await asyncio.wait({stopper, waiter}, return_when=asyncio.FIRST_COMPLETED)
                stopper.cancel()
                for t in pending:
                    t.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
            self.stop.set()
            await monitor
        for r in records:  # never sent: interrupted before their time
            if math.isnan(r.send) and r.error is None:
                r.error = "not sent (interrupted)"
        return records

    async def _prewarm(self, session) -> None:
        n = max(1, self.lcfg.prewarm_connections)
        models = self.lcfg.base_url.rstrip("/") + "/v1/models"

        async def ping():
            async with session.get(models) as r:
                await r.read()

        await asyncio.gather(*(ping() for _ in range(n)), return_exceptions=True)

    async def _wait_until(self, target: float) -> bool:
        """Sleep until the monotonic time `target`; False when the run was stopped meanwhile."""
        delay = target - time.monotonic() - self.lcfg.dispatch_spin_s
        if delay > 0:
            try:
                await asyncio.wait_for(self.stop.wait(), delay)
            except asyncio.TimeoutError:
                pass
        # The loop's timers are ~1 ms coarse: cover the last stretch by yielding until the
        # target (the loop keeps serving streams meanwhile).
        while time.monotonic() < target and not self.stop.is_set():
            await asyncio.sleep(0)
        return not self.stop.is_set()

    async def _conversation(self, session, turns: list[tuple[Planned, Record]], tick) -> None:
        """One conversation's turns, each sent `think_s` after the answer before it (turn 0 is due now)."""
        sent: Any = None
        answer: list[str] = []
        answer_ids: list[int] = []
        for k, (p, rec) in enumerate(turns):
            if k:
                prev = turns[k - 1][1]
                if prev.error is not None:  # a client would not go on without the answer
                    for _, later in turns[k:]:
                        later.error = f"not sent: turn {turns[k - 1][0].turn} of its conversation failed"
                        tick()
                    return
                rec.scheduled = prev.finish + p.think_s
                if not await self._wait_until(rec.scheduled):
                    return
            prompt = p.prompt
            if self.generated and k:
                said = "".join(answer)
                if self.lcfg.prompt_format == "token_ids":  # the ids returned, else what the text encodes to
                    said = answer_ids if answer_ids or not said else self.tokenizer.encode(said, add_special_tokens=False)
                prompt = conv.extend(sent, said, p.user)
            answer, answer_ids = [], []
            await self.one(session, p, rec, prompt, answer if self.generated else None,
                           answer_ids if self.want_ids else None)
            sent = prompt
            tick()

    def _chains(self, planned, records) -> list[list[tuple[Planned, Record]]]:
        """Requests in dispatch order: each alone, or a conversation's turns together (at its first turn)."""
        chains: list[list[tuple[Planned, Record]]] = []
        open_: dict[int, list] = {}
        for p, rec in zip(planned, records):
            if p.conversation is None:
                chains.append([(p, rec)])
            elif p.conversation in open_:
                open_[p.conversation].append((p, rec))
            else:
                open_[p.conversation] = [(p, rec)]
                chains.append(open_[p.conversation])
        return chains

    def _send(self, session, chain, progress_done):
        if len(chain) == 1 and chain[0][0].conversation is None:
            t = asyncio.create_task(self.one(session, *chain[0]))
            t.add_done_callback(progress_done)
            return t
        return asyncio.create_task(self._conversation(session, chain, lambda: progress_done(None)))

    async def _open_loop(self, session, planned, records, tasks, done) -> None:
        self.t0 = time.monotonic() + 0.05
        for chain in self._chains(planned, records):
            p, rec = chain[0]
            target = self.t0 + p.offset
            if not await self._wait_until(target):
                break
            rec.scheduled = target
            tasks.append(self._send(session, chain, done))

    async def _closed_loop(self, session, planned, records, tasks, done) -> None:
        """`max_concurrency` requests in flight (conversations: each holds its slot through its turns, as a
        user does)."""
        self.t0 = time.monotonic()
        sem = asyncio.Semaphore(self.wcfg.max_concurrency)

        async def guarded(chain):
            async with sem:
                if self.stop.is_set():
                    return
                chain[0][1].scheduled = time.monotonic()
                await self._send(session, chain, done)

        for chain in self._chains(planned, records):
            tasks.append(asyncio.create_task(guarded(chain)))


def to_frame(records: list[Record], planned: list[Planned], t0: float) -> pd.DataFrame:
    rows = []
    for r, p in zip(records, planned):
        out_tokens = r.output_tokens if r.output_tokens is not None else (r.chunks if r.error is None else 0)
        rows.append({
            "request_id": r.idx, "scheduled_s": r.scheduled - t0, "send_s": r.send - t0,
            "first_token_s": r.first_token - t0, "finish_s": r.finish - t0,
            "token_times_s": [t - t0 for t in r.token_times],
            "prompt_tokens": r.prompt_tokens if r.prompt_tokens is not None else p.prompt_tokens,
            "output_tokens": out_tokens, "expected_prompt_tokens": p.prompt_tokens if p.exact else -1,
            "expected_output_tokens": p.output_tokens, "num_chunks": r.chunks, "http_status": r.status,
            "error": r.error, "cached_tokens": r.cached_tokens, "conversation_id": p.conversation, "turn": p.turn,
        })
    return pd.DataFrame(rows)


def auth_headers(api_key: Optional[str]) -> dict[str, str]:
    """`Authorization: Bearer` for servers that require a key (`loadgen.api_key`, else $SEMIPD_API_KEY)."""
    key = api_key or os.environ.get("SEMIPD_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


async def fetch_model(base_url: str, api_key: Optional[str] = None) -> tuple[str, Optional[int]]:
    """The served model's id and its context length (`max_model_len`, as vLLM and this project's server report
    it; None where the server does not say)."""
    url = base_url.rstrip("/") + "/v1/models"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10),
                                         headers=auth_headers(api_key)) as s:
            async with s.get(url) as r:
                if r.status != 200:
                    raise LoadgenError(f"{url} answered HTTP {r.status}")
                data = await r.json()
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
        raise LoadgenError(f"server at {base_url} is unreachable: {type(e).__name__}: {e}") from None
    try:
        entry = data["data"][0]
        model = entry["id"]
    except (KeyError, IndexError, TypeError):
        raise LoadgenError(f"{url} returned no model") from None
    n = entry.get("max_model_len") if isinstance(entry, dict) else None
    return model, int(n) if isinstance(n, (int, float)) and n > 0 else None


CONTEXT_POLICIES = ("clamp", "drop", "send")


def fit_context(planned: list[Planned], max_len: Optional[int], policy: str) -> tuple[list[Planned], dict[str, Any]]:
    """The requests as they will be sent to a server whose context holds `max_len` tokens. One that does not fit
    (prompt + output > max_len) would not be the request asked for either way (refused, or its output cut short
    by the server without a word): `clamp` shortens its output to what fits (a prompt that alone fills the
    context is dropped), `drop` leaves it out of the run, `send` sends it as it is. Counted in the summary."""
    if policy not in CONTEXT_POLICIES:
        raise LoadgenError(f"loadgen.over_context={policy!r}: expected one of {', '.join(CONTEXT_POLICIES)}")
    report: dict[str, Any] = {"max_model_len": max_len, "policy": policy, "over_context": 0, "clamped": 0,
                              "dropped": 0}
    if not max_len:
        return planned, report
    out = []
    for p in planned:
        if p.prompt_tokens < 0 or p.prompt_tokens + p.output_tokens <= max_len:
            out.append(p)
            continue
        report["over_context"] += 1
        room = max_len - p.prompt_tokens
        if policy == "send":
            out.append(p)
        elif policy == "clamp" and room >= 1:
            out.append(dataclasses.replace(p, output_tokens=room))
            report["clamped"] += 1
        else:
            report["dropped"] += 1
    if report["over_context"]:
        log.warning("%d of %d requests do not fit the server's context of %d tokens: %s (loadgen.over_context=%s)",
                    report["over_context"], len(planned), max_len,
                    {"clamp": f"{report['clamped']} outputs shortened, {report['dropped']} dropped",
                     "drop": f"{report['dropped']} dropped", "send": "sent as they are"}[policy], policy)
    return out, report


def _run(coro):
    """asyncio.run on uvloop where available: the client's per-chunk work is its bottleneck."""
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def run_loadgen(lcfg, wcfg, slo, output_dir: Optional[str] = None, resolved_config: Any = None) -> RunResult:
    """Plan, run and summarise one load run; writes requests.parquet and summary.json."""
    from semipd_engine.serving.tokenizer import load_tokenizer

    tok = None
    if lcfg.tokenizer and lcfg.tokenizer != "none":
        tok = load_tokenizer(None if lcfg.tokenizer == "builtin" else lcfg.tokenizer)
    check_config(lcfg, tok, slo, wcfg)
    workload = load_workload(wcfg, tok)  # fails on a bad file before anything is sent
    lengths = report_lengths(workload, wcfg, lcfg.tokenizer)
    planned = plan(workload, wcfg, lcfg, tok)
    try:
        model, max_len = _run(fetch_model(lcfg.base_url, lcfg.api_key))
    except LoadgenError:
        if not lcfg.model:
            raise
        model, max_len = lcfg.model, None  # a named model on a server without /v1/models: no context known
    model = lcfg.model or model
    planned, context = fit_context(planned, max_len, lcfg.over_context)
    gen = LoadGenerator(lcfg, wcfg, model, tok)
    progress = None
    if lcfg.progress:
        from tqdm import tqdm

        progress = tqdm(total=len(planned), desc=f"{wcfg.name} @ {wcfg.rate}/s", unit="req", file=sys.stderr)
    # The event loop takes SIGINT/SIGTERM over (a signal stops the run and is reported) and resets them to the
    # defaults when it closes: give the caller's handlers back.
    handlers = _signal_handlers()
    try:
        records = _run(gen.run(planned, progress))
    finally:
        _restore_signal_handlers(handlers)
        if progress is not None:
            progress.close()
    df = M.derive(to_frame(records, planned, gen.t0), lcfg.measure_from if wcfg.arrival != "closed" else "send")
    df, aggregates = measured(df, lcfg, slo, offered_rate(workload, wcfg))
    result = RunResult(
        aggregates=aggregates, slo=SLOs(slo.ttft_s, slo.tpot_s, getattr(slo, "tpot_definition", "mean")),
        self_check=self_check(df, wcfg, workload, gen.loop_lag),
        workload=workload_run(workload, wcfg, len(planned), lengths),
        endpoint=lcfg.endpoint, model=model, base_url=lcfg.base_url,
        interrupted=gen.signalled is not None or any(r.error and "interrupted" in r.error for r in records),
        signal=gen.signalled, completeness=completeness(df, len(planned)), length_mismatch=length_mismatch(df),
        context=context,
        config=resolved_config, t0_monotonic=gen.t0)  # the monotonic origin all *_s columns are relative to
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        write_rows(df, os.path.join(output_dir, "requests.parquet"))
        result.write(output_dir)
    return result


def self_check(df: pd.DataFrame, wcfg, workload: Workload, loop_lag: list[float]) -> dict[str, Any]:
    """The client against its own schedule: of conversations, their starts (later turns follow answers, not the
    arrival process); every request's dispatch lateness all the same."""
    if not workload.num_conversations:
        return M.self_check(df, wcfg, loop_lag, interarrival_distribution(wcfg))
    starts = conv.starts(wcfg, workload)
    return M.self_check(df, starts, loop_lag, interarrival_distribution(starts), arrivals=df["turn"] == 0)


def _signal_handlers() -> dict:
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}


def _restore_signal_handlers(handlers: dict) -> None:
    for s, h in handlers.items():
        if h is not None:
            signal.signal(s, h)


def completeness(df: pd.DataFrame, planned: int) -> dict[str, Any]:
    """Planned requests against what happened to them: a run missing any is not a complete measurement."""
    err = df["error"].fillna("") if "error" in df else pd.Series([], dtype=str)
    unsent = int((err == "not sent (interrupted)").sum())
    cancelled = int((err == "interrupted").sum())
    rows = int(len(df))
    return {"planned": planned, "rows": rows, "not_sent": unsent, "cancelled": cancelled,
            "complete": rows == planned and unsent == 0 and cancelled == 0}


def length_mismatch(df: pd.DataFrame) -> dict[str, Any]:
    ok = df[df["error"].isna()]
    known = ok[ok["expected_prompt_tokens"] >= 0]
    p = int((known["prompt_tokens"] != known["expected_prompt_tokens"]).sum())
    o = int((ok["output_tokens"] != ok["expected_output_tokens"]).sum())
    return {"prompt_mismatched": p, "output_mismatched": o, "checked": int(len(ok))}


def format_summary(r: RunResult) -> str:
    a, c = r.aggregates, r.self_check

    def ms(v):
        return "-" if v is None else f"{1e3 * v:.1f}"

    lines = [(f"endpoint {ENDPOINTS[r.endpoint]}: " if r.endpoint in ENDPOINTS else "")
             + f"requests {a.num_ok}/{a.num_requests} ok, {a.num_errors} errors, "
             f"{a.request_throughput:.2f} req/s, {a.output_token_throughput:.1f} tok/s out",
             f"{'metric':<22}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}   (ms)"]
    for k in ("ttft_s", "tpot_s", "itl_s", "e2e_s", "dispatch_lateness_s"):
        lat = a.latency(k)
        lines.append(f"{k:<22}" + "".join(f"{ms(getattr(lat, q)):>10}" for q in ("mean", "p50", "p90", "p99")))
    att, p90 = a.ci.get("slo_attainment"), a.ci.get("ttft_s.p90")
    tpot = "TPOT" if a.tpot_definition == "mean" else f"TPOT ({a.tpot_definition})"
    lines.append(f"SLO (TTFT<={r.slo.ttft_s}s, {tpot}<={r.slo.tpot_s}s): attainment "
                 f"{100 * a.slo_attainment:.1f}%" + (f" (95% CI {100 * att[0]:.1f}-{100 * att[1]:.1f}%)" if att else "")
                 + f", goodput {a.goodput:.2f} req/s")
    by_def = a.tpot_definitions.get("slo_attainment") or {}
    if by_def:
        lines.append("attainment by TPOT definition: " + ", ".join(
            f"{d} {'-' if v is None else f'{100 * v:.1f}%'}" for d, v in by_def.items())
            + (f"; {a.tpot_definitions['stalled_requests']} request(s) stalled longer than the TPOT SLO"
               if a.tpot_definitions.get("stalled_requests") is not None else ""))
    ss = a.steady_state or {}
    if ss.get("steady_state") is False:
        lines.append("NO STEADY STATE: " + "; ".join(ss.get("reasons", [])))
    if p90 and a.ttft_s.p90 is not None:
        lines.append(f"P90 TTFT {ms(a.ttft_s.p90)} ms (95% CI {1e3 * p90[0]:.1f}-{1e3 * p90[1]:.1f} ms) over "
                     f"{a.num_requests} measured requests")
    comp = r.completeness
    if comp and not comp["complete"]:
        lines.append(f"INCOMPLETE: {comp['rows']} of {comp['planned']} requests recorded, {comp['not_sent']} not sent, "
                     f"{comp['cancelled']} cancelled" + (f" ({r.signal})" if r.signal else ""))
    lm = r.length_mismatch
    if lm.get("prompt_mismatched") or lm.get("output_mismatched"):
        lines.append(f"length mismatch: {lm['prompt_mismatched']} prompts, {lm['output_mismatched']} outputs "
                     f"of {lm['checked']}")
    if r.workload.lengths:
        lines.append(format_lengths(r.workload.name, r.workload.lengths))
        lines.extend(f"WARNING: {w}" for w in r.workload.length_warnings)
    lines.append("client self-check: " + ("valid" if c["valid"] else "INVALID: " + "; ".join(c["reasons"])))
    return "\n".join(lines)
