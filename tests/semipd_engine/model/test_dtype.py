"""model.dtype=auto: bfloat16 where the CPU multiplies it natively, float32 where it would be emulated."""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys

import pytest
import torch

from semipd_engine.config import ModelConfig, freeze
from semipd_engine.model import dtype as dtypes
from semipd_engine.model.loader import torch_dtype

NATIVE = {"float32": 100.0, "bfloat16": 420.0, "float16": 90.0}  # a CPU with avx512_bf16 / AMX
EMULATED = {"float32": 103.0, "bfloat16": 0.9, "float16": 0.8}  # the AVX2-only EPYC of the issue


@pytest.fixture
def fake_cpu(monkeypatch, tmp_path):
    """A CPU whose matmul speeds are `fake_cpu(table)`; counts the measurements; a private cache."""
    monkeypatch.setenv("SEMIPD_CACHE", str(tmp_path))
    monkeypatch.delenv(dtypes.PIN_ENV, raising=False)
    calls = []

    def install(table):
        def gflops(name, *a, **k):
            calls.append(name)
            return table[name]

        monkeypatch.setattr(dtypes, "matmul_gflops", gflops)
        return calls

    return install


def test_auto_picks_bfloat16_where_native(fake_cpu):
    fake_cpu(NATIVE)
    c = dtypes.choose("auto")
    assert c.dtype == "bfloat16" and c.requested == "auto" and not c.emulated
    assert c.gflops["bfloat16"] == 420.0 and c.gflops["float32"] == 100.0
    assert "native" in c.reason and "4.2x" in c.reason


def test_auto_picks_float32_where_bfloat16_is_emulated(fake_cpu):
    fake_cpu(EMULATED)
    c = dtypes.choose("auto")
    assert c.dtype == "float32" and "emulated" in c.reason and "0.009x" in c.reason
    assert torch_dtype("auto") == torch.float32  # the loader resolves auto the same way


def test_the_probe_runs_once_per_machine_and_is_cached(fake_cpu):
    calls = fake_cpu(NATIVE)
    first = dtypes.choose("auto")
    assert sorted(calls) == sorted(dtypes.NAMES) and not first.cached
    again = dtypes.choose("auto")
    assert len(calls) == len(dtypes.NAMES) and again.cached and again.dtype == first.dtype
    cache = json.loads(dtypes.cache_path().read_text())
    assert list(cache) == [dtypes.probe_key()] and cache[dtypes.probe_key()]["gflops"] == NATIVE


def test_kernel_dispatch_settings_are_part_of_the_cache_key(fake_cpu, monkeypatch):
    plain = dtypes.probe_key()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # what a user does to turn off bf16 kernels
    assert dtypes.probe_key() != plain and "ONEDNN_MAX_CPU_ISA=AVX2" in dtypes.probe_key()


def test_forcing_an_emulated_dtype_warns_with_the_ratio(fake_cpu, caplog):
    fake_cpu(EMULATED)
    with caplog.at_level(logging.WARNING, logger="semipd_engine.model.dtype"):
        c = dtypes.choose("bfloat16")
    assert c.dtype == "bfloat16" and c.emulated  # forced: used as given
    (msg,) = [r.getMessage() for r in caplog.records]
    assert "model.dtype=bfloat16 is emulated" in msg and "0.9 GFLOP/s against 103" in msg and "0.009x" in msg


def test_forcing_a_native_dtype_does_not_warn(fake_cpu, caplog):
    fake_cpu(NATIVE)
    with caplog.at_level(logging.WARNING, logger="semipd_engine.model.dtype"):
        c = dtypes.choose("bfloat16")
    assert not c.emulated and not caplog.records


def test_float32_by_name_needs_no_probe(fake_cpu):
    calls = fake_cpu(EMULATED)
    assert dtypes.choose("float32").dtype == "float32" and not calls


def test_pinned_auto_and_bad_names(fake_cpu, monkeypatch):
    calls = fake_cpu(NATIVE)
    monkeypatch.setenv(dtypes.PIN_ENV, "float32")
    c = dtypes.choose("auto")
    assert c.dtype == "float32" and dtypes.PIN_ENV in c.reason and not calls
    with pytest.raises(ValueError, match="model.dtype must be auto or one of"):
        dtypes.choose("fp8")
    monkeypatch.setenv(dtypes.PIN_ENV, "half")
    with pytest.raises(ValueError, match=dtypes.PIN_ENV):
        dtypes.choose("auto")


def test_cuda_auto(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert dtypes.choose("auto", "cuda").dtype == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert dtypes.choose("auto", "cuda:0").dtype == "float16"


def test_resolve_makes_the_config_concrete(fake_cpu):
    fake_cpu(EMULATED)
    cfg, c = dtypes.resolve(freeze(ModelConfig, {"name": "tiny"}))  # the schema's default is auto
    assert cfg.dtype == "float32" and c.requested == "auto"
    assert "model.dtype=auto -> float32 on cpu" in dtypes.describe(c)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="oneDNN's ISA cap is an x86 setting")
def test_real_probe_with_bf16_kernels_turned_off_picks_float32(tmp_path):
    """No faking: oneDNN capped at AVX2 runs bf16 matmuls the way an AVX2-only CPU does (emulated)."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "SEMIPD_CACHE": str(tmp_path)}
    env.pop(dtypes.PIN_ENV, None)
    code = ("import json; from semipd_engine.model.dtype import choose; c = choose('auto'); "
            "print(json.dumps(c.as_dict()))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    c = json.loads(out.stdout.strip().splitlines()[-1])
    assert c["dtype"] == "float32" and c["gflops"]["bfloat16"] < c["gflops"]["float32"], c
