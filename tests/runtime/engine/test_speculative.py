"""Speculative decoding (engine/speculative.py): exactly the same output, fewer steps.

Greedy: the same tokens, text and finish reasons as without speculation, on the bundled
model — batched, under preemption, with prefix caching, with stop strings — while the
target really accepted guesses (else the comparison would prove nothing). Sampling: the
distribution of the tokens a guess was checked for equals the distribution without
speculation (a chi-square test that a verifier accepting every guess fails). Every block
is back in the pool at the end.
"""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from brim.runtime.engine.speculative import NgramProposer, SpeculativeConfig
from brim.runtime.sampling_params import SamplingParams

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}


# -- configuration -----------------------------------------------------------------------------

def test_config_defaults_and_json():
    config = SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 5}')
    assert config.to_dict() == {"method": "ngram", "num_speculative_tokens": 5,
                                "prompt_lookup_max": 3, "prompt_lookup_min": 1}
    assert SpeculativeConfig.parse({"num_speculative_tokens": 2, "prompt_lookup_min": 4}) \
        .prompt_lookup_max == 4
    assert SpeculativeConfig.parse(None) is None and SpeculativeConfig.parse({}) is None


@pytest.mark.parametrize("value, message", [
    ({"method": "ngram"}, "needs num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "in 1..16"),
    ({"method": "ngram", "num_speculative_tokens": 17}, "in 1..16"),
    ({"method": "ngram", "num_speculative_tokens": True}, "in 1..16"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 5,
      "prompt_lookup_max": 2}, "prompt_lookup_min (5) must be <= prompt_lookup_max (2)"),
    ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 1}, "unknown keys"),
    ({"model": "/models/draft", "num_speculative_tokens": 2}, "draft-model speculation"),
    ({"method": "suffix", "num_speculative_tokens": 2}, "'suffix' is not supported"),
    ("{not json", "not valid JSON"),
    ([1, 2], "must be an object"),
])
def test_config_refuses_with_a_reason(value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SpeculativeConfig.parse(value)


# -- the n-gram proposer against a plain Python reading of its rule ----------------------------

class _Req:
    def __init__(self, tokens):
        self.all_token_ids = tokens
        self.spec_state = None


def reference_lookup(tokens, k, lo, hi):
    """The latest earlier occurrence of the longest suffix of n tokens (hi..lo) that ends
    before the last token; the k tokens that followed it."""
    for n in range(min(hi, len(tokens) - 1), lo - 1, -1):
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start:start + n] == suffix:
                return tokens[start + n:start + n + k]
    return []


def test_ngram_lookup_equals_the_reference_rule():
    rng = random.Random(0)
    config = SpeculativeConfig("ngram", 4, prompt_lookup_max=4, prompt_lookup_min=1)
    proposer = NgramProposer(config)
    checked = found = 0
    for case in range(400):
        # Small alphabets repeat a lot; ids like 256 and 65536 make misaligned byte matches.
        alphabet = rng.choice([[1, 2, 3], [0, 256, 65536, 1], list(range(50)), [7, 7 << 8]])
        request = _Req([rng.choice(alphabet) for _ in range(rng.randint(1, 40))])
        for _ in range(3):  # grows between lookups, as a request does
            for limit in (4, 2):
                expected = reference_lookup(request.all_token_ids, limit, 1, 4)
                assert proposer.propose(request, limit) == expected, request.all_token_ids
                checked += 1
                found += bool(expected)
            request.all_token_ids.extend(rng.choice(alphabet) for _ in range(rng.randint(1, 3)))
    assert found > checked // 2  # the comparison covered many real matches


# -- greedy: the same output as without speculation ---------------------------------------------

REPEATING = ("Repeat this list exactly three times: red, green, blue, yellow, red, green, "
             "blue, yellow. Again: red, green, blue,")


@pytest.fixture(scope="module")
def llms(bundled_model_dir):
    """(off, ngram), both with a small cache so that a batch of 6 must preempt."""
    from brim.runtime import LLM

    kwargs = dict(device="cpu", dtype="float32", max_model_len=320, num_gpu_blocks=24,
                  block_size=16, max_num_seqs=6, seed=0)
    return (LLM(str(bundled_model_dir), **kwargs),
            LLM(str(bundled_model_dir), speculative_config=NGRAM, **kwargs))


def run_both(llms, prompts, params):
    off, spec = llms
    before = spec.engine.num_spec_accepted_tokens
    expected = off.generate(prompts, params, use_tqdm=False)
    got = spec.generate(prompts, params, use_tqdm=False)
    return expected, got, spec.engine.num_spec_accepted_tokens - before


def assert_same(expected, got):
    for e, g in zip(expected, got, strict=True):
        for ec, gc in zip(e.outputs, g.outputs, strict=True):
            assert gc.token_ids == ec.token_ids
            assert (gc.text, gc.finish_reason, gc.stop_reason) == (
                ec.text, ec.finish_reason, ec.stop_reason)


