"""paged_attention: the Triton kernels (interpreted on CPU, compiled on a GPU) against the torch reference.

Every run draws fresh inputs (the seed is in the failure message). Cache slots that no
sequence owns, and block-table entries past a sequence's end, point at NaN, and the output
is pre-filled with NaN: reading stale cache or leaving an element unwritten fails.
"""

import math

import pytest
import torch

from brim.kernels import paged_attention, paged_attention_ref
from brim.kernels.paged_attention_triton import paged_attention_triton

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}  # relative spacing, upper bound
NAN = float("nan")


def make_batch(seqs, *, num_kv_heads, group, head_dim, block_size, dtype,
               contiguous_q=False):
    """A paged batch; seqs lists (seq_len, query_len): the queries are the last positions."""
    num_seqs = len(seqs)
    blocks_per_seq = [-(-seq_len // block_size) for seq_len, _ in seqs]
    num_blocks = sum(blocks_per_seq) + 2  # two spare blocks, never owned: all NaN
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, NAN, dtype=dtype)
    v_cache = torch.full(shape, NAN, dtype=dtype)
    physical = torch.randperm(num_blocks)  # shuffled physical block ids
    spare = int(physical[-1])
    block_tables = torch.full((num_seqs, max(blocks_per_seq) + 1), spare, dtype=torch.int32)
    next_block = 0
    for i, (seq_len, _) in enumerate(seqs):
        ids = physical[next_block:next_block + blocks_per_seq[i]]
        next_block += blocks_per_seq[i]
        block_tables[i, :len(ids)] = ids.int()
        for pos in range(seq_len):  # only the context itself holds numbers
            block, offset = int(ids[pos // block_size]), pos % block_size
            k_cache[block, offset] = torch.randn(num_kv_heads, head_dim).to(dtype)
            v_cache[block, offset] = torch.randn(num_kv_heads, head_dim).to(dtype)

    query_lens = torch.tensor([query_len for _, query_len in seqs])
    query_start_loc = torch.zeros(num_seqs + 1, dtype=torch.int32)
    query_start_loc[1:] = query_lens.cumsum(0)
    num_tokens, num_heads = int(query_start_loc[-1]), num_kv_heads * group
    if contiguous_q:
        q = torch.randn(num_tokens, num_heads, head_dim).to(dtype)
    else:  # [num_tokens, num_heads, head_dim] view of a head-major buffer
        q = torch.randn(num_heads, num_tokens, head_dim).to(dtype).transpose(0, 1)
    seq_lens = torch.tensor([seq_len for seq_len, _ in seqs], dtype=torch.int32)
    return q, k_cache, v_cache, block_tables, query_start_loc, seq_lens


def check(seed, seqs, *, num_kv_heads=2, group=3, head_dim=64, block_size=16,
          dtype=torch.float32, sliding_window=None, contiguous_q=False, num_splits=None):
    batch = make_batch(seqs, num_kv_heads=num_kv_heads, group=group, head_dim=head_dim,
                       block_size=block_size, dtype=dtype, contiguous_q=contiguous_q)
    scale = 1 / math.sqrt(head_dim)
    expected = paged_attention_ref(*batch, scale, sliding_window=sliding_window)
    out = torch.full(batch[0].shape, NAN, dtype=dtype)  # poisoned: unwritten stays NaN

    result = paged_attention_triton(*batch, scale, sliding_window=sliding_window, out=out,
                                    num_splits=num_splits)

    assert result is out
    assert torch.isfinite(out).all(), f"seed {seed}: unwritten or NaN output elements"
    error = (out.float() - expected.float()).abs()
    allowed = torch.full_like(error, TOLERANCE[dtype])
    if out.is_cuda and dtype != torch.float32:
        # Compiled, the kernels multiply softmax weights by V in 16 bits on tensor cores (as
        # every flash-attention kernel does); the interpreter upcasts. Either output may then
        # round to the neighbouring 16-bit value: one ulp, 2^-7 |x| in bfloat16, which is
        # above 1e-2 wherever |x| >= 2. Allow that ulp on the GPU.
        allowed += expected.float().abs() * ULP[dtype]
    worst = int((error - allowed).argmax())
    assert (error <= allowed).all(), (
        f"seed {seed}: error {error.flatten()[worst].item()} > allowed "
        f"{allowed.flatten()[worst].item()} at |x| {expected.float().abs().flatten()[worst]}")


def decode_seqs(block_size):
    """Contexts 1, block_size - 1, block_size, block_size + 1 and a few hundred."""
    return [(1, 1), (block_size - 1, 1), (block_size, 1), (block_size + 1, 1), (300, 1)]


def prefill_seqs(block_size):
    return [(block_size - 1, block_size - 1), (1, 1), (block_size, block_size),
            (block_size + 1, block_size + 1)]


def mixed_seqs(block_size):
    """Decodes, whole prompts, a chunked prefill and a prefix-cache hit in one batch."""
    return [(1, 1), (block_size + 1, 1), (block_size, block_size), (300, 1),
            (block_size + 1, 5), (40, 7), (block_size - 1, block_size - 1)]


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", [decode_seqs, prefill_seqs, mixed_seqs],
                         ids=lambda f: f.__name__.removesuffix("_seqs"))
def test_matches_reference(seed, kind, dtype):
    check(seed, kind(16), dtype=dtype)


def test_long_prefill(seed):
    check(seed, [(230, 230), (20, 20)], group=2, dtype=torch.bfloat16)


@pytest.mark.parametrize("num_kv_heads,group", [(2, 1), (2, 3), (1, 8), (1, 4)],
                         ids=["mha", "gqa3", "gqa8", "mqa"])
@pytest.mark.parametrize("kind", [decode_seqs, mixed_seqs],
                         ids=lambda f: f.__name__.removesuffix("_seqs"))
def test_grouped_query_attention(seed, kind, num_kv_heads, group):
    check(seed, kind(16), num_kv_heads=num_kv_heads, group=group, head_dim=80,
          contiguous_q=True)


@pytest.mark.parametrize("sliding_window", [1, 5, 17])
@pytest.mark.parametrize("kind", [decode_seqs, mixed_seqs],
                         ids=lambda f: f.__name__.removesuffix("_seqs"))
def test_sliding_window(seed, kind, sliding_window):
    check(seed, kind(16), sliding_window=sliding_window, dtype=torch.float16)


@pytest.mark.parametrize("sliding_window", [None, 48, 100])
def test_long_prefill_tiles_inside_and_at_the_edges(seed, sliding_window):
    """Query blocks whose context has unmasked tiles between a masked window edge and a
    masked diagonal: whole prompts, a chunk after a cached prefix, and a decode."""
    check(seed, [(300, 120), (230, 230), (97, 1), (64, 33)], group=2,
          sliding_window=sliding_window, dtype=torch.bfloat16)


@pytest.mark.parametrize("block_size", [8, 32])
@pytest.mark.parametrize("kind", [decode_seqs, mixed_seqs],
                         ids=lambda f: f.__name__.removesuffix("_seqs"))
def test_block_sizes(seed, kind, block_size):
    check(seed, kind(block_size), block_size=block_size, head_dim=80, dtype=torch.bfloat16)


@pytest.mark.parametrize("num_splits", [1, 3, 7])
@pytest.mark.parametrize("sliding_window", [None, 40])
def test_decode_split_k(seed, num_splits, sliding_window):
    """Split-K partitions, including empty ones (7 splits of short contexts)."""
    check(seed, [(1, 1), (33, 1), (130, 1)], group=4, sliding_window=sliding_window,
          num_splits=num_splits)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU dispatch: CUDA tensors always "
                    "take the Triton path (test_matches_reference covers it)")
def test_default_backend_is_triton_under_interpreter(seed, monkeypatch):
    batch = make_batch(mixed_seqs(16), num_kv_heads=1, group=2, head_dim=64, block_size=16,
                       dtype=torch.float32)
    calls = []
    import brim.kernels.paged_attention_triton as launcher
    original = launcher.paged_attention_triton
    monkeypatch.setattr(launcher, "paged_attention_triton",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    paged_attention(*batch, 0.125)
    assert calls == [1]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    out = torch.full(batch[0].shape, NAN)
    paged_attention(*batch, 0.125, out=out)  # torch reference on CPU
    assert calls == [1]
    assert torch.equal(out, paged_attention_ref(*batch, 0.125))


def test_unknown_backend_is_refused():
    q = torch.zeros(1, 1, 64)
    with pytest.raises(ValueError, match="backend must be one of"):
        paged_attention(q, q, q, q, q, q, 1.0, backend="cuda")


def test_entry_points_stay_functions_after_triton_use(seed):
    """Submodules must not share the entry points' names: importing a submodule binds it
    as an attribute of brim.kernels, which would shadow the function of the same name."""
    import brim.kernels

    batch = make_batch([(3, 1)], num_kv_heads=1, group=2, head_dim=64, block_size=16,
                       dtype=torch.float32)
    brim.kernels.paged_attention(*batch, 0.125, backend="triton")
    brim.kernels.store_kv(batch[1][0, :1], batch[2][0, :1], batch[1], batch[2],
                          torch.tensor([0]), backend="triton")
    assert callable(brim.kernels.paged_attention) and callable(brim.kernels.store_kv)
    assert brim.kernels.paged_attention.__module__ == "brim.kernels"
    assert brim.kernels.store_kv.__module__ == "brim.kernels"


CPU_CASES = {
    "decode": [(37, 1), (5, 1), (130, 1), (64, 1), (200, 1), (16, 1)],
    "prefill": [(40, 40), (77, 77), (3, 3)],
    "mixed": [(90, 1), (33, 33), (120, 20), (17, 1), (250, 1), (48, 5)],
}


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("kind", sorted(CPU_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sliding_window", [None, 24])
@pytest.mark.parametrize("in_place", [True, False], ids=["cpp-decode", "sdpa-decode"])
def test_cpu_plan_equals_the_reference(seed, kind, dtype, sliding_window, in_place):
    """The CPU path computes the reference's operations, with the step's bookkeeping hoisted
    (stale slots and padding hold finite garbage); its decodes either through SDPA over
    gathered copies or through the C++ kernel that reads the cache in place."""
    from brim.kernels.cpu_attention import CpuAttentionPlan, paged_attention_cpu
    from brim.kernels.cpu_decode import decode_attention_op

    assert decode_attention_op() is not None, "the C++ decode kernel did not build"

    torch.manual_seed(seed)
    q, k_cache, v_cache, block_tables, query_start_loc, seq_lens = make_batch(
        CPU_CASES[kind], num_kv_heads=2, group=3, head_dim=32, block_size=16, dtype=dtype)
    # Slots no sequence owns hold stale (finite) values, as in the engine, whose CPU cache
    # starts zeroed and is written through store_kv_cpu.
    for cache in (k_cache, v_cache):
        stale = cache.isnan()
        cache[stale] = (torch.randn(int(stale.sum())) * 50).to(dtype)
    plan = CpuAttentionPlan.build(block_tables, query_start_loc, seq_lens, 16, in_place=in_place)
    assert (plan.decodes is not None) == in_place
    scale = 1 / math.sqrt(32)
    for window in (sliding_window, None, sliding_window):  # masks cached per window
        want = paged_attention_ref(q, k_cache, v_cache, block_tables, query_start_loc,
                                   seq_lens, scale, sliding_window=window)
        got = paged_attention_cpu(q, k_cache, v_cache, plan, scale, sliding_window=window)
        assert not got.isnan().any()
        # float32: decodes are the same operations, bit for bit; prefills go through SDPA's
        # flash kernel (4-D inputs) where the reference's 3-D ones take the math path, equal
        # to float32 rounding. 16-bit: decodes stay in 16 bits with the GQA group as query
        # rows (SDPA accumulates in float32), within the dtype's tolerance. The C++ kernel
        # (online softmax, float32 accumulation): float32 to rounding, 16-bit to tolerance.
        if dtype == torch.float32 and in_place:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        elif dtype == torch.float32:
            decode_rows = (query_start_loc[1:] - query_start_loc[:-1]) == 1
            rows = query_start_loc[:-1][decode_rows].long()
            assert torch.equal(got[rows], want[rows])
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        else:
            tol = TOLERANCE[dtype]
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("num_kv_heads, group, head_dim, block_size, dtype, window", [
    (1, 8, 128, 32, torch.float16, None),  # one KV head for 8 query heads, 16-bit
    (4, 1, 64, 8, torch.float32, 5),  # no GQA, small blocks, a window shorter than a block
    (2, 4, 80, 16, torch.bfloat16, 40),  # head_dim not a power of two
    (3, 3, 64, 16, torch.float32, 1000),  # a window longer than any sequence
    # bfloat16 at the head sizes with an AVX-512 path (its own widening of the cache)
    (3, 3, 64, 16, torch.bfloat16, None),
    (2, 4, 128, 16, torch.bfloat16, 20),
    (2, 2, 96, 16, torch.float32, None),  # the other head sizes with an AVX-512 path
    (1, 2, 256, 16, torch.bfloat16, 7),
    (1, 2, 32, 16, torch.float16, None),
])
def test_the_cpp_decode_kernel_equals_the_reference_on_other_shapes(num_kv_heads, group, head_dim,
                                                                    block_size, dtype, window):
    """Decodes only (the kernel's part), lengths from 1 to 300 tokens (one, a block, a block
    and one), stale finite garbage in unowned slots."""
    from brim.kernels.cpu_attention import CpuAttentionPlan, paged_attention_cpu

    torch.manual_seed(head_dim + block_size)
    seqs = [(n, 1) for n in (1, 300, 17, block_size, block_size + 1, 64, 2, 129)]
    q, k_cache, v_cache, block_tables, query_start_loc, seq_lens = make_batch(
        seqs, num_kv_heads=num_kv_heads, group=group, head_dim=head_dim,
        block_size=block_size, dtype=dtype)
    for cache in (k_cache, v_cache):
        stale = cache.isnan()
        cache[stale] = (torch.randn(int(stale.sum())) * 50).to(dtype)
    scale = 1 / math.sqrt(head_dim)
    want = paged_attention_ref(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens,
                               scale, sliding_window=window)
    plan = CpuAttentionPlan.build(block_tables, query_start_loc, seq_lens, block_size,
                                  in_place=True)
    got = paged_attention_cpu(q, k_cache, v_cache, plan, scale, sliding_window=window)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("num_kv_heads, group, head_dim, block_size, dtype, window", [
    (3, 3, 64, 16, torch.float32, None),  # SmolLM2's shape
    (3, 3, 64, 16, torch.bfloat16, None),
    (2, 4, 128, 8, torch.float32, 5),  # a window shorter than a block
    (1, 8, 128, 32, torch.float16, 40),  # a group of 8: two tasks of 4 heads
    (2, 5, 64, 16, torch.bfloat16, None),  # a group of 5: tasks of 4 and 1
    (4, 1, 64, 16, torch.float32, 1000),  # no GQA, a window longer than any sequence
    (2, 7, 64, 16, torch.float32, 17),  # 4 + 3
])
def test_the_cpp_prefill_kernel_equals_the_reference(num_kv_heads, group, head_dim, block_size,
                                                     dtype, window):
    """Prefill chunks through cpu_prefill_attention.cpp: whole prompts, chunks after a cached
    prefix (queries start mid-sequence), chunks of 1-2 and of 16k+-1 queries (partial
    16-position blocks), beside decodes; stale finite garbage in unowned slots."""
    from brim.kernels.cpu_attention import CpuAttentionPlan, paged_attention_cpu
    from brim.kernels.cpu_decode import prefill_attention_op

    torch.manual_seed(head_dim * group + block_size)
    seqs = [(300, 300), (90, 1), (130, 33), (17, 16), (2, 2), (200, 1), (65, 47), (5, 2)]
    q, k_cache, v_cache, block_tables, query_start_loc, seq_lens = make_batch(
        seqs, num_kv_heads=num_kv_heads, group=group, head_dim=head_dim,
        block_size=block_size, dtype=dtype, contiguous_q=True)
    for cache in (k_cache, v_cache):
        stale = cache.isnan()
        cache[stale] = (torch.randn(int(stale.sum())) * 50).to(dtype)
    scale = 1 / math.sqrt(head_dim)
    want = paged_attention_ref(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens,
                               scale, sliding_window=window)
    plan = CpuAttentionPlan.build(block_tables, query_start_loc, seq_lens, block_size,
                                  in_place=True)
    b = plan.prefill_batch
    assert b is not None and b.q_lens.tolist() == [n for _, n in seqs if n > 1]
    direct = torch.full_like(q, NAN)
    assert prefill_attention_op()(q, k_cache, v_cache, b.tables, b.q_starts, b.q_lens,
                                  b.seq_lens, scale, window or 0, direct), "no kernel path"
    got = paged_attention_cpu(q, k_cache, v_cache, plan, scale, sliding_window=window)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    rows = torch.cat([torch.arange(s, s + n) for s, n in zip(b.q_starts.tolist(),
                                                             b.q_lens.tolist())])
    assert torch.equal(direct[rows], got[rows])  # the plan's path is the kernel's


def test_the_cpp_prefill_kernel_declines_what_it_has_no_path_for():
    """A head size without a vectorized path: it writes nothing and says so (the plan then
    takes SDPA, which test_cpu_plan_equals_the_reference checks at head size 32)."""
    from brim.kernels.cpu_decode import prefill_attention_op

    q, k_cache, v_cache, block_tables, query_start_loc, seq_lens = make_batch(
        [(20, 20)], num_kv_heads=2, group=2, head_dim=80, block_size=16, dtype=torch.float32,
        contiguous_q=True)
    out = torch.full_like(q, NAN)
    assert not prefill_attention_op()(q, k_cache, v_cache, block_tables, torch.tensor([0]),
                                      torch.tensor([20]), seq_lens.long(), 0.1, 0, out)
    assert out.isnan().all()


def test_the_cpu_store_keeps_the_cache_finite():
    from brim.kernels.cpu_attention import store_kv_cpu

    k_cache = torch.zeros(4, 16, 2, 8)
    v_cache = torch.zeros(4, 16, 2, 8)
    key = torch.randn(3, 2, 8)
    value = torch.randn(3, 2, 8)
    key[0, 0, 0], value[1, 1, 1], value[2, 0, 3] = float("nan"), float("inf"), -float("inf")
    slots = torch.tensor([5, 17, 63])
    store_kv_cpu(key, value, k_cache, v_cache, slots)
    assert k_cache.isfinite().all() and v_cache.isfinite().all()
    flat_k, flat_v = k_cache.view(-1, 2, 8), v_cache.view(-1, 2, 8)
    assert flat_k[5, 0, 0] == 0 and flat_v[17, 1, 1] == 0 and flat_v[63, 0, 3] == 0
    assert torch.equal(flat_k[17], key[1]) and torch.equal(flat_v[5], value[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_cpp_store_writes_what_the_torch_ops_write(dtype):
    """The C++ store (both caches in one call) against nan_to_num + index_copy_, on rows that
    are views of a wider projection output (as q/k/v are), non-finite values included."""
    from brim.kernels.cpu_attention import store_kv_cpu
    from brim.kernels.cpu_decode import store_kv_op

    assert store_kv_op() is not None, "the C++ kernels did not build"
    torch.manual_seed(0)
    num_tokens, kv_heads, head_dim = 37, 2, 16
    qkv = torch.randn(num_tokens, 5 * kv_heads * head_dim).to(dtype)
    key = qkv[:, 3 * kv_heads * head_dim:4 * kv_heads * head_dim].view(num_tokens, kv_heads,
                                                                        head_dim)
    value = qkv[:, 4 * kv_heads * head_dim:].view(num_tokens, kv_heads, head_dim)
    key[3, 1, 2], key[9, 0, 0], value[20, 1, 15] = float("nan"), float("inf"), -float("inf")
    slots = torch.randperm(8 * 16)[:num_tokens]
    k_cache, v_cache = (torch.full((8, 16, kv_heads, head_dim), 7.0, dtype=dtype)
                        for _ in range(2))
    want_k, want_v = k_cache.clone(), v_cache.clone()
    for cache, x in ((want_k, key), (want_v, value)):
        cache.view(-1, kv_heads, head_dim)[slots] = torch.nan_to_num(x, 0.0, 0.0, 0.0)
    store_kv_cpu(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    with pytest.raises(RuntimeError, match="out of"):
        store_kv_op()(key, value, k_cache, v_cache, torch.full((num_tokens,), 8 * 16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lengths", [(300,), (1,), (40, 129)])
def test_the_cpp_decode_kernel_splits_few_sequences_by_head(dtype, lengths):
    """Fewer decoding sequences than threads: a task per (sequence, query head)."""
    from brim.kernels.cpu_attention import CpuAttentionPlan, paged_attention_cpu

    torch.manual_seed(len(lengths))
    q, k_cache, v_cache, block_tables, query_start_loc, seq_lens = make_batch(
        [(n, 1) for n in lengths], num_kv_heads=3, group=3, head_dim=64, block_size=16,
        dtype=dtype)
    for cache in (k_cache, v_cache):
        stale = cache.isnan()
        cache[stale] = (torch.randn(int(stale.sum())) * 50).to(dtype)
    want = paged_attention_ref(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens,
                               0.125)
    plan = CpuAttentionPlan.build(block_tables, query_start_loc, seq_lens, 16, in_place=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(max(threads, len(lengths) + 1))
        got = paged_attention_cpu(q, k_cache, v_cache, plan, 0.125)
    finally:
        torch.set_num_threads(threads)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
