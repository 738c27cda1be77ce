"""Start an engine server subprocess on a free local port, wait for its health endpoint, always stop it.

`EngineServer` starts this project's server; `ExternalServer` any engine from a command template (vLLM,
SGLang, the semi-PD fork, a mock); `AttachedServer` drives one that is already running. A launched server
runs in its own process group (its workers included), so stopping it - on success, failure or Ctrl-C -
leaves no orphan behind. `MetricsRecorder` samples the server's Prometheus page during the load.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]  # the repository root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerStartError(RuntimeError):
    pass


def _plain(x):
    return dataclasses.asdict(x) if dataclasses.is_dataclass(x) else dict(x)


class ServerProcess:
    """A server subprocess in its own session: started, health-checked, always stopped with its group."""

    health_path = "/health"

    def __init__(self, job_dir: str, health_timeout_s: float, port: int | None = None):
        self.job_dir = Path(job_dir)
        self.job_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.job_dir / "server.log"
        self.health_timeout_s = health_timeout_s
        self.proc: subprocess.Popen | None = None
        self._log = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONUNBUFFERED": "1"}

    def __enter__(self):
        try:
            self.start()
        except BaseException:  # a signal while it starts (JobInterrupted): `with` would not call __exit__
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        cmd = self.command()
        self._log = open(self.log_path, "w")
        try:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env=self.env(),
                                         start_new_session=True)
        except OSError as e:  # not found, not executable
            self._log.close()
            raise ServerStartError(f"cannot start the engine server: {cmd[0]!r}: {e.strerror or e}") from None
        deadline = time.monotonic() + self.health_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise ServerStartError(f"engine server exited with code {self.proc.returncode}; "
                                       f"log {self.log_path}:\n{self.log_excerpt()}")
            if healthy(self.url + self.health_path):
                return
            time.sleep(0.25)
        self.stop()
        raise ServerStartError(f"engine server not healthy after {self.health_timeout_s}s "
                               f"({self.url + self.health_path}); log {self.log_path}:\n{self.log_excerpt()}")

    def log_excerpt(self, n: int = 40) -> str:
        """The log's last `n` lines and, when it lies before them, the error that stopped the server: an engine
        that dies on a bad flag can print dozens of lines of shutdown after its exception (vLLM: ~50)."""
        try:
            return excerpt(self.log_path.read_text(errors="replace").splitlines(), n)
        except OSError:
            return ""

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
            except ProcessLookupError:
                pass
        try:  # whatever is left in the group (workers of a server that died)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        _wait_group_gone(self.proc.pid)
        if self._log is not None:
            self._log.close()


def _group_members(pgid: int) -> list[int]:
    """Processes of process group `pgid` that have not exited (zombies excluded); [] where /proc is absent."""
    out = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()  # after "pid (comm)": state, ppid, pgrp, ...
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            out.append(int(d.name))
    return out


def _wait_group_gone(pgid: int, timeout_s: float = 5.0) -> None:
    """A SIGKILL is delivered when its target next runs: on a loaded machine a killed grandchild can still be
    running a moment after the leader was reaped. Stop returns once none of the group is left (bounded)."""
    deadline = time.monotonic() + timeout_s
    while _group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)


_ERROR = re.compile(r"^\s*(?:[\w.]+\.)?\w*(?:Error|Exception|Exit)\b(?::|$)|^\s*(?:ERROR|CRITICAL|FATAL)\b|"
                    r"\b(?:ERROR|CRITICAL)\b.*\b(?:Error|Exception)\b")


def excerpt(lines: list[str], n: int = 40, context: int = 30) -> str:
    """`lines`' last `n`, preceded by the last traceback or error line (with up to `context` lines of its
    traceback) when that lies above them."""
    tail_start = max(0, len(lines) - n)
    hits = [i for i, line in enumerate(lines[:tail_start]) if _ERROR.search(line)]
    if not hits:
        return "\n".join(lines[tail_start:])
    last = hits[-1]
    tb = [i for i in range(max(0, last - context), last) if lines[i].startswith("Traceback")]
    first = tb[-1] if tb else last
    skipped = tail_start - last - 1
    return "\n".join([*lines[first:last + 1], f"... ({skipped} lines) ...", *lines[tail_start:]])


def listening_pid(url: str) -> int | None:
    """The process listening on `url`'s port, when that is this machine (Linux /proc); None otherwise."""
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    try:
        local = host in ("localhost", "") or ipaddress.ip_address(socket.gethostbyname(host)).is_loopback \
            or socket.gethostbyname(host) in _local_addresses()
    except (OSError, ValueError):
        return None
    if not local:
        return None
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if len(f) > 9 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f[9])
    if not inodes:
        return None
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            for fd in (proc / "fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return int(proc.name)
        except OSError:
            continue
    return None


def _local_addresses() -> set[str]:
    try:
        return {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None)}
    except OSError:
        return set()


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


