"""The C++ decode-attention kernel for CPU (cpu_decode_attention.cpp), built on first use.

Decode attention through SDPA needs each sequence's context gathered out of the paged cache
into a padded copy, per layer and step: on SmolLM2's 64-sequence decode steps that gather and
SDPA over the padding were ~3 s of a 14 s run (docs/benchmarks.md). The kernel reads the
blocks where they lie, with an online softmax, all decoding sequences in one call, parallel
over (sequence, KV head).

It is compiled with the C++ compiler torch.compile already needs (g++), in ~7 s, into torch's
extension folder (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions; one build per CPU
type), where later processes load it in milliseconds; a changed source builds again. If it
cannot be built, the SDPA path runs (with a warning) and nothing else changes.
BRIM_CPU_DECODE_KERNEL=0 turns it off (the SDPA path).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_decode_attention.cpp")
# The same library: a decoder layer's pointwise parts as single ops (cpu_layer_ops.cpp).
LAYER_OPS_SOURCE = Path(__file__).with_name("cpu_layer_ops.cpp")
SAMPLING_SOURCE = Path(__file__).with_name("cpu_sampling.cpp")
PREFILL_SOURCE = Path(__file__).with_name("cpu_prefill_attention.cpp")
SOURCES = [SOURCE, LAYER_OPS_SOURCE, SAMPLING_SOURCE, PREFILL_SOURCE]  # one library: brim_cpu
# -ffast-math: exp over a block's scores vectorizes (glibc's libmvec); the kernel keeps its
# values finite for it (kNoScore). -march=native: built on, and for, the machine it runs on.
CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]
ENV_SWITCH = "BRIM_CPU_DECODE_KERNEL"


@functools.lru_cache(maxsize=None)
def decode_attention_op():
    """torch.ops.brim_cpu.decode_attention, built or loaded once per process; None when
    turned off or when it cannot be built (logged)."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    started = time.perf_counter()
    try:
        from torch.utils.cpp_extension import load

        load(name=f"brim_cpu_decode_attention_{_cpu_tag()}",
             sources=[str(path) for path in SOURCES], extra_cflags=CFLAGS,
             extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
        op = torch.ops.brim_cpu.decode_attention
        _register_fakes()
    except Exception as exc:  # no compiler, a broken toolchain: SDPA still works
        logger.warning("the C++ decode-attention kernel could not be built, decode attention "
                       "runs through SDPA over gathered copies (slower): %s",
                       str(exc).strip().splitlines()[-1][:500] if str(exc).strip() else exc)
        return None
    logger.info("C++ decode-attention kernel ready in %.1f s", time.perf_counter() - started)
    return op


def _cpu_tag() -> str:
    """A short hash of this CPU's feature flags: the build is -march=native, and torch's
    extension cache keys on the source and flags only, so a home folder shared by machines
    with different CPUs would otherwise load code this CPU cannot run."""
    import hashlib

    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return hashlib.sha256(flags.encode()).hexdigest()[:10]


def store_kv_op():
    """torch.ops.brim_cpu.store_kv (built with the decode kernel, in the same library), or
    None where that is not built."""
    return None if decode_attention_op() is None else torch.ops.brim_cpu.store_kv


def layer_ops():
    """torch.ops.brim_cpu, where the fused layer ops live (cpu_layer_ops.cpp: add_rms_norm_,
    rms_norm, silu_mul, rope_), or None where the library is not built."""
    return None if decode_attention_op() is None else torch.ops.brim_cpu


def sample_op():
    """torch.ops.brim_cpu.sample_rows (cpu_sampling.cpp: one draw per row from softmax of
    float32 logits, given a uniform per row), or None where the library is not built."""
    return None if decode_attention_op() is None else torch.ops.brim_cpu.sample_rows


def prefill_attention_op():
    """torch.ops.brim_cpu.prefill_attention (cpu_prefill_attention.cpp: causal attention for
    prefill chunks, reading the paged cache in place; it returns False where it has no path
    for the inputs), or None where the library is not built."""
    return None if decode_attention_op() is None else torch.ops.brim_cpu.prefill_attention


def _register_fakes() -> None:
    """Shapes for the ops that run inside compiled regions (torch.compile traces them)."""
    def packed_linear(x, packed_weight, bias):
        # The packed weight's shape is the plain one, [out_features, in_features].
        return x.new_empty(*x.shape[:-1], packed_weight.shape[0])

    torch.library.register_fake("brim_cpu::packed_linear")(packed_linear)


def packed_linear_op():
    """torch.ops.brim_cpu.packed_linear (cpu_layer_ops.cpp: oneDNN's packed-weight matmul
    as a C++ op, for compiled regions), or None where the library is not built."""
    return None if decode_attention_op() is None else torch.ops.brim_cpu.packed_linear
