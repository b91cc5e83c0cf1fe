"""brim's greedy tokens equal transformers' on the real bundled model, batched, one at a
time, under preemption and under chunked prefill, and split over 3 tensor-parallel ranks
(tiny random-weight models of each family: tests/runtime/models/test_llama.py and
test_parallel.py)."""

from __future__ import annotations

import pytest

from brim.runtime import LLM, SamplingParams
from tests.runtime.conftest import hf_greedy

NUM_NEW_TOKENS = 32

_HISTORY = (
    "The history of computing stretches from the abacus through mechanical calculators "
    "such as Pascal's arithmetic machine and Babbage's difference engine to the electronic "
    "machines of the twentieth century. Ada Lovelace described how the analytical engine "
    "could manipulate symbols as well as numbers. During the Second World War, Colossus "
    "and ENIAC showed that vacuum tubes could compute at unprecedented speed, and the "
    "stored-program architecture described by von Neumann became the template for nearly "
    "every machine that followed. Transistors replaced tubes in the late 1950s, integrated "
    "circuits arrived in the 1960s, and the microprocessor put a whole central processing "
    "unit on a single chip in 1971. Personal computers spread through homes and offices in "
    "the 1980s, the World Wide Web connected them in the 1990s, and smartphones put a "
    "networked computer in billions of pockets in the 2000s. Today, large neural networks "
    "trained on graphics processors write text, translate languages and generate images, "
    "and researchers debate how far this line of progress can continue. Along the way, "
    "programming languages climbed from machine code and assembly to FORTRAN, COBOL and "
    "LISP, then to C, Smalltalk and the object-oriented languages, and later to Python, "
    "Java and JavaScript, each trading some control over the hardware for clarity and "
    "speed of development. Operating systems grew from batch monitors into time-sharing "
    "systems such as Multics and Unix, whose small tools joined by pipes still shape how "
    "programmers work. Storage moved from punched cards and magnetic drums to tape, disks "
    "and flash memory, while networks evolved from ARPANET's first messages to the "
    "fibre-optic backbone of the internet. Summarise the "
    "main turning points described above in one sentence:"
)

CHAT_PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a concise assistant who answers in verse."},
        {"role": "user", "content": "Write a haiku about autumn leaves."},
    ],
    [
        {"role": "user", "content": "Hi! Can you help me plan a trip?"},
        {"role": "assistant", "content": "Of course. Where would you like to go?"},
        {"role": "user", "content": "Somewhere warm in December, with good food."},
    ],
]
RAW_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "1, 2, 3, 5, 8, 13,",
    "Once upon a time, in a small village at the edge of a great forest, there lived an "
    "old clockmaker who had never once left the valley. One morning a stranger arrived",
    _HISTORY,
]


@pytest.fixture(scope="module")
def parity_prompts(bundled_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bundled_model_dir)
    prompts = [
        tokenizer.encode(
            tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True),
            add_special_tokens=False,
        )
        for c in CHAT_PROMPTS
    ] + [tokenizer.encode(p) for p in RAW_PROMPTS]
    lengths = sorted(len(p) for p in prompts)
    assert lengths[0] <= 6 and lengths[-1] >= 300, lengths  # 5 to 300+ tokens
    return prompts


@pytest.fixture(scope="module")
def hf_reference(hf_bundled_model, parity_prompts):
    return [hf_greedy(hf_bundled_model, p, NUM_NEW_TOKENS) for p in parity_prompts]


GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)


def _assert_compiled(llm) -> None:
    regions = llm.engine.runner.model.compiled_regions
    assert regions is not None, "the model is not compiled"
    assert not any(region.is_broken for region in regions), "a compiled region fell back"


def _generate(llm, prompts):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]


