"""Kernel tests run the Triton kernels through Triton's interpreter where there is no GPU,
and compiled on the GPU where there is one (every tensor the tests make lands on it).

`triton.jit` decides between compiler and interpreter when a kernel is decorated, i.e. when
`brim.kernels.paged_attention_triton` / `brim.kernels.store_kv_triton` are first imported,
reading
TRITON_INTERPRET at that moment. brim.kernels imports them lazily, and nothing outside
the Triton backend does, so setting the variable here (before the test modules of this
folder are imported) is enough; `tests/conftest.py` is not needed. The guard below fails
loudly if something imported the kernels earlier in compiled mode.
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    _launcher = sys.modules.get("brim.kernels.paged_attention_triton")
    if _launcher is not None and not _launcher.IS_INTERPRETED:
        raise RuntimeError("brim.kernels.paged_attention_triton was imported before "
                           "TRITON_INTERPRET=1 was set: its kernels were built for a GPU "
                           "that is not there")


@pytest.fixture
def seed():
    """A fresh seed every run (inputs differ run to run), reported for reproduction."""
    value = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(value)
    return value


ON_GPU = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def default_device():
    """Tensors the tests create live on the GPU when there is one."""
    if not ON_GPU:
        yield "cpu"
        return
    torch.set_default_device("cuda")
    try:
        yield "cuda"
    finally:
        torch.set_default_device("cpu")