class EngineServer(ServerProcess):
    """`with EngineServer(model_cfg, engine_cfg, server_cfg, job_dir) as srv: srv.url`"""

    def __init__(self, model_cfg, engine_cfg, server_cfg, job_dir: str, health_timeout_s: float = 300.0):
        super().__init__(job_dir, health_timeout_s)
        server = {**_plain(server_cfg), "port": self.port, "host": "127.0.0.1",
                  "request_log": str(self.job_dir / "server_requests.jsonl")}
        # The server composes this file over its schema: the same validation as the CLI.
        self.config_path = self.job_dir / "server_config.yaml"
        self.config_path.write_text(yaml.safe_dump({
            "defaults": ["serve_schema", {"override hydra/job_logging": "none"},
                         {"override hydra/hydra_logging": "none"}, "_self_"],
            "hydra": {"output_subdir": None, "run": {"dir": "."}},
            "model": _plain(model_cfg), "engine": _plain(engine_cfg), "server": server,
        }, sort_keys=False))

    def command(self) -> list[str]:
        return [sys.executable, "-m", "semipd_engine.serve", "--config-dir", str(self.job_dir),
                "--config-name", "server_config"]


def template_fields(model_cfg, engine_cfg, port: int) -> dict[str, object]:
    """What an external engine's command template may use (engine.external.command)."""
    e, x = engine_cfg, engine_cfg.external
    model = model_cfg.path or model_cfg.name
    return {"python": x.python or sys.executable, "host": "127.0.0.1", "port": port, "model": model,
            "served_model_name": os.path.basename(os.path.normpath(model)), "tp": model_cfg.tensor_parallel_size,
            "dtype": model_cfg.dtype, "max_num_seqs": e.max_num_seqs,
            "max_num_batched_tokens": e.max_num_batched_tokens, "max_model_len": model_cfg.max_model_len,
            "block_size": e.block_size, "prefill_share": e.prefill_share, "decode_share": e.decode_share,
            "extra_args": x.extra_args}


def fill(template: str, fields: dict[str, object], key: str) -> str:
    try:
        return template.format(**fields)
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"{key}: cannot fill the template {template!r}: unknown or malformed placeholder {e}; "
                         f"available: {', '.join('{' + k + '}' for k in fields)}") from None


class ExternalServer(ServerProcess):
    """An engine launched from `engine.external.command`, health-checked at `engine.external.health_path`."""

    def __init__(self, model_cfg, engine_cfg, job_dir: str):
        x = engine_cfg.external
        super().__init__(job_dir, x.startup_timeout_s)
        self.health_path = x.health_path
        fields = template_fields(model_cfg, engine_cfg, self.port)
        self.argv = shlex.split(fill(x.command, fields, "engine.external.command"))
        if not self.argv:
            raise ValueError("engine.external.command is empty")
        self.extra_env = {k: fill(str(v), fields, f"engine.external.env.{k}") for k, v in x.env.items()}
        vcmd = fill(x.version_command, fields, "engine.external.version_command") if x.version_command else None
        (self.job_dir / "external.json").write_text(json.dumps({
            "command": self.argv, "env": self.extra_env, "version_command": vcmd,
            "version": version(vcmd, self.extra_env), "tensor_parallel_size": model_cfg.tensor_parallel_size},
            indent=2))

    def command(self) -> list[str]:
        return self.argv

    def env(self) -> dict[str, str]:
        return {**super().env(), **self.extra_env}


