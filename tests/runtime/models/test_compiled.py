"""The compiled model (models/compiled.py) against the same model run op by op: the same
logits step by step, a bounded number of graphs whatever the step's token count, and the
matmuls still oneDNN's. Greedy parity with transformers through the compiled path:
test_llama.py (tiny models of each family) and tests/runtime/engine/test_parity.py."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.eval_frame import _debug_get_cache_entry_list

from brim.runtime import LLM
from brim.runtime.engine.model_runner import StepInputs
from brim.runtime.models import llama
from tests.runtime.models.test_llama import _tiny_checkpoint

BLOCK_SIZE = 16


def _steps() -> list[StepInputs]:
    """Three steps of two sequences in one cache: prefills of 21 and 3 tokens (the first
    over two blocks), a decode of one of them (a single token), a decode of both."""
    table_a, table_b = [1, 2], [3, 0]

    def slots(table, positions):
        return [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in positions]

    ids_a, ids_b = list(range(100, 121)), [7, 8, 9]
    prefill = StepInputs(ids_a + ids_b, list(range(21)) + list(range(3)),
                         slots(table_a, range(21)) + slots(table_b, range(3)),
                         [table_a, table_b], [0, 21, 24], [21, 3], [20, 23])
    one = StepInputs([5], [21], slots(table_a, [21]), [table_a], [0, 1], [22], [0])
    both = StepInputs([6, 11], [22, 3], slots(table_a, [22]) + slots(table_b, [3]),
                      [table_a, table_b], [0, 1, 2], [23, 4], [0, 1])
    return [prefill, one, both]


REGION_FUNCTIONS = (llama.first_attention_inputs, llama.between_attentions,
                    llama.after_last_attention)


@pytest.fixture
def small_steps_compiled(monkeypatch):
    """The steps above are a few tokens each: run them through the compiled graphs (as
    steps of MIN_COMPILED_TOKENS and more are), not the fused C++ ops."""
    from brim.runtime.models import compiled

    monkeypatch.setattr(compiled, "MIN_COMPILED_TOKENS", 2)


def _cache_entries() -> int:
    return sum(len(_debug_get_cache_entry_list(fn.__code__)) for fn in REGION_FUNCTIONS)


@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-4), ("bfloat16", 0.1)])
def test_compiled_logits_match_eager_step_by_step(tmp_path, dtype, tolerance,
                                                  small_steps_compiled):
    path, _ = _tiny_checkpoint(tmp_path, "qwen2")  # q/k/v biases, tied embeddings
    args = dict(dtype=dtype, device="cpu", block_size=BLOCK_SIZE, num_gpu_blocks=8,
                max_model_len=128)
    eager = LLM(str(path), enforce_eager=True, **args).engine.runner
    entries_before = _cache_entries()
    compiled = LLM(str(path), **args).engine.runner
    assert compiled.config.compiles_model and not eager.config.compiles_model
    compiled_at_start = _cache_entries()
    for step in _steps():
        want, got = eager.forward(step), compiled.forward(step)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.allclose(got.float(), want.float(), rtol=tolerance, atol=tolerance), (
            (got.float() - want.float()).abs().max())
        assert torch.equal(got.argmax(-1), want.argmax(-1)) or dtype != "float32"
    # Really compiled, not fallen back to eager: pytest has the checkout's root on sys.path,
    # where brim's `operator` package once broke inductor's CPU probe and every graph build.
    assert not any(region.is_broken for region in compiled.model.compiled_regions)
    # Both token-count classes compiled once each for the three regions, the one between
    # attentions shared by the 2 pairs of layers (none at all when an earlier test compiled
    # this shape and dtype already), and at start-up: the steps (2 and more tokens, and 1)
    # compiled nothing.
    assert _cache_entries() - entries_before <= 6
    assert _cache_entries() == compiled_at_start
    for step in _steps():  # and nothing compiles again
        compiled.forward(step)
    assert _cache_entries() - entries_before <= 6


def test_compiled_layers_call_the_packed_onednn_matmuls(tmp_path, small_steps_compiled):
    path, _ = _tiny_checkpoint(tmp_path, "llama")
    runner = LLM(str(path), dtype="float32", device="cpu", block_size=BLOCK_SIZE,
                 num_gpu_blocks=8, max_model_len=128).engine.runner
    step = _steps()[0]
    runner.forward(step)  # compiles
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        runner.forward(step)
    names = [e.name for e in prof.events()]
    # 3 layers x (q/k/v, o, gate/up, down) inside the compiled regions, through the C++ op
    # (kernels/cpu_layer_ops.cpp); the LM head eager.
    assert names.count("brim_cpu::packed_linear") == 3 * 4
    assert names.count("mkldnn::_linear_pointwise") == 3 * 4 + 1


def test_steps_under_the_threshold_take_the_fused_ops_and_longer_ones_the_graphs(tmp_path):
    """The default threshold: a decode step of a few rows runs the fused C++ ops, a step of
    MIN_COMPILED_TOKENS tokens the compiled graphs; both give the eager model's logits."""
    from brim.runtime.models import compiled

    path, _ = _tiny_checkpoint(tmp_path, "llama")
    n = compiled.MIN_COMPILED_TOKENS
    num_blocks = -(-n // BLOCK_SIZE) + 4
    args = dict(dtype="float32", device="cpu", block_size=BLOCK_SIZE,
                num_gpu_blocks=num_blocks, max_model_len=num_blocks * BLOCK_SIZE)
    eager = LLM(str(path), enforce_eager=True, **args).engine.runner
    runner = LLM(str(path), **args).engine.runner
    table = list(range(-(-(n + 1) // BLOCK_SIZE)))
    long = StepInputs(list(range(3, n + 3)), list(range(n)), list(range(n)), [table], [0, n],
                      [n], [n - 1])
    short = _steps()[2]  # two decodes
    for step, fused in ((short, True), (long, False), (short, True)):
        eager.forward(step)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            got = runner.forward(step)
        names = [e.name for e in prof.events()]
        assert ("brim_cpu::add_rms_norm_" in names) == fused, names
        assert (names.count("brim_cpu::packed_linear") == 3 * 4) != fused
        # The eager model's cache got the same KV from its own forward above.
        want = eager.forward(step)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    assert not any(region.is_broken for region in runner.model.compiled_regions)


def test_a_region_that_fails_to_compile_runs_eagerly(tmp_path, caplog, small_steps_compiled):
    path, _ = _tiny_checkpoint(tmp_path, "llama")
    args = dict(dtype="float32", device="cpu", block_size=BLOCK_SIZE, num_gpu_blocks=8,
                max_model_len=128)
    eager = LLM(str(path), enforce_eager=True, **args).engine.runner
    runner = LLM(str(path), **args).engine.runner
    region = runner.model.compiled_regions.between

    def broken(*args):
        raise torch._dynamo.exc.InternalTorchDynamoError("the C++ compiler is missing")

    region.compiled = broken
    for step in _steps():
        assert torch.allclose(runner.forward(step), eager.forward(step), atol=1e-4, rtol=1e-4)
    assert region.is_broken and "runs eagerly from now on" in caplog.text
    assert not runner.model.compiled_regions.first.is_broken


def test_inductor_probes_do_not_import_brims_operator_package(monkeypatch):
    """Inductor's CPU-ISA probe runs a child Python on this process's sys.path; with the
    checkout's root on it (pytest, `python -m` from the root), brim's `operator` package
    would shadow the standard library's there, and the probe (so every graph) would fail."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from brim.runtime.models import compiled

    root = str(Path(compiled.__file__).resolve().parents[2])  # brim's own folder
    monkeypatch.delenv("TORCH_CUSTOM_PYTHONPATH", raising=False)
    monkeypatch.setattr(sys, "path", [root, *sys.path])
    probe = [sys.executable, "-c", "import operator; operator.add"]

    def child_imports(pythonpath: str) -> bool:
        env = {**os.environ, "PYTHONPATH": pythonpath}
        return subprocess.run(probe, env=env, cwd="/", capture_output=True).returncode == 0

    assert not child_imports(os.pathsep.join(sys.path))  # what inductor would pass
    compiled._keep_inductor_probes_importable()
    assert child_imports(os.environ["TORCH_CUSTOM_PYTHONPATH"])


def test_without_the_cpp_library_the_torch_paths_give_the_same_tokens(tmp_path):
    """BRIM_CPU_DECODE_KERNEL=0 (or no compiler): attention through SDPA, the compiled
    regions' matmuls through the Python custom op, sampling through torch's inverse CDF.
    Greedy and seeded tokens equal the C++ paths' (a fresh process: the switch is read once)."""
    import json
    import os
    import subprocess
    import sys

    from brim.runtime import SamplingParams

    path, _ = _tiny_checkpoint(tmp_path, "llama")
    prompts = [list(range(3, 40)), [5, 6, 7]]
    script = f"""
import json
from brim.runtime import LLM, SamplingParams
from brim.kernels.cpu_decode import decode_attention_op
assert decode_attention_op() is None
llm = LLM({str(path)!r}, dtype="float32", device="cpu", block_size={BLOCK_SIZE})
greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
seeded = SamplingParams(temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
outs = llm.generate({prompts!r}, greedy, use_tqdm=False) + llm.generate({prompts!r}, seeded, use_tqdm=False)
print(json.dumps([list(o.outputs[0].token_ids) for o in outs]))
"""
    env = {**os.environ, "BRIM_CPU_DECODE_KERNEL": "0"}
    done = subprocess.run([sys.executable, "-P", "-c", script], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    torch_paths = json.loads(done.stdout.strip().splitlines()[-1])
    llm = LLM(str(path), dtype="float32", device="cpu", block_size=BLOCK_SIZE)
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    seeded = SamplingParams(temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    outs = (llm.generate(prompts, greedy, use_tqdm=False)
            + llm.generate(prompts, seeded, use_tqdm=False))
    assert [list(o.outputs[0].token_ids) for o in outs] == torch_paths
