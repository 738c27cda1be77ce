"""Shared fixtures: small HF checkpoints written to disk (helpers live in tests/helpers)."""

from __future__ import annotations

import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# model.dtype=auto would pick bfloat16 on a CPU with native bf16 and float32 elsewhere: the suite's greedy
# comparisons (against transformers in float32, and between engines) pin float32 so they mean the same on every
# machine. tests/semipd_engine/model/test_dtype.py covers the choice itself.
os.environ.setdefault("SEMIPD_AUTO_DTYPE", "float32")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers import make_checkpoint  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def hf_checkpoint(request, tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="session")
def llama_checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("llama"), "llama")
