"""The model's work between attention calls, compiled by inductor (CPU).

Eager, a decoder layer on CPU is some twenty small kernels besides its four matmuls: the
norms' squares, means and scales, RoPE's gathers, halves and products, SiLU, the products
and residual adds, each a pass over memory and a Python dispatch. Inductor fuses each run
of them into one C++ loop. What it compiles is the work between attention calls
(llama.py, `LlamaForCausalLM.forward`):

    first_attention_inputs  layer 0: input norm -> q/k/v projection -> RoPE     [compiled]
    Attention.attend        store_kv + paged attention over the step's plan    [eager]
    between_attentions      layer i: o_proj -> residual, norm -> gate/up -> SiLU * up ->
                            down, residual; layer i + 1: input norm -> q/k/v -> RoPE
                                                                                [compiled]
    ... attend, between_attentions, ... attend
    after_last_attention    the last layer's o_proj .. down, residual, the final norm
                                                                                [compiled]

One compiled call between two attentions, not one per side of each: every call costs
dynamo's guards and the graph's Python wrapper (~50 us), so the merge saved ~0.8 ms of a
29 ms batch-8 decode step on SmolLM2 (30 layers) and ~1.6 ms at batch 32.

Attention stays out of the graph because its inputs are the step's Python plan
(`kernels.cpu_attention.CpuAttentionPlan`) and its cache writes; the matmuls stay oneDNN's
packed ones through an opaque op (`cpu_linear.packed_linear`).

Bounded compilation: dynamo treats a module's parameters as inputs
(`inline_inbuilt_nn_modules`), so every pair of layers shares one `between_attentions` graph.
The token dimension is marked dynamic: one graph per region serves every step of
MIN_COMPILED_TOKENS tokens or more, and smaller steps (decodes of up to a hundred-odd
requests) run eagerly through fused C++ ops, where a compiled call costs more than it
saves: at most two graphs per region, model and dtype.
Inductor keeps what it built in its cache directory (`TORCHINDUCTOR_CACHE_DIR`, default
/tmp/torchinductor_<user>), so a later start with the same model shapes, dtype and torch
loads it instead of compiling.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

MAX_GRAPHS_PER_REGION = 64  # over all the models one process loads
# Steps of fewer tokens run `few`, the same work as a handful of fused C++ ops
# (llama.py, kernels/cpu_layer_ops.cpp): below this, inductor's kernels save less than a
# compiled call costs (dynamo's guards, the AOT wrapper, a parallel region per fused loop).
# SmolLM2 on 2 cores, a forward of n tokens, compiled against `few` (ms; 3 runs each):
#   float32   n=32 32.1-32.3 vs 31.0-31.3, 64 50.3-51.4 vs 50.2-51.0, 128 83-86 vs 84-88,
#             256 151-156 vs 154-163, 2048 1529-1564 vs 1632-1731
#   bfloat16  n=32 20.1-20.5 vs 18.6-18.9, 64 30.6-31.2 vs 29.7-29.9, 128 49.3-49.8 vs
#             48.4-51.5, 256 89-92 vs 89-92, 512 177-186 vs 187-190
# and engine decode steps of 16 / 32 requests took 27-29 / 43-45 ms against 29-31 / 44-46
# (float32) with `few` from 8 tokens up to 128 rather than compiled.
MIN_COMPILED_TOKENS = 128
# Without the C++ ops (`few` is the regions op by op) the compiled graphs pay off sooner: a
# one-sequence decode took 20.7-21.5 ms per token compiled against 20.3 eager, while 64
# requests ran 8% faster compiled.
MIN_COMPILED_TOKENS_EAGER = 8
_forced = 0  # > 0: every call compiled (ModelRunner.compile_now's warm-up, `always_compiled`)


class _Region:
    """One compiled function, shared by all layers; marks the token dimension dynamic.

    Its arguments are modules (layers, the final norm), then tensors whose first dimension
    is the step's tokens. A failure to compile (a C++ compiler error, say) must not fail
    requests: the region then runs eagerly, for good, with a warning. An error that eager
    raises too is the input's, not the compiler's: it propagates and the region stays
    compiled.
    """

    def __init__(self, fn, few=None) -> None:
        self.eager = fn
        # Steps under MIN_COMPILED_TOKENS: `few` (the same computation through fused C++ ops)
        # when given; else fn op by op, under MIN_COMPILED_TOKENS_EAGER.
        self.few = few or fn
        self.has_few = few is not None
        self.compiled = torch.compile(fn, fullgraph=True, dynamic=False)
        self.is_broken = False

    def __call__(self, *args):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        threshold = MIN_COMPILED_TOKENS if self.has_few else MIN_COMPILED_TOKENS_EAGER
        if tensors[0].shape[0] < threshold and not _forced:
            return self.few(*args)
        if self.is_broken:
            return self.eager(*args)
        # Dynamic in the token count from the first call, so no count of tokens past the
        # first two compiles again.
        for t in tensors:
            torch._dynamo.maybe_mark_dynamic(t, 0)
        try:
            return self.compiled(*args)
        except torch._dynamo.exc.TorchDynamoException as exc:
            result = self.eager(*args)
            self.is_broken = True
            logger.warning("compiling %s failed, it runs eagerly from now on: %s",
                           self.eager.__qualname__, str(exc).splitlines()[0][:500])
            return result


@contextlib.contextmanager
def always_compiled():
    """Within it, every region call of any model takes the compiled graph, whatever the
    token count (ModelRunner.compile_now: the graph is built on a short dummy step)."""
    global _forced
    _forced += 1
    try:
        yield
    finally:
        _forced -= 1


@dataclass(frozen=True)
class Regions:
    """What a compiled forward calls around its attentions (LlamaForCausalLM.forward)."""

    first: _Region  # layer 0's q, k, v
    between: _Region  # layer i's output and layer i + 1's q, k, v
    last: _Region  # the last layer's output, normed

    def __iter__(self):
        return iter((self.first, self.between, self.last))


def compile_model(model) -> None:
    """Route the model's work between attention calls through compiled regions (in place).
    Compilation itself happens on the first forward of each token-count class
    (`ModelRunner.compile_now` runs both at start-up)."""
    from brim.kernels.cpu_decode import layer_ops
    from brim.runtime.models import llama

    _keep_inductor_probes_importable()
    # Each model shape and dtype adds up to two graphs per region to the same code objects.
    # A server loads one model; a process that loads several (the tests) would pass dynamo's
    # default of 8 and run the models after that eagerly.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                               MAX_GRAPHS_PER_REGION)
    # Dynamo keeps graphs per code object: every model of the same shapes and dtype shares
    # them, whichever Regions calls them.
    ops = layer_ops()
    few = ((functools.partial(llama.first_attention_inputs_few, ops),
            functools.partial(llama.between_attentions_few, ops),
            functools.partial(llama.after_last_attention_few, ops))
           if ops is not None else (None, None, None))
    model.compiled_regions = Regions(_Region(llama.first_attention_inputs, few[0]),
                                     _Region(llama.between_attentions, few[1]),
                                     _Region(llama.after_last_attention, few[2]))


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