def test_greedy_batched_under_preemption_with_prefix_caching(llms):
    from tests.runtime.engine.test_parity import RAW_PROMPTS as PARITY

    shared = "You are a careful assistant. Answer in one sentence. "
    prompts = [REPEATING, shared + REPEATING, shared + "Count from 1 to 20: 1, 2, 3,",
               *PARITY[:4]]
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    expected, got, accepted = run_both(llms, prompts, params)
    assert_same(expected, got)
    assert accepted >= 20  # guesses were checked and kept, not just proposed
    assert llms[1].engine.scheduler.num_preemptions > 0  # the small cache did preempt
    pool = llms[1].engine.kv_cache.pool
    assert pool.num_used_blocks == 0 and pool.num_free_blocks == pool.num_blocks


def test_greedy_with_stop_strings_eos_and_logprobs(llms):
    params = [SamplingParams(temperature=0, max_tokens=60, stop=["yellow. Again"]),
              SamplingParams(temperature=0, max_tokens=60, stop=[", blue"],
                             include_stop_str_in_output=True),
              SamplingParams(temperature=0, max_tokens=40, logprobs=2),
              SamplingParams(temperature=0, max_tokens=7)]
    prompts = [REPEATING] * 4
    expected, got, accepted = run_both(llms, prompts, params)
    assert_same(expected, got)
    assert accepted > 0
    lp_e, lp_g = expected[2].outputs[0].logprobs, got[2].outputs[0].logprobs
    assert [sorted(e) for e in lp_g] == [sorted(e) for e in lp_e]
    for e, g in zip(lp_e, lp_g):
        for token in e:
            assert g[token].logprob == pytest.approx(e[token].logprob, abs=1e-4)
            assert g[token].rank == e[token].rank


# -- sampling: the distribution is the target's ------------------------------------------------

def chi_square_two_sample(a: Counter, b: Counter, min_count: int = 10):
    """The statistic and degrees of freedom, rare categories pooled into one."""
    total_a, total_b = sum(a.values()), sum(b.values())
    cells, rare_a, rare_b = [], 0, 0
    for key in set(a) | set(b):
        if a[key] + b[key] >= min_count:
            cells.append((a[key], b[key]))
        else:
            rare_a, rare_b = rare_a + a[key], rare_b + b[key]
    if rare_a + rare_b:
        cells.append((rare_a, rare_b))
    stat = 0.0
    for x, y in cells:
        # Two-sample chi-square for unequal totals.
        k1, k2 = math.sqrt(total_b / total_a), math.sqrt(total_a / total_b)
        stat += (k1 * x - k2 * y) ** 2 / (x + y)
    return stat, len(cells) - 1


def chi_square_critical(df: int, z: float = 3.09) -> float:
    """The upper 0.1% point (z = 3.09), by the Wilson-Hilferty approximation."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.fixture(scope="module")
def tiny_small_vocab(tmp_path_factory):
    from tests.hub_fixtures import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("tiny-spec"), vocab_size=24,
                            initializer_range=0.05)


def sample_positions(model_dir, speculative, num_samples):
    from brim.runtime import LLM

    llm = LLM(str(model_dir), device="cpu", dtype="float32", max_num_seqs=256,
              num_gpu_blocks=1200, block_size=16, speculative_config=speculative, seed=0)
    prompt = list(range(24)) * 2  # every token occurs: the lookup always guesses
    params = [SamplingParams(temperature=1.0, max_tokens=3, seed=1000 + i, ignore_eos=True)
              for i in range(num_samples)]
    outputs = llm.generate([prompt] * num_samples, params, use_tqdm=False)
    return ([tuple(o.outputs[0].token_ids) for o in outputs], llm.engine)


def test_rejection_sampling_keeps_the_distribution(tiny_small_vocab, monkeypatch):
    num = 2000
    plain, _ = sample_positions(tiny_small_vocab, None, num)
    spec, engine = sample_positions(tiny_small_vocab, {"method": "ngram",
                                                       "num_speculative_tokens": 2}, num)
    assert engine.num_spec_draft_tokens >= 0.9 * num  # guesses were checked for (nearly) all
    assert 0 < engine.num_spec_accepted_tokens < engine.num_spec_draft_tokens
    pool = engine.kv_cache.pool
    assert pool.num_used_blocks == 0  # many rejections, no block left behind
    for position in (1, 2):  # the tokens a guess was checked for
        stat, df = chi_square_two_sample(Counter(t[position] for t in plain),
                                         Counter(t[position] for t in spec))
        assert stat < chi_square_critical(df), (position, stat, df)

    # The test has power: a verifier that keeps every guess is caught by the same statistic.
    from brim.runtime.engine.sampler import Sampler

    monkeypatch.setattr(Sampler, "verify", lambda self, logits, request, guesses: (
        list(guesses) + [int(logits[-1].argmax())], [None] * (len(guesses) + 1)))
    broken, _ = sample_positions(tiny_small_vocab, {"method": "ngram",
                                                    "num_speculative_tokens": 2}, num)
    stat, df = chi_square_two_sample(Counter(t[1] for t in plain), Counter(t[1] for t in broken))
    assert stat > chi_square_critical(df)
