"""Common GPUs and their memory, for `brim plan --gpu` and the operator's fallback.

Names are NVIDIA GPU Feature Discovery's `nvidia.com/gpu.product` labels (the product name with
spaces turned into dashes); memory is MiB per GPU as `nvidia.com/gpu.memory` and nvidia-smi
report it. A node's own `nvidia.com/gpu.memory` label, when present, is better than this table.
"""

from __future__ import annotations

import re

MiB = 2**20

GPU_MEMORY_MIB = {
    "NVIDIA-B200": 183359,
    "NVIDIA-H200": 143771,
    "NVIDIA-H100-80GB-HBM3": 81559,
    "NVIDIA-H100-PCIe": 81559,
    "NVIDIA-H100-NVL": 95830,
    "NVIDIA-H20": 97871,
    "NVIDIA-A100-SXM4-80GB": 81920,
    "NVIDIA-A100-80GB-PCIe": 81920,
    "NVIDIA-A100-SXM4-40GB": 40960,
    "NVIDIA-A100-PCIE-40GB": 40960,
    "NVIDIA-L40S": 46068,
    "NVIDIA-L40": 46068,
    "NVIDIA-RTX-A6000": 49140,
    "NVIDIA-A10G": 23028,
    "NVIDIA-A10": 23028,
    "NVIDIA-L4": 23034,
    "NVIDIA-GeForce-RTX-4090": 24564,
    "Tesla-V100-SXM2-32GB": 32768,
    "Tesla-V100-SXM2-16GB": 16384,
    "Tesla-T4": 15360,
}

_VENDOR_PREFIXES = ("nvidia-", "tesla-")


def _words(name: str) -> list[str]:
    name = name.strip().lower().replace(" ", "-").replace("_", "-")
    for prefix in _VENDOR_PREFIXES:
        name = name.removeprefix(prefix)
    return [w for w in name.split("-") if w]


def lookup_gpu(name: str) -> tuple[str, int]:
    """(product label, memory in bytes) for a product name or a short form of it.

    Case-insensitive; the vendor prefix may be left out, and a short form matches a product
    whose name holds all its dash-separated words ("H100-80GB" -> NVIDIA-H100-80GB-HBM3).
    A short form naming several products is accepted when they have the same memory.
    """
    words = _words(name)
    for product, mib in GPU_MEMORY_MIB.items():
        if _words(product) == words:
            return product, mib * MiB
    matches = [(product, mib) for product, mib in GPU_MEMORY_MIB.items()
               if words and all(w in _words(product) for w in words)]
    if matches and len({mib for _, mib in matches}) == 1:
        return matches[0][0], matches[0][1] * MiB
    if matches:
        listed = ", ".join(f"{p} ({mib} MiB)" for p, mib in matches)
        raise ValueError(f"GPU {name!r} is ambiguous: it names {listed}; give the full product "
                         "name or --gpu-memory")
    raise ValueError(f"unknown GPU {name!r}; known: {', '.join(GPU_MEMORY_MIB)}. "
                     "Pass --gpu-memory (e.g. 80GiB) instead")


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": MiB, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_memory(value: str | int) -> int:
    """Bytes from '80GiB', '81559MiB', '80GB' (decimal) or a bare number of MiB (GFD's unit)."""
    if isinstance(value, int):
        return value * MiB
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f"cannot read {value!r} as a memory size; write e.g. 80GiB, 81559MiB "
                         "or 80GB (a bare number is MiB, like nvidia.com/gpu.memory)")
    number, unit = match.groups()
    unit = (unit or "").lower().removesuffix("b") if (unit or "").lower() != "b" else "b"
    return int(float(number) * _UNITS[unit])