@pytest.mark.slow
@pytest.mark.parametrize(
    "scenario, engine_args",
    [
        ("all at once", {}),
        ("one at a time", {}),
        # 48 blocks x 16 = 768 tokens: every prompt fits alone, the batch does not.
        ("preemption", {"num_gpu_blocks": 48, "max_model_len": 768}),
        # 40 tokens per step: every prompt longer than that is prefilled in chunks.
        ("chunked prefill", {"max_num_batched_tokens": 40, "max_num_seqs": 8}),
    ],
)
def test_bundled_model_matches_transformers(bundled_model_dir, parity_prompts, hf_reference,
                                            scenario, engine_args):
    llm = LLM(str(bundled_model_dir), dtype="float32", device="cpu", **engine_args)
    _assert_compiled(llm)  # the fast path (models/compiled.py), not its eager fallback
    if scenario == "one at a time":
        got = [_generate(llm, [p])[0] for p in parity_prompts]
    else:
        got = _generate(llm, parity_prompts)
    for prompt, want, have in zip(parity_prompts, hf_reference, got):
        assert have == want, f"prompt of {len(prompt)} tokens diverged"
    stats = llm.engine.get_stats()
    if scenario == "preemption":
        assert stats.num_preemptions > 0
    assert stats.num_used_blocks == 0 and stats.num_running == 0 and stats.num_waiting == 0


@pytest.mark.slow
def test_tensor_parallel_3_matches_transformers_batched_and_under_preemption(
        tp3_engine, parity_prompts, hf_reference):
    """TP=3 on SmolLM2 (a third of the heads and one KV head per rank, gloo on CPU) gives
    transformers' tokens, as TP=1 does above: all prompts at once in 48 blocks (preempting),
    then the chat prompts alone (no preemption)."""
    llm = LLM.from_engine(tp3_engine)
    preemptions = tp3_engine.get_stats().num_preemptions
    got = _generate(llm, parity_prompts)
    for prompt, want, have in zip(parity_prompts, hf_reference, got):
        assert have == want, f"prompt of {len(prompt)} tokens diverged"
    assert tp3_engine.get_stats().num_preemptions > preemptions
    preemptions = tp3_engine.get_stats().num_preemptions
    chats = len(CHAT_PROMPTS)
    assert _generate(llm, parity_prompts[:chats]) == hf_reference[:chats]
    stats = tp3_engine.get_stats()
    assert stats.num_preemptions == preemptions
    assert stats.num_used_blocks == 0 and stats.num_running == 0 and stats.num_waiting == 0


def agreement(reference: list[list[int]], got: list[list[int]]) -> list[int]:
    """Per prompt: generated tokens equal to the reference before the first divergence."""
    counts = []
    for want, have in zip(reference, got):
        n = 0
        while n < len(want) and n < len(have) and want[n] == have[n]:
            n += 1
        counts.append(n)
    return counts


# An FP8 cache rounds every K and V to 3 mantissa bits, so greedy decoding drifts from float32
# wherever two tokens are close; where it first does, the token brim picked must be a near-tie
# in float32 transformers itself (within this many nats of its best). A broken cache (wrong
# slots, scales, blocks) picks tokens transformers rates far below its best.
FP8_NEAR_TIE_NATS = 1.0


@pytest.mark.slow
def test_bundled_model_fp8_kv_cache_mostly_agrees(bundled_model_dir, parity_prompts,
                                                  hf_bundled_model, hf_reference, capsys):
    import torch

    llm = LLM(str(bundled_model_dir), dtype="float32", device="cpu", kv_cache_dtype="fp8")

    got = _generate(llm, parity_prompts)

    counts = agreement(hf_reference, got)
    total = len(parity_prompts) * NUM_NEW_TOKENS
    gaps = []  # per diverging prompt: transformers' logprob of its best minus of brim's token
    for prompt, have, n in zip(parity_prompts, got, counts):
        if n == NUM_NEW_TOKENS:
            continue
        with torch.inference_mode():
            ids = torch.tensor([prompt + have[:n]])
            logprobs = torch.log_softmax(hf_bundled_model(input_ids=ids).logits[0, -1], -1)
        gaps.append(round((logprobs.max() - logprobs[have[n]]).item(), 3))
    with capsys.disabled():
        print(f"\nFP8 KV cache vs float32 transformers, tokens before the first divergence "
              f"(of {NUM_NEW_TOKENS}): {counts} = {sum(counts)}/{total}; at each divergence, "
              f"nats below transformers' best: {gaps}")
    # Measured 126/256 (docs/benchmarks.md); a broken cache diverges at once, far from a tie.
    assert sum(counts) >= 100, counts
    assert all(gap <= FP8_NEAR_TIE_NATS for gap in gaps), (gaps, FP8_NEAR_TIE_NATS)
