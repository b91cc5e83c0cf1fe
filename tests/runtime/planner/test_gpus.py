"""The GPU table: product names as GPU Feature Discovery writes them, and memory sizes."""

from __future__ import annotations

import pytest

from brim.runtime.planner.gpus import GPU_MEMORY_MIB, lookup_gpu, parse_memory

MiB, GiB = 2**20, 2**30


@pytest.mark.parametrize("name, product", [
    ("NVIDIA-H100-80GB-HBM3", "NVIDIA-H100-80GB-HBM3"),
    ("h100-80gb", "NVIDIA-H100-80GB-HBM3"),
    ("H200", "NVIDIA-H200"),
    ("a100-40gb", "NVIDIA-A100-SXM4-40GB"),  # two products, same memory
    ("L4", "NVIDIA-L4"),
    ("L40", "NVIDIA-L40"),
    ("Tesla T4", "Tesla-T4"),
])
def test_gpu_lookup(name, product):
    assert lookup_gpu(name) == (product, GPU_MEMORY_MIB[product] * MiB)


def test_gpu_lookup_ambiguous():
    with pytest.raises(ValueError, match="ambiguous"):
        lookup_gpu("H100")


@pytest.mark.parametrize("text, num_bytes", [
    ("80GiB", 80 * GiB), ("81559MiB", 81559 * MiB), ("80GB", 80 * 10**9), ("81559", 81559 * MiB),
    ("1.5GiB", 3 * GiB // 2), ("80G", 80 * 10**9), ("1024B", 1024),
])
def test_parse_memory(text, num_bytes):
    assert parse_memory(text) == num_bytes
