"""The model's work between attention calls, compiled by inductor (CPU).

Eager, a decoder layer on CPU is some twenty small kernels besides its four matmuls: the
norms' squares, means and scales, RoPE's gathers, halves and products, SiLU, the products
and residual adds, each a pass over memory and a Python dispatch. Inductor fuses each run
of them into one C++ loop. What it compiles, per decoder layer (`DecoderLayer`):

    attention_inputs   input norm -> q/k/v projection -> RoPE                [compiled]
    Attention.attend   store_kv + paged attention over the step's plan      [eager]
    attention_outputs  o_proj -> residual, norm -> gate/up -> SiLU * up -> down, residual
                                                                              [compiled]

Attention stays out of the graph because its inputs are the step's Python plan
(`kernels.cpu_attention.CpuAttentionPlan`) and its cache writes; the matmuls stay oneDNN's
packed ones through an opaque op (`cpu_linear.packed_linear`).

Bounded compilation: the two regions are methods of `DecoderLayer`, and dynamo treats a
module's parameters as inputs (`inline_inbuilt_nn_modules`), so all layers share one compiled
graph per region. The token dimension is marked dynamic: one graph serves every step of
MIN_COMPILED_TOKENS tokens or more, and smaller steps (a few decodes) run eagerly, where a
compiled call costs more than it saves: two graphs per model and dtype. Inductor keeps what
it built in its cache directory (`TORCHINDUCTOR_CACHE_DIR`, default /tmp/torchinductor_<user>),
so a later start with the same model shapes, dtype and torch loads it instead of compiling.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

MAX_GRAPHS_PER_REGION = 64  # over all the models one process loads
# Steps of fewer tokens run the regions eagerly: for a handful of rows the fused kernels save
# less than a compiled call costs (dynamo's guards, the AOT wrapper), twice per layer. Measured
# on SmolLM2 (float32, 2 cores): a one-sequence decode took 22.8 ms per token compiled against
# 21.8 eager, while 64 requests ran 8% faster compiled (347 against 321 tok/s).
MIN_COMPILED_TOKENS = 8


class _Region:
    """One compiled method, shared by all layers; marks the token dimension dynamic.

    A failure to compile (a C++ compiler error, say) must not fail requests: the region
    then runs eagerly, for good, with a warning. An error that eager raises too is the
    input's, not the compiler's: it propagates and the region stays compiled.
    """

    def __init__(self, fn) -> None:
        self.eager = fn
        self.compiled = torch.compile(fn, fullgraph=True, dynamic=False)
        self.is_broken = False

    def __call__(self, layer, a: torch.Tensor, b: torch.Tensor):
        if self.is_broken or a.shape[0] < MIN_COMPILED_TOKENS:
            return self.eager(layer, a, b)
        # a, b: [T, ...] (positions and x, or x and attn): dynamic in T from the first call,
        # so no count of tokens past the first two compiles again.
        torch._dynamo.maybe_mark_dynamic(a, 0)
        torch._dynamo.maybe_mark_dynamic(b, 0)
        try:
            return self.compiled(layer, a, b)
        except torch._dynamo.exc.TorchDynamoException as exc:
            result = self.eager(layer, a, b)
            self.is_broken = True
            logger.warning("compiling %s failed, it runs eagerly from now on: %s",
                           self.eager.__qualname__, str(exc).splitlines()[0][:500])
            return result


def compile_model(model) -> None:
    """Route every decoder layer's parts around attention through compiled regions (in
    place). Compilation itself happens on the first forward of each token-count class
    (`ModelRunner.compile_now` runs both at start-up)."""
    from brim.runtime.models.llama import DecoderLayer

    _keep_inductor_probes_importable()
    # Each model shape and dtype adds up to two graphs per region to the same code objects.
    # A server loads one model; a process that loads several (the tests) would pass dynamo's
    # default of 8 and run the models after that eagerly.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                               MAX_GRAPHS_PER_REGION)
    attention_inputs = _Region(DecoderLayer.attention_inputs)
    attention_outputs = _Region(DecoderLayer.attention_outputs)
    for layer in model.layers:
        # Instance attributes shadow the methods; `.func` is the shared region.
        layer.attention_inputs = functools.partial(attention_inputs, layer)
        layer.attention_outputs = functools.partial(attention_outputs, layer)


def inductor_cache_dir() -> str:
    """Where inductor keeps what it compiled (TORCHINDUCTOR_CACHE_DIR or its default)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return cache_dir()


def _keep_inductor_probes_importable() -> None:
    """Inductor checks which vector ISA the CPU has by loading a test library in a child
    Python whose PYTHONPATH is this process's sys.path. When brim's own folder is on sys.path
    (pytest or `python -m` from a checkout's root), its `operator` package shadows the
    standard library's in that child, the check fails, and every graph then fails to build
    (`at::vec` undeclared). TORCH_CUSTOM_PYTHONPATH, inductor's override, gets sys.path
    without that folder. A value the user set is left alone."""
    if "TORCH_CUSTOM_PYTHONPATH" in os.environ:
        return
    own = Path(__file__).resolve().parents[2]  # the brim package's folder
    kept = [p for p in sys.path if Path(p or ".").resolve() != own]  # "": the cwd
    if len(kept) != len(sys.path):
        os.environ["TORCH_CUSTOM_PYTHONPATH"] = os.pathsep.join(kept)
