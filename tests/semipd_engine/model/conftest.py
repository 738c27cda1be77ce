"""Run the Triton kernels under the interpreter where there is no GPU.

Triton decides interpreter or GPU compilation when a kernel is defined, i.e. when
`semipd_engine.model.triton_attention` is first imported; nothing else in the suite imports it,
and this conftest is loaded before the test modules of this folder are collected. With CUDA the
kernels compile for the GPU and the same tests run there on CUDA tensors.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
