"""Every kernel variant compiles for sm_80 and sm_90 without a GPU.

Stage reached: the whole of `triton.compile` for `GPUTarget("cuda", arch, 32)` —
Triton IR -> TritonGPU IR -> LLVM IR -> PTX -> cubin, the last step by the ptxas that
ships in Triton's wheel (triton/backends/nvidia/bin). No CUDA driver is needed for any of
it; only loading the cubin onto a device is left for a GPU. This catches lowering errors
(layouts, dot shapes, unsupported casts) and shared memory over the architecture's limit.

The arguments compiled are those the real launchers plan (see compile_variants.py), in a
subprocess because this process builds the kernels for the interpreter. The default run
compiles every kernel for every dtype at head_dim 128 and every head_dim in bfloat16; the
whole dtype x head_dim matrix plus GQA groups and block sizes is marked slow (minutes cold;
Triton's on-disk cache makes reruns fast).
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).with_name("compile_variants.py")
MAX_SHARED_BYTES = {80: 166912, 90: 232448}  # opt-in shared memory per block: A100, H100


def start(arch: int, full: bool) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    command = [sys.executable, str(SCRIPT), str(arch)] + (["--full"] if full else [])
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def finish(process: subprocess.Popen) -> list[dict]:
    stdout, stderr = process.communicate(timeout=1800)
    assert process.returncode == 0, stderr[-4000:]
    return [json.loads(line) for line in stdout.splitlines()]


@pytest.fixture(scope="module")
def quick_compiles():
    """Both architectures compile at once, one process each (CI has two cores)."""
    processes = {arch: start(arch, full=False) for arch in (80, 90)}
    yield processes
    for process in processes.values():
        if process.poll() is None:
            process.kill()


def check(records: list[dict], arch: int) -> None:
    assert records, "no variant compiled"
    failures = [f"{r['variant']} {r['kernel']}: {r['error']}" for r in records if "error" in r]
    assert not failures, "\n".join(failures)
    for record in records:
        assert record["stages"][-2:] == ["ptx", "cubin"] and record["cubin_bytes"] > 0, record
        assert record["shared"] <= MAX_SHARED_BYTES[arch], record
    kernels = {r["kernel"] for r in records}
    assert kernels == {"_decode_kernel", "_reduce_splits_kernel", "_prefill_kernel",
                       "_store_kv_kernel", "_quant_matmul_kernel"}


@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile(quick_compiles, arch):
    check(finish(quick_compiles[arch]), arch)


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_every_variant_compiles(arch):
    check(finish(start(arch, full=True)), arch)
