"""Start an engine server subprocess on a free local port, wait for /health, always stop it.

The server runs in its own process group (its workers included), so stopping
it - on success, failure or Ctrl-C - leaves no orphan behind.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
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


class EngineServer:
    """`with EngineServer(model_cfg, engine_cfg, server_cfg, job_dir) as srv: srv.url`"""

    def __init__(self, model_cfg, engine_cfg, server_cfg, job_dir: str, health_timeout_s: float = 300.0):
        self.job_dir = Path(job_dir)
        self.job_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.job_dir / "server.log"
        self.health_timeout_s = health_timeout_s
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
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> EngineServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        cmd = [sys.executable, "-m", "semipd_engine.serve", "--config-dir", str(self.job_dir),
               "--config-name", "server_config"]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        deadline = time.monotonic() + self.health_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise ServerStartError(f"engine server exited with code {self.proc.returncode}; "
                                       f"log {self.log_path}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        self.stop()
        raise ServerStartError(f"engine server not healthy after {self.health_timeout_s}s; "
                               f"log {self.log_path}:\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-n:])
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
        self._log.close()