class AttachedServer:
    """A server somebody else runs (`engine.external.url`): checked, driven, never started or stopped."""

    def __init__(self, engine_cfg, job_dir: str, model_cfg=None):
        x = engine_cfg.external
        self.url = x.url.rstrip("/")
        if not healthy(self.url + x.health_path):
            raise ServerStartError(f"engine.external.url={x.url}: no healthy server at {self.url + x.health_path}")
        Path(job_dir).mkdir(parents=True, exist_ok=True)
        vcmd = None
        if x.version_command and model_cfg is not None:
            port = urllib.parse.urlsplit(self.url).port or 80
            vcmd = fill(x.version_command, template_fields(model_cfg, engine_cfg, port),
                        "engine.external.version_command")
        # A server on this machine: its processes are the job's, not interference (sweep/host.py).
        self.pid = listening_pid(self.url)
        (Path(job_dir) / "external.json").write_text(json.dumps({
            "attached": self.url, "version_command": vcmd, "version": version(vcmd, {}), "pid": self.pid},
            indent=2))

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def stop(self) -> None:
        """Nothing to stop: the server is not ours."""


def version(command: str | None, env: dict[str, str]) -> str | None:
    if not command:
        return None
    try:
        out = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=120,
                             env={**os.environ, **env})
        return (out.stdout or out.stderr).strip()[-2000:] or None
    except (OSError, subprocess.SubprocessError) as e:
        return f"unavailable: {e}"


# This project's metrics under the canonical names the figures use. Iteration times are a histogram: its running
# sum and count, differenced between samples, give the mean iteration time per phase over time. The partition
# gauges exist on semi-PD engines only (a metric the page lacks is simply never sampled).
OWN_METRICS = {"requests_running": "requests_running", "requests_waiting": "requests_waiting",
               "kv_blocks_used": "kv_blocks_used", "kv_blocks_total": "kv_blocks_total",
               "iteration_time_sum_s": "iteration_time_seconds_sum", "iterations": "iteration_time_seconds_count",
               "partition_prefill_share": "partition_prefill_share",
               "partition_decode_share": "partition_decode_share",
               "iteration_tokens": "iteration_tokens_total", "prompt_tokens": "prompt_tokens_total",
               "generation_tokens": "generation_tokens_total", "preemptions": "preemptions_total",
               "prefix_cache_queries": "prefix_cache_queries_total", "prefix_cache_hits": "prefix_cache_hits_total"}


class MetricsRecorder:
    """Samples named metrics from a server's /metrics every `interval_s` in a thread; `save()` writes parquet.

    `names`: canonical name -> the server's metric name; every label set is kept (rows: time_s, metric,
    labels, value, and monotonic_s, the sample's time.monotonic(), which puts it on the load's clock).
    Scrape failures are counted, never raised: the load run comes first.
    """

    def __init__(self, url: str, names: dict[str, str], interval_s: float = 1.0):
        self.url, self.names, self.interval_s = url, dict(names), interval_s
        self.rows: list[dict] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="metrics-recorder")
        self._t0 = time.monotonic()

    def __enter__(self):
        if self.names:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def _run(self) -> None:
        wanted = {v: k for k, v in self.names.items()}
        while not self._stop.is_set():
            now = time.monotonic()
            t = now - self._t0
            try:
                with urllib.request.urlopen(self.url + "/metrics", timeout=5) as r:
                    text = r.read().decode()
            except (urllib.error.URLError, OSError):
                self.failures += 1
            else:
                for name, labels, value in parse_prometheus(text):
                    if name in wanted:
                        self.rows.append({"time_s": t, "metric": wanted[name], "source": name, "labels": labels,
                                          "value": value, "monotonic_s": now})
            self._stop.wait(self.interval_s)

    def save(self, path: Path) -> None:
        if self.rows:
            import pandas as pd

            pd.DataFrame(self.rows).to_parquet(path, index=False)


def parse_prometheus(text: str):
    """(name, labels, value) of every sample in a Prometheus text page."""
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, labels = head.partition("{")
        try:
            yield name, labels.rstrip("}"), float(value)
        except ValueError:
            continue
