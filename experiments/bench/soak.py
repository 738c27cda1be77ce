"""Soak: thousands of mixed requests against each engine; nothing may be lost, duplicated or leaked.

    python -m experiments.bench.soak [--engines unified,unified_chunked,semipd,disagg,semipd_dynamic]
        [--requests 2000] [--concurrency 24] [--seed 0] [--kill 0] [--out FILE]

Each engine serves the tiny model from a tiny KV pool (so it preempts), while a client
sends a seeded mix: completions and chat, streamed or not, greedy and sampled with
parameters at the edges of what the API accepts (temperatures down to 5e-324, 64-bit
seeds), stop strings, clients that leave mid-stream or before the first byte, and hostile
bodies (deep nesting, lone surrogates, bogus charsets, oversized prompts, overflowing
seeds, unknown routes). semi-PD engines have their partition switched all along; `--kill N`
also kills a worker process N times.

Checks, per engine:
- every request gets exactly one answer (or was abandoned by its client): no connection
  error, no timeout, hostile bodies 4xx with an OpenAI-style JSON error, never a 5xx
  unless a worker was killed under it;
- completed requests are whole: ignore_eos requests carry exactly max_tokens tokens,
  a stream has one final chunk and one [DONE], greedy prompts give the same text as when
  the server was idle;
- the server counted every request that reached the engine exactly once (metrics and
  the request log agree with the client);
- nothing leaks: KV blocks, running, waiting and in-flight requests all back to zero,
  /health ok (with the expected number of worker restarts).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import aiohttp

from experiments.bench.common import emit, metric_total, scrape_metrics

ENGINES = {  # the presets of conf/engine/, on a pool small enough to preempt
    "unified": {"policy": "prefill_priority"},
    "unified_chunked": {"policy": "chunked", "max_num_batched_tokens": 64},
    "semipd": {"prefill_share": 50, "decode_share": 50, "max_num_batched_tokens": 64},
    "disagg": {"max_num_batched_tokens": 64},
    "semipd_dynamic": {"prefill_share": 50, "decode_share": 50, "max_num_batched_tokens": 64,
                       "control_window_s": 1.0, "slo_ttft_s": 0.05, "slo_tpot_s": 0.01},
}
WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly brew strong coffee "
         "under pale moon light near old stone bridges").split()
PARTITIONS = [(50, 50), (100, 50), (50, 100), (100, 100), (30, 70), (70, 30), (20, 100)]
TEMPERATURES = [0.0, 5e-324, 1e-40, 1e-38, 1e-6, 1e-5, 0.01, 0.5, 1.0, 2.0]
SEEDS = [None, 0, -1, 2**63 - 1, -(2**63), 2**64 - 1, 12345]


@dataclass
class Spec:
    i: int
    kind: str  # ok | greedy | abort | bad
    path: str
    body: Optional[dict] = None
    raw: Optional[bytes] = None
    headers: dict = field(default_factory=lambda: {"Content-Type": "application/json"})
    method: str = "POST"
    abort_after: Optional[int] = None  # chunks read before the client leaves (-1: before the first byte)
    expect_status: Optional[int] = None  # for bad requests: 4xx expected (None: any 4xx)
    ref: Optional[int] = None  # index of the greedy reference prompt


@dataclass
class Outcome:
    spec: Spec
    status: Optional[int] = None
    body: Any = None
    chunks: list = field(default_factory=list)
    done_markers: int = 0
    ids: set = field(default_factory=set)
    text: str = ""
    aborted: bool = False
    error: Optional[str] = None  # a transport error: the request was lost
    seconds: float = 0.0
    retries: int = 0  # 503s retried while the engine replaced a killed worker


def _prompt(rng: random.Random, vocab: int, max_words: int) -> Any:
    if rng.random() < 0.3:
        return [rng.randrange(10, vocab) for _ in range(rng.randint(1, 5 * max_words))]
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words)))


def _sampling(rng: random.Random, max_tokens: int) -> dict:
    body: dict[str, Any] = {"max_tokens": rng.randint(1, max_tokens), "ignore_eos": rng.random() < 0.7}
    body["temperature"] = rng.choice(TEMPERATURES)
    if rng.random() < 0.4:
        body["top_p"] = rng.choice([1e-9, 0.1, 0.9, 1.0])
    if rng.random() < 0.4:
        body["top_k"] = rng.choice([-1, 1, 5, 10**6])
    seed = rng.choice(SEEDS)
    if seed is not None:
        body["seed"] = seed
    if rng.random() < 0.1:
        body["stop"] = [rng.choice(["e", "th", " ", "zz"])]
    return body


def _bad(rng: random.Random, i: int) -> Spec:
    deep = b"[" * 50000 + b"]" * 50000
    choices = [
        Spec(i, "bad", "/v1/completions", raw=deep),
        Spec(i, "bad", "/v1/completions", raw=b'{"prompt": "a\\ud800b", "max_tokens": 2}'),
        Spec(i, "bad", "/v1/chat/completions", raw=b'{"messages": [{"role": "user", "content": "\\udc00"}]}'),
        Spec(i, "bad", "/v1/completions", raw=b'{"prompt": "hi"}',
             headers={"Content-Type": "application/json; charset=bogus"}),
        Spec(i, "bad", "/v1/completions", raw=b'{"prompt": "\xff"}'),
        Spec(i, "bad", "/v1/completions", body={"prompt": "hello", "max_tokens": 4, "temperature": 1,
                                               "seed": 18446744073709551616}),
        Spec(i, "bad", "/v1/completions", body={"prompt": "hello", "max_tokens": 4, "temperature": 1,
                                               "seed": -9223372036854775809}),
        Spec(i, "bad", "/v1/completions", body={"prompt": "x " * 500_000}, expect_status=400),
        Spec(i, "bad", "/v1/completions", raw=b'{"prompt": "hi", "temperature": NaN}'),
        Spec(i, "bad", "/v1/completions", body={"prompt": "hi", "model": "gpt-9"}, expect_status=404),
        Spec(i, "bad", "/v1/nothing", body={"prompt": "hi"}, expect_status=404),
        Spec(i, "bad", "/v1/completions", method="GET", expect_status=405),
        Spec(i, "bad", "/v1/completions", raw=b"{not json"),
        Spec(i, "bad", "/v1/completions", body={"prompt": "hi", "max_tokens": 0}),
    ]
    return rng.choice(choices)


def make_specs(n: int, seed: int, vocab: int, max_tokens: int, refs: list[list[int]], max_words: int = 8) -> list[Spec]:
    """`max_words` words of text (up to ~5 tokens each with the built-in tokenizer) leave room for max_tokens."""
    rng = random.Random(seed)
    specs = []
    for i in range(n):
        r = rng.random()
        if r < 0.12:
            specs.append(_bad(rng, i))
            continue
        chat = rng.random() < 0.2
        path = "/v1/chat/completions" if chat else "/v1/completions"
        if r < 0.27 and refs:
            k = rng.randrange(len(refs))
            body = {"prompt": refs[k], "max_tokens": 12, "temperature": 0, "ignore_eos": True,
                    "stream": rng.random() < 0.5}
            specs.append(Spec(i, "greedy", "/v1/completions", body, ref=k))
            continue
        body = _sampling(rng, max_tokens)
        if chat:
            body["messages"] = [{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(max_words))}]
        else:
            body["prompt"] = _prompt(rng, vocab, max_words)
        body["stream"] = rng.random() < 0.6
        if body["stream"] and rng.random() < 0.5:
            body["stream_options"] = {"include_usage": True}
        if r < 0.45:
            body["stream"], body["max_tokens"] = True, max_tokens
            specs.append(Spec(i, "abort", path, body, abort_after=rng.choice([-1, 0, 1, 2, 5])))
        else:
            specs.append(Spec(i, "ok", path, body))
    return specs


async def _send(session: aiohttp.ClientSession, url: str, spec: Spec, timeout_s: float,
                retry_unavailable: bool = False) -> Outcome:
    """One request; with `retry_unavailable`, a 503 (the engine replacing a killed worker) is retried
    every 0.1 s, as a well-behaved client would, so the load goes on after the restart."""
    data = spec.raw if spec.raw is not None else (json.dumps(spec.body).encode() if spec.body is not None else None)
    t0 = time.monotonic()
    retries = 0
    while True:
        out = Outcome(spec, retries=retries)
        try:
            if spec.abort_after == -1:  # leave before the first byte
                try:
                    await asyncio.wait_for(_request(session, url, spec, data, out), timeout=0.01)
                except asyncio.TimeoutError:
                    out.aborted = True
            else:
                await asyncio.wait_for(_request(session, url, spec, data, out), timeout=timeout_s)
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as e:
            out.error = f"{type(e).__name__}: {e}"
        finally:
            out.seconds = time.monotonic() - t0
        if not (retry_unavailable and out.status == 503 and retries < 600):
            return out
        retries += 1
        await asyncio.sleep(0.1)


async def _request(session, url, spec: Spec, data, out: Outcome) -> None:
    async with session.request(spec.method, url + spec.path, data=data, headers=spec.headers) as resp:
        out.status = resp.status
        if resp.content_type != "text/event-stream":
            raw = await resp.read()
            try:
                out.body = json.loads(raw)
            except ValueError:
                out.body = raw.decode(errors="replace")
            return
        while True:
            line = await resp.content.readline()
            if not line:
                return
            line = line.strip()
            if not line:
                continue
            if line == b"data: [DONE]":
                out.done_markers += 1
                continue
            chunk = json.loads(line[len(b"data: "):])
            out.chunks.append(chunk)
            if "id" in chunk:
                out.ids.add(chunk["id"])
            for c in chunk.get("choices", []):
                out.text += c.get("text") or (c.get("delta") or {}).get("content") or ""
            if spec.abort_after is not None and len(out.chunks) > spec.abort_after:
                out.aborted = True
                resp.close()
                return


async def _switcher(session, url: str, rng: random.Random, stop: asyncio.Event, log: list) -> None:
    while not stop.is_set():
        x, y = rng.choice(PARTITIONS)
        try:
            async with session.post(url + "/partition", json={"prefill_share": x, "decode_share": y}) as r:
                log.append(r.status)
        except aiohttp.ClientError as e:
            log.append(str(e))
        try:
            await asyncio.wait_for(stop.wait(), rng.uniform(0.2, 0.6))
        except asyncio.TimeoutError:
            pass


def worker_pids(server_pid: int) -> list[int]:
    """The engine worker processes of a server (spawned children, not the resource tracker)."""
    pids = []
    for task in os.listdir(f"/proc/{server_pid}/task"):
        with open(f"/proc/{server_pid}/task/{task}/children") as f:
            pids += [int(p) for p in f.read().split()]
    out = []
    for p in pids:
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                cmd = f.read()
        except FileNotFoundError:
            continue
        if b"spawn_main" in cmd and b"resource_tracker" not in cmd:
            out.append(p)
    return out


async def _killer(session, url: str, server_pid: int, n: int, rng: random.Random, log: list) -> None:
    for _ in range(n):
        await asyncio.sleep(rng.uniform(1.0, 3.0))
        pids = worker_pids(server_pid)
        if not pids:
            continue
        victim = rng.choice(pids)
        os.kill(victim, signal.SIGKILL)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 60:  # wait for the engine to come back before the next kill
            await asyncio.sleep(0.1)
            try:
                async with session.get(url + "/health") as r:
                    body = await r.json()
                    if r.status == 200 and body.get("restarts", 0) > len(log):
                        break
            except aiohttp.ClientError:
                pass
        log.append(round(time.monotonic() - t0, 3))


async def run_load(url: str, specs: list[Spec], concurrency: int, switch: bool, kill: int, server_pid: int,
                   seed: int, timeout_s: float = 120.0) -> tuple[list[Outcome], list, list]:
    rng = random.Random(seed + 1)
    stop = asyncio.Event()
    switches: list = []
    kills: list = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        side = []
        if switch:
            side.append(asyncio.create_task(_switcher(session, url, rng, stop, switches)))
        if kill:
            side.append(asyncio.create_task(_killer(session, url, server_pid, kill, rng, kills)))
        pending = list(reversed(specs))
        outcomes: list[Outcome] = []

        async def client():
            while pending:
                outcomes.append(await _send(session, url, pending.pop(), timeout_s, retry_unavailable=bool(kill)))

        await asyncio.gather(*(client() for _ in range(concurrency)))
        if kill:
            await side[-1]
        stop.set()
        await asyncio.gather(*side)
    return sorted(outcomes, key=lambda o: o.spec.i), switches, kills


async def _references(url: str, refs: list[list[int]]) -> list[str]:
    async with aiohttp.ClientSession() as session:
        out = []
        for p in refs:
            async with session.post(url + "/v1/completions", json={"prompt": p, "max_tokens": 12, "temperature": 0,
                                                                   "ignore_eos": True}) as r:
                out.append((await r.json())["choices"][0]["text"])
        return out


def _get_json(url: str) -> tuple[int, Any]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def check(outcomes: list[Outcome], refs: list[str], url: str, request_log: Path, kills: int,
          switches: list) -> tuple[list[str], dict]:
    """Everything the soak asserts; returns (problems, counts)."""
    problems: list[str] = []
    n_engine = len(refs)  # requests that reached the engine: the references, then valid ones the server accepted
    client_ids: set[str] = set()
    kinds = Counter()
    for o in outcomes:
        s = o.spec
        kinds[s.kind] += 1
        tag = f"request {s.i} ({s.kind} {s.method} {s.path})"
        if o.error:
            problems.append(f"{tag}: lost: {o.error}")
            continue
        if s.kind == "bad":
            if o.status is None or not 400 <= o.status < 500:
                problems.append(f"{tag}: expected a 4xx, got {o.status}: {str(o.body)[:200]}")
            elif s.expect_status and o.status != s.expect_status:
                problems.append(f"{tag}: expected {s.expect_status}, got {o.status}")
            elif not (isinstance(o.body, dict) and set(o.body) == {"error"}
                      and set(o.body["error"]) == {"message", "type", "param", "code"}):
                problems.append(f"{tag}: error body not OpenAI-style: {str(o.body)[:200]}")
            continue
        if o.aborted and o.status is None:
            continue  # left before the response started: the server may or may not have seen it
        if o.status == 500 and kills:
            n_engine += 1
            continue  # failed by a killed worker
        if o.status != 200:
            problems.append(f"{tag}: status {o.status}: {str(o.body)[:300]}")
            continue
        n_engine += 1
        stream = bool(s.body.get("stream"))
        if stream:
            client_ids |= o.ids
            if o.aborted:
                continue
            errors = [c for c in o.chunks if "error" in c]
            if errors:
                if not kills:
                    problems.append(f"{tag}: stream failed: {errors[0]}")
                continue
            finals = [c for c in o.chunks if c.get("choices") and c["choices"][0].get("finish_reason")]
            if len(finals) != 1 or o.done_markers != 1:
                problems.append(f"{tag}: {len(finals)} final chunks, {o.done_markers} [DONE] markers")
                continue
            finish = finals[0]["choices"][0]["finish_reason"]
            usage = next((c["usage"] for c in o.chunks if c.get("usage")), None)
            text = o.text
        else:
            client_ids.add(o.body["id"])
            finish = o.body["choices"][0]["finish_reason"]
            usage = o.body["usage"]
            ch = o.body["choices"][0]
            text = ch.get("text") if "text" in ch else ch["message"]["content"]
        if finish not in ("stop", "length"):
            problems.append(f"{tag}: finish_reason {finish!r}")
        if usage is not None:
            if usage["completion_tokens"] > s.body["max_tokens"]:
                problems.append(f"{tag}: {usage['completion_tokens']} tokens > max_tokens {s.body['max_tokens']}")
            if s.body.get("ignore_eos") and not s.body.get("stop") and usage["completion_tokens"] != \
                    s.body["max_tokens"]:
                problems.append(f"{tag}: ignore_eos answer has {usage['completion_tokens']} tokens, "
                                f"not {s.body['max_tokens']} (tokens lost)")
        if s.kind == "greedy" and text != refs[s.ref]:
            problems.append(f"{tag}: greedy text differs from the idle server's: {text!r} != {refs[s.ref]!r}")
    # -- the server's own accounting ------------------------------------------------------------
    deadline = time.monotonic() + 30
    gauges = ("kv_blocks_used", "requests_running", "requests_waiting", "requests_in_flight")
    while True:
        m = scrape_metrics(url)
        left = {g: metric_total(m, g) for g in gauges}
        if not any(left.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for g, v in left.items():
        if v:
            problems.append(f"leak: {g} = {v} after the load")
    rows = [json.loads(line) for line in request_log.read_text().splitlines()] if request_log.exists() else []
    log_ids = Counter(r["request_id"] for r in rows)
    dup = [i for i, c in log_ids.items() if c > 1]
    if dup:
        problems.append(f"{len(dup)} requests logged more than once, e.g. {dup[:3]}")
    missing = client_ids - set(log_ids)
    if missing:
        problems.append(f"{len(missing)} answered requests missing from the request log, e.g. {sorted(missing)[:3]}")
    counted = metric_total(m, "request_success_total")
    if counted != len(rows):
        problems.append(f"metrics counted {counted} finished requests, the request log has {len(rows)}")
    # Requests that left before the first byte may or may not have reached the engine.
    early = sum(1 for o in outcomes if o.aborted and o.status is None)
    if not n_engine <= len(rows) <= n_engine + early:
        problems.append(f"the server finished {len(rows)} requests; the client expected {n_engine} "
                        f"(+ up to {early} that left before an answer)")
    restarts = metric_total(m, "worker_restarts_total")
    if restarts != kills:
        problems.append(f"worker_restarts_total = {restarts}, expected {kills}")
    status, health = _get_json(url + "/health")
    if status != 200:
        problems.append(f"/health {status} after the load: {health}")
    if switches and any(s != 200 for s in switches):
        problems.append(f"partition switches failed: {Counter(map(str, switches))}")
    reasons = Counter(r["finish_reason"] for r in rows)
    counts = {"requests": len(outcomes), "kinds": dict(kinds), "server_finished": len(rows),
              "finish_reasons": dict(reasons), "client_aborts": sum(o.aborted for o in outcomes),
              "partition_switches": len(switches), "preemptions": metric_total(m, "preemptions_total"),
              "retried_503": sum(o.retries for o in outcomes),
              "kv_blocks_used_peak": metric_total(m, "kv_blocks_used_peak"), "worker_restarts": restarts,
              # prompt tokens found in the prefix cache (the greedy reference prompts repeat): shared blocks, whose
              # reference counts the leak check above sees back at zero
              "prefix_cache_hits": metric_total(m, "prefix_cache_hits_total")}
    return problems, counts


def soak_engine(engine: str, n: int, concurrency: int, seed: int, kill: int = 0, num_kv_blocks: int = 48,
                job_dir: Optional[str] = None) -> dict:
    """Run the soak against one engine in a fresh server; returns counts, timings and problems."""
    from experiments.sweep.launch import EngineServer
    from semipd_engine.config import EngineConfig, ModelConfig, ServerConfig, freeze
    from semipd_engine.serving.tokenizer import BUILTIN_VOCAB_SIZE

    # The soak checks correctness, not speed. Its client and the server share the cores with the workers,
    # and a multi-threaded worker's spinning OpenMP threads then stall (unified ran a 300-request soak in
    # 118 s instead of 9 s): passive waiting keeps the run short. Set OMP_WAIT_POLICY yourself to override.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    ecfg = freeze(EngineConfig, {"name": engine, "num_kv_blocks": num_kv_blocks, "block_size": 4,
                                 "max_num_seqs": 16, "max_worker_restarts": max(5, kill + 1), **ENGINES[engine]})
    mcfg = freeze(ModelConfig, {"name": "tiny"})
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(job_dir or tmp) / engine
        with EngineServer(mcfg, ecfg, freeze(ServerConfig, {}), str(d)) as srv:
            status, models = _get_json(srv.url + "/v1/models")
            max_len = models["data"][0]["max_model_len"]
            max_tokens = max(4, min(32, max_len - 48))
            max_words = max(1, (max_len - max_tokens - 16) // 5)  # chat: the template takes ~10 tokens
            rng = random.Random(seed)
            refs = [[rng.randrange(10, BUILTIN_VOCAB_SIZE) for _ in range(rng.randint(3, 24))] for _ in range(6)]
            ref_text = asyncio.run(_references(srv.url, refs))
            specs = make_specs(n, seed, BUILTIN_VOCAB_SIZE, max_tokens, refs, max_words)
            t0 = time.monotonic()
            outcomes, switches, kills = asyncio.run(run_load(
                srv.url, specs, concurrency, engine.startswith("semipd"), kill, srv.proc.pid, seed))
            seconds = time.monotonic() - t0
            problems, counts = check(outcomes, ref_text, srv.url, d / "server_requests.jsonl", kill, switches)
            return {"engine": engine, "seconds": round(seconds, 2), **counts, "restart_seconds": kills,
                    "problems": problems}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kill", type=int, default=0, help="kill a worker this many times during each run")
    ap.add_argument("--num-kv-blocks", type=int, default=48)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    results = []
    for engine in args.engines.split(","):
        res = soak_engine(engine, args.requests, args.concurrency, args.seed, args.kill, args.num_kv_blocks)
        print(f"{engine}: {res['requests']} requests in {res['seconds']}s, {len(res['problems'])} problems",
              file=sys.stderr)
        results.append(res)
    emit(results, args.out)
    if any(r["problems"] for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
