"""Read an offline W&B run back: the records of its `run-<id>.wandb` file, and the tables it logged.

The file is a LevelDB-style log (what `wandb sync` uploads): a 7-byte header, then 32 KiB blocks of chunks, each
with a 7-byte header (checksum, length, type: full / first / middle / last) and a piece of one serialized
`wandb_internal_pb2.Record`. The installed wandb writes these files from its Go core and ships no Python reader.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

_FILE_HEADER = 7  # b":W&B", a 2-byte magic, a version byte
_BLOCK = 32 * 1024
_CHUNK_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def records(path: Path) -> list[pb.Record]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    out, pos, pieces = [], _FILE_HEADER, []
    while pos + _CHUNK_HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK_HEADER:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + _CHUNK_HEADER])
        if kind == 0 and length == 0:
            break
        if pos + _CHUNK_HEADER + length > len(data):  # a chunk still being written
            break
        piece = data[pos + _CHUNK_HEADER:pos + _CHUNK_HEADER + length]
        pos += _CHUNK_HEADER + length
        if kind in (_FULL, _FIRST):
            pieces = [piece]
        else:
            pieces.append(piece)
        if kind in (_FULL, _LAST):
            rec = pb.Record()
            rec.ParseFromString(b"".join(pieces))
            out.append(rec)
    return out


@dataclass
class OfflineRun:
    dir: Path
    run: pb.RunRecord
    config: dict[str, Any]
    history: list[dict[str, Any]]
    metrics: list[pb.MetricRecord] = field(default_factory=list)

    @property
    def tags(self) -> list[str]:
        return list(self.run.tags)

    def table(self, key: str) -> dict[str, Any]:
        """The last table logged under `key`: {"columns": [...], "data": [[...], ...]} as the run saved it."""
        logged = [row[key] for row in self.history if key in row]
        assert logged, f"no {key!r} in the run's history"
        return json.loads((self.dir / "files" / logged[-1]["path"]).read_text())

    def series(self, key: str) -> list[dict[str, Any]]:
        return [row for row in self.history if key in row]


def finished_records(path: Path, timeout_s: float = 60.0) -> list[pb.Record]:
    """The file's records once its `exit` record is on disk.

    wandb's core process writes the file through a buffer of its own: `run.finish()` can return before the last
    records (on a loaded machine, all of them) reach the disk.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        recs = records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in recs) or time.monotonic() > deadline:
            return recs
        time.sleep(0.1)


def read_run(run_dir: Path) -> OfflineRun:
    """An `offline-run-*` directory -> its run record, config, history rows and metric definitions."""
    run_dir = Path(run_dir)
    (wandb_file,) = run_dir.glob("run-*.wandb")
    run, config, history, metrics = None, {}, [], []
    for rec in finished_records(wandb_file):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run = rec.run
            config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif kind == "history":
            row: dict[str, Any] = {}
            for i in rec.history.item:
                # A media value (a table, an image) comes as one item per field, keyed by [name, field].
                *parents, leaf = list(i.nested_key) or [i.key]
                node = row
                for k in parents:
                    node = node.setdefault(k, {})
                node[leaf] = json.loads(i.value_json)
            history.append(row)
        elif kind == "metric":
            metrics.append(rec.metric)
    assert run is not None, f"{wandb_file} has no run record"
    return OfflineRun(run_dir, run, config, history, metrics)
