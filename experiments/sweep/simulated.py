"""One load run on the simulated backend: the same workload, schedule, rows and summary as a real run.

A real job starts a server and replays the workload over HTTP; a simulated one
hands the same requests (lengths from the same workload loader, arrival
offsets from the same schedule) to the simulated engine and writes
`requests.parquet` with the load generator's columns and `summary.json` with the
same aggregates, so aggregation, figures, W&B and the goodput search cannot tell
the two apart (a `backend` block in the summary says which it was).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import pandas as pd

from experiments.analysis import request_metrics as M
from experiments.loadgen import conversations as conv
from experiments.loadgen.lengths import report as report_lengths
from experiments.loadgen.prompts import PromptBuilder, prompt_token_ids, turn_parts
from experiments.loadgen.result import RunResult, SLOs, measured, offered_rate, workload_run
from experiments.loadgen.rows import write_rows
from experiments.loadgen.workloads import load_workload
from semipd_engine.control.loop import STEERING_KEYS, ControlLoop
from semipd_engine.topology.engines import engine_kind
from semipd_engine.topology.graph import CONTROLLER_KEYS


def _tokenizer(lcfg, wcfg, for_ids: bool = False):
    """The load generator's tokenizer where the simulation needs it: real text to count (sharegpt), or prompts
    built as token ids (`for_ids`: drawn from its vocabulary, as a real run's are)."""
    if not lcfg.tokenizer or lcfg.tokenizer == "none" or not (for_ids or wcfg.name == "sharegpt"):
        return None
    from semipd_engine.serving.tokenizer import load_tokenizer

    return load_tokenizer(None if lcfg.tokenizer == "builtin" else lcfg.tokenizer)


def check(model_cfg, engine_cfg, hardware_cfg, backend_cfg) -> None:
    """Every bad preset fails here, naming its key, before a job runs (the simulator itself is built once, by the
    run)."""
    from semipd_engine.sim.build import validate

    validate(model_cfg, engine_cfg, hardware_cfg, backend_cfg)


def stack_name(engine_cfg, backend_cfg) -> str:
    """The serving stack a simulated job charges (`profile`: a CPU profile measured this project's own)."""
    if backend_cfg.cost_model != "roofline":
        return "profile"
    from semipd_engine.sim.stack import resolve
    from semipd_engine.topology.engines import engine_kind

    s = resolve(backend_cfg.stack, engine_kind(engine_cfg.name).stack, backend_cfg.overhead_s)
    default = resolve(None, s.name)
    return s.name if s == default else f"{s.name}*"  # a field overridden


SAMPLES = 200
ROOT = Path(__file__).resolve().parents[2]  # the repository root


def simulate(model_cfg, engine_cfg, hardware_cfg, backend_cfg, arrivals, prompt_lens, output_lens,
             prompt_ids=None, next_turn=None):
    """Run the simulated engine; returns (finished requests, simulator, platform, wall seconds).

    An arrival of NaN is a conversation's later turn: `next_turn(req)` gives, once `req` has finished, the
    (index, think time, prompt ids) of the turn after it, or None; it is sent the think time after the answer."""
    from semipd_engine.sim.build import build_simulator
    from semipd_engine.sim.simulator import make_request

    sim, plat = build_simulator(model_cfg, engine_cfg, hardware_cfg, backend_cfg)
    delay = plat.request_delay_s
    sent = {f"sim-{i}": float(a) for i, a in enumerate(arrivals) if not math.isnan(a)}
    requests = [make_request(i, a + delay, prompt_lens[i], output_lens[i], None if prompt_ids is None else
                             prompt_ids[i]) for i, a in enumerate(arrivals) if not math.isnan(a)]
    follow = None
    if next_turn is not None:
        def follow(req, t):
            turn = next_turn(req)
            if turn is None:
                return None
            j, think, ids = turn
            sent[f"sim-{j}"] = t + think  # the client reads the answer's end, thinks, sends
            return make_request(j, t + think + delay, len(ids), output_lens[j], ids)
    if sent and max(sent.values()) > 0:  # ~200 samples of the queues over the arrivals, as a server's gauges
        sim.sample_every(max(sent.values()) / SAMPLES)
    t0 = time.perf_counter()
    done = sim.run(requests, follow, total=len(arrivals))
    for r in done:  # latencies count from the client's send, as a real run's do
        r.times.arrival = sent[r.request_id]
    return done, sim, plat, time.perf_counter() - t0


def to_frame(done, expected: dict[str, tuple[int, int]], turns: Optional[dict[str, tuple]] = None) -> pd.DataFrame:
    """The load generator's rows; `expected`: (prompt, output) lengths by request id; `turns`: (conversation,
    turn) by request id, for a multi-turn workload."""
    rows = []
    for r in sorted(done, key=lambda r: int(r.request_id.rsplit("-", 1)[1])):
        t = r.times
        n_out = len(r.output_token_ids)
        p, o = expected[r.request_id]
        conversation, turn = (turns or {}).get(r.request_id, (None, 0))
        rows.append({
            "request_id": int(r.request_id.rsplit("-", 1)[1]), "scheduled_s": t.arrival, "send_s": t.arrival,
            "first_token_s": t.first_token, "finish_s": t.finished, "token_times_s": list(t.tokens),
            "prompt_tokens": r.num_prompt_tokens, "output_tokens": n_out, "expected_prompt_tokens": p,
            "expected_output_tokens": o, "num_chunks": n_out, "http_status": 200, "error": None,
            "cached_tokens": r.num_cached_tokens or 0,
            "conversation_id": conversation, "turn": turn,
        })
    return pd.DataFrame(rows, columns=ROW_COLUMNS)


ROW_COLUMNS = ["request_id", "scheduled_s", "send_s", "first_token_s", "finish_s", "token_times_s", "prompt_tokens",
               "output_tokens", "expected_prompt_tokens", "expected_output_tokens", "num_chunks", "http_status",
               "error", "cached_tokens", "conversation_id", "turn"]  # to_frame's


@dataclass
class Simulation:
    """What one simulation produced, before any SLO is applied: the requests' rows and the simulator's records."""

    rows: Union[pd.DataFrame, Path]  # to_frame(...), or a cached file holding them (read when first asked for)
    backend: dict[str, Any]  # the platform and the simulator's counters (RunResult.backend)
    samples: list[dict]  # the server gauges over virtual time
    decisions: list[dict]  # the controller's log (semipd_dynamic)
    key: str = ""
    cached: bool = False
    control: Optional[dict] = None  # what its controller decided from (`ControlLoop.replay`), if it has one
    steering_free: str = ""  # its key without what a controller steers to (`simulation_key(..., steering=False)`)

    @property
    def frame(self) -> pd.DataFrame:
        """One row per request, the load generator's columns (an SLO twin judged from the judged cache never
        reads them). A cached file is the first judging's rows, whose other columns are read again (`derive`)."""
        if not isinstance(self.rows, pd.DataFrame):
            self.rows = pd.read_parquet(self.rows, columns=ROW_COLUMNS)
        return self.rows


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """A hash of this project's Python sources and calibration tables: a simulation cached by other code or
    other tables is never reused."""
    h = hashlib.sha256()
    files = [f for pkg in ("semipd_engine", "experiments") for f in sorted((ROOT / pkg).rglob("*.py"))]
    files += sorted((ROOT / "semipd_engine" / "sim" / "calibration").glob("*.json"))  # GPU and stack tables
    for f in files:
        h.update(str(f.relative_to(ROOT)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def simulation_key(model_cfg, engine_cfg, hardware_cfg, backend_cfg, lcfg, wcfg, steering: bool = True) -> str:
    """Everything that changes what is simulated: the model, the engine (its decision log's path aside), the
    platform, the workload and its arrivals, the tokenizer (a shared-prefix workload's token ids), the code. The
    SLOs and the measurement window are not in it: they only judge the result (a controller's SLOs are engine
    keys, so a `semipd_dynamic` run is keyed by them). Without `steering`, the key of every run that differs from
    this one only in what its controller steers to (`ControlLoop.STEERING_KEYS`): the candidates for a replay."""
    engine = dataclasses.asdict(engine_cfg)
    engine.pop("decision_log", None)
    if not steering:
        engine.update({k: None for k in STEERING_KEYS})
    parts = {"model": dataclasses.asdict(model_cfg), "engine": engine, "hardware": dataclasses.asdict(hardware_cfg),
             "backend": dataclasses.asdict(backend_cfg), "workload": dataclasses.asdict(wcfg),
             "tokenizer": lcfg.tokenizer, "code": code_version()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def simulation(model_cfg, engine_cfg, hardware_cfg, backend_cfg, lcfg, wcfg,
               cache_dir: Optional[Path] = None) -> tuple[Simulation, Any, dict]:
    """Simulate the workload (or read the same simulation from `cache_dir`); returns it, the workload and its
    lengths report."""
    tokenizer = _tokenizer(lcfg, wcfg)
    workload = load_workload(wcfg, tokenizer)
    lengths = report_lengths(workload, wcfg, lcfg.tokenizer)
    key = simulation_key(model_cfg, engine_cfg, hardware_cfg, backend_cfg, lcfg, wcfg) if cache_dir else ""
    steered = CONTROLLER_KEYS <= engine_kind(engine_cfg.name).keys
    if cache_dir is not None and (Path(cache_dir) / f"{key}.json").is_file():
        meta = json.loads((Path(cache_dir) / f"{key}.json").read_text())
        return Simulation(Path(cache_dir) / meta["rows"], meta["backend"], meta["samples"], meta["decisions"],
                          key, True), workload, lengths
    if cache_dir is not None and steered:
        replayed = _replayed(Path(cache_dir), engine_cfg,
                             simulation_key(model_cfg, engine_cfg, hardware_cfg, backend_cfg, lcfg, wcfg, False))
        if replayed is not None:
            return replayed, workload, lengths
    items = workload.items
    offsets = conv.offsets(wcfg, workload)
    if offsets is None:
        raise ValueError("backend=sim replays open-loop arrivals (workload.arrival=poisson|gamma|constant|trace); "
                         "a closed loop needs a client")
    prompts = [it.prompt_len for it in items]
    outputs = [it.output_len for it in items]
    ids, next_turn = None, None
    shared = workload.num_conversations or any(it.prefix_group is not None or it.hash_blocks for it in items)
    if shared:  # what a token-ids run sends
        builder = PromptBuilder(tokenizer if tokenizer is not None else _tokenizer(lcfg, wcfg, for_ids=True),
                                seed=wcfg.seed)
        if workload.num_conversations:
            ids, next_turn = _turns(items, builder, wcfg.history)
        else:
            ids = [prompt_token_ids(builder, it) for it in items]
    done, sim, plat, wall = simulate(model_cfg, engine_cfg, hardware_cfg, backend_cfg, offsets, prompts, outputs,
                                     ids, next_turn)
    expected = {f"sim-{i}": (p, o) for i, (p, o) in enumerate(zip(prompts, outputs))}
    st = sim.stats
    backend = {"name": "sim", "cost_model": backend_cfg.cost_model, "platform": plat.describe,
               "stack": dataclasses.asdict(plat.stack),
               "wall_s": wall, "simulated_requests_per_s": len(done) / wall if wall > 0 else None,
               "iterations": st.iterations, "fast_forwarded_iterations": st.fast_forwarded,
               "events": st.events, "kv_transfers": st.transfers, "kv_transfer_bytes": st.transfer_bytes,
               "kv_transfer_cached_blocks": st.transfer_cached_blocks,
               "partition_switches": st.switches, "kv_blocks_used_peak": st.kv_peak_blocks}
    turns = {f"sim-{i}": (it.conversation, it.turn) for i, it in enumerate(items)}
    run = Simulation(to_frame(done, expected, turns), backend, st.samples, st.decisions, key)
    if sim.control is not None and cache_dir is not None:
        run.control = {"cores": sim.control.cores, "inputs": sim.control.inputs}
        run.steering_free = simulation_key(model_cfg, engine_cfg, hardware_cfg, backend_cfg, lcfg, wcfg, False)
    return run, workload, lengths


def store(cache_dir: Path, run: Simulation, rows: Path) -> None:
    """Cache a simulation whose rows are in `rows` (under `cache_dir`: the first judging's, its requests'
    columns among them), once they are: written whole or not at all, a concurrent job reads a complete entry
    or none. Its rows are not written again: a second parquet of ~1M token times per job cost more than the
    JSON of everything else."""
    d = Path(cache_dir)
    meta = {"rows": str(rows.relative_to(d)), "backend": run.backend, "samples": run.samples,
            "decisions": run.decisions}
    if run.control is not None:  # what its controller decided from, for runs that differ in their SLOs
        meta["control"] = run.control
    tmp = d / f".{run.key}.{os.getpid()}.json"  # this process's own: two jobs may write the same entry at once
    tmp.write_text(json.dumps(meta, default=float))
    os.replace(tmp, d / f"{run.key}.json")
    if run.control is not None:  # found by its steering-free key (an empty file names the entry)
        twins = d / "steered" / run.steering_free
        twins.mkdir(parents=True, exist_ok=True)
        (twins / run.key).touch()


def _replayed(cache_dir: Path, engine_cfg, steering_free: str) -> Optional[Simulation]:
    """A cached simulation of a run that differs from this one only in what its controller steers to, whose
    decisions this run's controller makes too (`ControlLoop.replay`: then every step of the two runs is the
    same): its rows, samples and counters, with this controller's own decision rows (their observed and
    predicted latencies read this run's percentile and SLOs). None when no such run is cached, or when this
    controller would have moved elsewhere in each (simulated anew)."""
    twins = cache_dir / "steered" / steering_free
    for entry in sorted(twins.iterdir()) if twins.is_dir() else ():
        meta_file = cache_dir / f"{entry.name}.json"
        if not meta_file.is_file():
            continue
        meta = json.loads(meta_file.read_text())
        control = meta.get("control")
        if control is None:
            continue
        rows = ControlLoop.replay(engine_cfg, control["cores"], control["inputs"], meta["decisions"])
        if rows is not None:
            return Simulation(cache_dir / meta["rows"], {**meta["backend"], "replayed_controller": True},
                              meta["samples"], rows, entry.name, True)
    return None


def _turns(items, builder: PromptBuilder, history: str):
    """A conversation's prompts as token ids, every turn's under the recorded history (first turns only under the
    generated one), and the rule for the next turn's (`simulate`'s `next_turn`): the recorded one, or the prompt
    just served with the answer the simulator generated for it, then the next message (conversations.extend, as
    the load generator does)."""
    parts = [turn_parts(builder, it, as_ids=True) for it in items]
    # the generated history needs only first turns up front (every later prompt is built when it is due)
    recorded = conv.recorded(items, parts) if history == "recorded" else [
        user if it.turn == 0 else None for it, (user, _) in zip(items, parts)]

    def next_turn(req):
        i = int(req.request_id.rsplit("-", 1)[1])
        j = i + 1
        if j >= len(items) or items[j].conversation != items[i].conversation:
            return None
        ids = recorded[j] if history == "recorded" else conv.extend(req.prompt_token_ids, req.output_token_ids,
                                                                    parts[j][0])
        return j, items[j].think_s, ids

    return recorded, next_turn


def judge_key(run: Simulation, lcfg, conversations: bool) -> str:
    """What a simulation's rows are judged by before any SLO reads them: the simulation, where latencies count
    from, the measurement window."""
    parts = {"simulation": run.key, "measure_from": lcfg.measure_from, "warmup_s": lcfg.warmup_s,
             "cooldown_s": lcfg.cooldown_s, "warmup_requests": getattr(lcfg, "warmup_requests", 0),
             "conversations": conversations}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def run_simulated(model_cfg, engine_cfg, hardware_cfg, backend_cfg, lcfg, wcfg, slo,
                  output_dir: Optional[str] = None, resolved_config: Any = None,
                  cache_dir: Optional[Path] = None) -> RunResult:
    """The simulated twin of `experiments.loadgen.run_loadgen`: same inputs, same files, the same result type.

    With `cache_dir` (a sweep's), runs that differ only in how they are judged (SLOs, the measurement window)
    share one simulation: the first simulates and stores it under `simulation_key`, the others read it. Runs that
    differ only in their SLOs also share the judging that does not read them (`judge_key`): the rows with their
    latencies and window (the first run's `requests.parquet`, copied) and their bootstrapped intervals.
    Judging and writing, too, run without cyclic garbage collection (`paused_gc`): their frames hold a list per
    request and token."""
    from semipd_engine.sim.simulator import paused_gc

    with paused_gc():
        return _run_simulated(model_cfg, engine_cfg, hardware_cfg, backend_cfg, lcfg, wcfg, slo, output_dir,
                              resolved_config, cache_dir)


def _run_simulated(model_cfg, engine_cfg, hardware_cfg, backend_cfg, lcfg, wcfg, slo, output_dir, resolved_config,
                   cache_dir) -> RunResult:
    run, workload, lengths = simulation(model_cfg, engine_cfg, hardware_cfg, backend_cfg, lcfg, wcfg, cache_dir)
    offered = offered_rate(workload, wcfg)
    judged = Path(cache_dir) / "judged" / judge_key(run, lcfg, offered is not None) if cache_dir and run.key \
        else None
    rows_file = judged.with_suffix(".parquet") if judged is not None else None
    cis: dict[str, Any] = {}
    reuse = judged is not None and rows_file.is_file() and judged.with_suffix(".json").is_file()
    if reuse:
        cis = json.loads(judged.with_suffix(".json").read_text())
        df, aggregates = measured(pd.read_parquet(rows_file), lcfg, slo, offered, marked=True, sample_cis=cis)
    else:
        df, aggregates = measured(M.derive(run.frame, lcfg.measure_from), lcfg, slo, offered, sample_cis=cis)
    result = RunResult(
        aggregates=aggregates, slo=SLOs(slo.ttft_s, slo.tpot_s, slo.tpot_definition),
        # No client, no host: nothing can be late or disturbed. The model's own validity is in docs/benchmarks.md.
        self_check={"valid": True, "reasons": [], "simulated": True},
        workload=workload_run(workload, wcfg, len(workload.items), lengths), model=model_cfg.path or model_cfg.name,
        length_mismatch={"prompt_mismatched": 0, "output_mismatched": int(
            (df["output_tokens"] != df["expected_output_tokens"]).sum()), "checked": int(len(df))},
        backend={**run.backend, **({"simulation_key": run.key, "from_cache": run.cached,
                                    "judged_from_cache": reuse} if run.key else {})},
        config=resolved_config,
        t0_monotonic=0.0)  # the virtual clock starts with the load: server samples are on the load's clock
    written = None
    if output_dir:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = out / "requests.parquet"
        if reuse:
            shutil.copyfile(rows_file, written)
        else:
            write_rows(df, written)
        if run.samples:  # the same file a real job's MetricsRecorder writes (monotonic_s: the virtual time)
            pd.DataFrame(run.samples).assign(monotonic_s=lambda f: f["time_s"]).to_parquet(
                out / "server_metrics.parquet", index=False)
        result.write(out)
        if run.decisions:  # the same decision log a real semipd_dynamic job writes
            first = {"time_s": 0.0, "prefill_share": engine_cfg.prefill_share,
                     "decode_share": engine_cfg.decode_share, "reason": "start"}
            with open(out / "partition_log.jsonl", "w") as f:
                for row in [first, *run.decisions]:
                    f.write(json.dumps(row, default=float) + "\n")
    if judged is not None and not reuse:  # written whole or not at all, as the simulation is
        judged.parent.mkdir(parents=True, exist_ok=True)
        tmp = judged.parent / f".{judged.name}.{os.getpid()}"
        if written is not None:
            shutil.copyfile(written, f"{tmp}.parquet")
        else:
            write_rows(df, f"{tmp}.parquet")
        os.replace(f"{tmp}.parquet", rows_file)
        Path(f"{tmp}.json").write_text(json.dumps(cis))
        os.replace(f"{tmp}.json", judged.with_suffix(".json"))
    if judged is not None and not run.cached:  # the simulation, now that its rows are on disk
        store(Path(cache_dir), run, rows_file)
    return result


def single_request_latency(model_cfg, engine_cfg, hardware_cfg, backend_cfg, prompt_len: int,
                           output_len: int) -> dict[str, float]:
    """TTFT and TPOT of one request alone on the simulated engine (what SLO scales multiply)."""
    done, *_ = simulate(model_cfg, engine_cfg, hardware_cfg, backend_cfg, [0.0], [prompt_len], [output_len])
    t = done[0].times
    return {"ttft_s": t.first_token - t.arrival,
            "tpot_s": (t.finished - t.first_token) / max(1, len(done[0].output_token_ids) - 1)}
