"""Speculative decoding (engine/speculative.py): exactly the same output, fewer steps.

Greedy: the same tokens, text and finish reasons as without speculation, on the bundled
model — batched, under preemption, with prefix caching, with stop strings — while the
target really accepted guesses (else the comparison would prove nothing). Sampling: the
distribution of the tokens a guess was checked for equals the distribution without
speculation (a chi-square test that a verifier accepting every guess fails). Every block
is back in the pool at the end.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter

import pytest

from brim.runtime.engine.speculative import NgramProposer, SpeculativeConfig
from brim.runtime.sampling_params import SamplingParams
from tests.hub_fixtures import tiny_llama  # noqa: F401 (fixture)

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}


# -- configuration -----------------------------------------------------------------------------

def test_config_defaults_and_json():
    config = SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 5}')
    assert config.to_dict() == {"method": "ngram", "num_speculative_tokens": 5,
                                "prompt_lookup_max": 3, "prompt_lookup_min": 1}
    assert SpeculativeConfig.parse({"num_speculative_tokens": 2, "prompt_lookup_min": 4}) \
        .prompt_lookup_max == 4
    assert SpeculativeConfig.parse(None) is None and SpeculativeConfig.parse({}) is None


def test_a_named_model_is_a_draft_model():
    config = SpeculativeConfig.parse({"model": "/models/draft", "num_speculative_tokens": 3})
    assert config.to_dict() == {"method": "draft_model", "model": "/models/draft",
                                "num_speculative_tokens": 3}
    assert SpeculativeConfig.parse(json.dumps(config.to_dict())) == config


@pytest.mark.parametrize("value, message", [
    ({"method": "ngram"}, "needs num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "in 1..16"),
    ({"method": "ngram", "num_speculative_tokens": 17}, "in 1..16"),
    ({"method": "ngram", "num_speculative_tokens": True}, "in 1..16"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 5,
      "prompt_lookup_max": 2}, "prompt_lookup_min (5) must be <= prompt_lookup_max (2)"),
    ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 1}, "unknown keys"),
    ({"method": "suffix", "num_speculative_tokens": 2}, "'suffix' is not supported"),
    ({"method": "eagle", "model": "/m", "num_speculative_tokens": 2}, "'eagle' is not supported"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, 'needs "model"'),
    ({"method": "ngram", "model": "/m", "num_speculative_tokens": 2}, "does not use"),
    ({"model": "/m", "num_speculative_tokens": 2, "prompt_lookup_max": 3},
     "apply to method ngram only"),
    ({"model": "/m", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 2},
     "draft_tensor_parallel_size must be 1"),
    ({"model": "/m", "num_speculative_tokens": 0}, "in 1..16"),
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


KWARGS = dict(device="cpu", dtype="float32", max_model_len=256, num_gpu_blocks=16, block_size=16,
              max_num_seqs=6, seed=0)


@pytest.fixture(scope="module")
def off(bundled_model_dir):
    """Speculation off, with a small cache so that a batch of 6 must preempt."""
    from brim.runtime import LLM

    return LLM(str(bundled_model_dir), **KWARGS)


@pytest.fixture(scope="module")
def random_draft(bundled_model_dir, tmp_path_factory):
    """A tiny random-weight Llama with the bundled model's vocabulary: it guesses badly."""
    from brim.runtime.planner.facts import read_checkpoint
    from tests.hub_fixtures import write_tiny_llama

    vocab = read_checkpoint(bundled_model_dir).model.vocab_size
    return write_tiny_llama(tmp_path_factory.mktemp("random-draft"), vocab_size=vocab,
                            max_position_embeddings=512)


# Each proposer, and what its acceptance must look like (accepted, checked guesses).
PROPOSERS = {
    "ngram": lambda accepted, checked: accepted >= 20,
    # The target as its own draft: every guess is its own argmax. (Its decode pass and the
    # target's multi-token check round differently, so an exact tie could flip: 99%.)
    "draft-self": lambda accepted, checked: checked > 50 and accepted >= 0.99 * checked,
    "draft-random": lambda accepted, checked: checked > 50 and accepted <= 0.1 * checked,
}


@pytest.fixture(scope="module", params=list(PROPOSERS))
def spec(request, bundled_model_dir, random_draft):
    from brim.runtime import LLM

    config = {"ngram": NGRAM,
              "draft-self": {"model": str(bundled_model_dir), "num_speculative_tokens": 4},
              "draft-random": {"model": str(random_draft), "num_speculative_tokens": 3},
              }[request.param]
    llm = LLM(str(bundled_model_dir), speculative_config=config, **KWARGS)
    llm.kind = request.param
    return llm


def run_both(off, spec, prompts, params):
    engine = spec.engine
    before = engine.num_spec_accepted_tokens, engine.num_spec_draft_tokens
    expected = off.generate(prompts, params, use_tqdm=False)
    got = spec.generate(prompts, params, use_tqdm=False)
    accepted = engine.num_spec_accepted_tokens - before[0]
    checked = engine.num_spec_draft_tokens - before[1]
    assert PROPOSERS[spec.kind](accepted, checked), (spec.kind, accepted, checked)
    pool = engine.kv_cache.pool
    assert pool.num_used_blocks == 0 and pool.num_free_blocks == pool.num_blocks
    return expected, got


def assert_same(expected, got):
    for e, g in zip(expected, got, strict=True):
        for ec, gc in zip(e.outputs, g.outputs, strict=True):
            assert gc.token_ids == ec.token_ids
            assert (gc.text, gc.finish_reason, gc.stop_reason) == (
                ec.text, ec.finish_reason, ec.stop_reason)


def test_greedy_batched_under_preemption_with_prefix_caching(off, spec):
    from tests.runtime.engine.test_parity import RAW_PROMPTS as PARITY

    shared = ("You are a careful assistant. Answer in one sentence, plainly, with no lists, no "
              "markdown and no preamble. Be exact about numbers, names and dates. ")  # > 2 blocks
    prompts = [REPEATING, shared + REPEATING, shared + "Count from 1 to 20: 1, 2, 3,",
               *PARITY[:4]]
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    preemptions = spec.engine.scheduler.num_preemptions
    hits = spec.engine.kv_cache.num_hit_tokens
    expected, got = run_both(off, spec, prompts, params)
    assert_same(expected, got)
    assert spec.engine.scheduler.num_preemptions > preemptions  # the small cache did preempt
    assert spec.engine.kv_cache.num_hit_tokens > hits  # the shared prefix came from the cache


def test_greedy_with_stop_strings_eos_and_logprobs(off, spec):
    params = [SamplingParams(temperature=0, max_tokens=60, stop=["yellow. Again"]),
              SamplingParams(temperature=0, max_tokens=60, stop=[", blue"],
                             include_stop_str_in_output=True),
              SamplingParams(temperature=0, max_tokens=40, logprobs=2),
              SamplingParams(temperature=0, max_tokens=7)]
    prompts = [REPEATING, REPEATING, REPEATING, "Write one word:"]
    expected, got = run_both(off, spec, prompts, params)
    assert_same(expected, got)
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


NUM_SAMPLES = 2000


@pytest.fixture(scope="module")
def plain_samples(tiny_small_vocab):
    """The first tokens without speculation, the reference both proposers are tested against."""
    return sample_positions(tiny_small_vocab, None, NUM_SAMPLES)[0]


def test_rejection_sampling_keeps_the_distribution(tiny_small_vocab, plain_samples, monkeypatch):
    num, plain = NUM_SAMPLES, plain_samples
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

    monkeypatch.setattr(Sampler, "verify", lambda self, logits, request, guesses, **_: (
        list(guesses) + [int(logits[-1].argmax())], [None] * (len(guesses) + 1)))
    broken, _ = sample_positions(tiny_small_vocab, {"method": "ngram",
                                                    "num_speculative_tokens": 2}, num)
    stat, df = chi_square_two_sample(Counter(t[1] for t in plain), Counter(t[1] for t in broken))
    assert stat > chi_square_critical(df)


@pytest.fixture(scope="module")
def peaky_draft(tmp_path_factory):
    """A random draft for tiny_small_vocab whose distributions are far from the target's."""
    from tests.hub_fixtures import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("tiny-draft"), vocab_size=24, hidden_size=32,
                            intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                            initializer_range=0.5)


def test_rejection_sampling_with_a_draft_model_keeps_the_distribution(
        tiny_small_vocab, peaky_draft, plain_samples, monkeypatch):
    num, plain = NUM_SAMPLES, plain_samples
    draft = {"model": str(peaky_draft), "num_speculative_tokens": 2}
    spec, engine = sample_positions(tiny_small_vocab, draft, num)
    assert engine.num_spec_draft_tokens >= 0.9 * num
    assert 0 < engine.num_spec_accepted_tokens < engine.num_spec_draft_tokens
    assert engine.kv_cache.pool.num_used_blocks == 0
    for position in (1, 2):
        stat, df = chi_square_two_sample(Counter(t[position] for t in plain),
                                         Counter(t[position] for t in spec))
        assert stat < chi_square_critical(df), (position, stat, df)

    # Power: a verifier that keeps every guess emits the draft's distribution, and the same
    # statistic sees it.
    from brim.runtime.engine.sampler import Sampler

    monkeypatch.setattr(Sampler, "verify", lambda self, logits, request, guesses, **_: (
        list(guesses) + [int(logits[-1].argmax())], [None] * (len(guesses) + 1)))
    broken, _ = sample_positions(tiny_small_vocab, draft, num)
    stat, df = chi_square_two_sample(Counter(t[1] for t in plain), Counter(t[1] for t in broken))
    assert stat > chi_square_critical(df)


def test_draft_model_config_is_checked_against_the_target(tiny_llama, tiny_small_vocab,
                                                           bundled_model_dir):
    from brim.runtime.config import EngineConfig

    config = EngineConfig.create(tiny_llama, device="cpu", speculative_config={
        "model": str(tiny_llama), "num_speculative_tokens": 2})
    assert config.draft_model.path == tiny_llama and config.speculative.model == str(tiny_llama)
    with pytest.raises(ValueError, match="vocabulary of 24 tokens.*4096"):
        EngineConfig.create(tiny_llama, device="cpu", speculative_config={
            "model": str(tiny_small_vocab), "num_speculative_tokens": 2})
    with pytest.raises(FileNotFoundError, match="speculative_config model"):
        EngineConfig.create(tiny_llama, device="cpu", speculative_config={
            "model": str(tiny_llama / "missing"), "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="tensor_parallel_size=1 only"):
        EngineConfig.create(tiny_llama, device="cpu", tensor_parallel_size=2,
                            speculative_config={"model": str(tiny_llama),
                                                "num_speculative_tokens": 2})


def test_a_draft_with_a_shorter_context_bounds_max_model_len(bundled_model_dir,
                                                             tmp_path_factory):
    from brim.runtime.config import EngineConfig
    from brim.runtime.planner.facts import read_checkpoint
    from tests.hub_fixtures import write_tiny_llama

    target = read_checkpoint(bundled_model_dir).model
    short = write_tiny_llama(tmp_path_factory.mktemp("short-draft"), vocab_size=target.vocab_size,
                             max_position_embeddings=256)
    draft = {"model": str(short), "num_speculative_tokens": 2}
    assert target.max_position_embeddings > 256
    # No length asked for: what both models handle.
    assert EngineConfig.create(bundled_model_dir, device="cpu",
                               speculative_config=draft).model.max_model_len == 256
    with pytest.raises(ValueError, match="positions up to 256, below max_model_len=1024"):
        EngineConfig.create(bundled_model_dir, device="cpu", max_model_len=1024,
                            speculative_config=draft)


def test_the_kv_cache_and_weights_count_the_draft(tiny_llama):
    """The draft's cache shares the target's blocks: a block costs both models' KV, and both
    models' weights are in the report."""
    from brim.runtime import LLM
    from brim.runtime.engine.cache_sizing import kv_bytes_per_token
    from brim.runtime.models.loader import model_weights_bytes

    plain = LLM(str(tiny_llama), device="cpu", dtype="float32", max_model_len=128)
    llm = LLM(str(tiny_llama), device="cpu", dtype="float32", max_model_len=128,
              speculative_config={"model": str(tiny_llama), "num_speculative_tokens": 2})
    engine = llm.engine
    per_token = kv_bytes_per_token(plain.engine.config)
    assert engine.memory_report.kv_bytes_per_token == 2 * per_token
    assert engine.memory_report.weights_bytes == 2 * model_weights_bytes(plain.engine.model)
    blocks = engine.num_gpu_blocks
    block_bytes = per_token * engine.config.cache.block_size
    assert engine.proposer.kv_cache_bytes == blocks * block_bytes


def test_a_failing_proposal_costs_the_guesses_not_the_requests(tiny_llama, monkeypatch, caplog):
    from brim.runtime import LLM
    from brim.runtime.engine.draft import DraftModelProposer

    kwargs = dict(device="cpu", dtype="float32", max_model_len=128, num_gpu_blocks=64)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    expected = LLM(str(tiny_llama), **kwargs).generate(prompts, params, use_tqdm=False)
    llm = LLM(str(tiny_llama), speculative_config={"model": str(tiny_llama),
                                                   "num_speculative_tokens": 3}, **kwargs)

    def fail(self, active, logits):
        raise RuntimeError("draft broke")

    monkeypatch.setattr(DraftModelProposer, "_choose", fail)
    got = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
    assert llm.engine.num_spec_draft_tokens == 0
    assert "speculative proposal over 2 requests failed" in caplog.text


# -- back-off: a request whose guesses keep failing stops paying for them ----------------------

def drive(backoff, accept, steps, k=4):
    """Decode `steps` steps; accept(step) -> guesses accepted when it guesses. The steps that
    guessed."""
    guessed = []
    for step in range(steps):
        if backoff.wants_guesses():
            guessed.append(step)
            backoff.record(k, accept(step))
    return guessed


def test_backoff_keeps_good_requests_guessing_and_pauses_bad_ones():
    from brim.runtime.engine.speculative import AcceptanceBackOff

    assert len(drive(AcceptanceBackOff(), lambda step: 2, 300)) == 300  # 50%: every step
    bad = AcceptanceBackOff()
    guessed = drive(bad, lambda step: 0, 400)
    assert len(guessed) < 0.15 * 400  # mostly plain steps
    gaps = [b - a for a, b in zip(guessed, guessed[1:])]
    assert max(gaps) <= AcceptanceBackOff.MAX_PAUSE + 1  # it keeps looking again
    assert guessed[-1] > 350
    # Bad, then good: back to guessing every step soon after the change.
    turning = AcceptanceBackOff()
    guessed = drive(turning, lambda step: 0 if step < 100 else 4, 300)
    after = [g for g in guessed if g >= 100 + AcceptanceBackOff.MAX_PAUSE + 1]
    assert after == list(range(after[0], 300))


@pytest.mark.parametrize("guesser", ["oracle", "wrong"])
def test_backoff_in_the_engine_follows_acceptance_and_keeps_greedy_output(
        tiny_llama, monkeypatch, guesser):
    """A proposer that always guesses the coming tokens is checked every step; one that is
    always wrong only now and then. The output is the same either way."""
    from brim.runtime import LLM
    from brim.runtime.engine.speculative import NgramProposer

    kwargs = dict(device="cpu", dtype="float32", max_model_len=200, num_gpu_blocks=64)
    prompt = [5, 6, 7, 8] * 6
    params = SamplingParams(temperature=0, max_tokens=120, ignore_eos=True)
    expected = LLM(str(tiny_llama), **kwargs).generate([prompt], params, use_tqdm=False)
    truth = prompt + list(expected[0].outputs[0].token_ids)
    wrong = next(t for t in range(4096) if t not in truth)

    def propose(self, request, limit):
        n = request.num_tokens
        right = truth[n:n + min(self.k, limit)]
        return right if guesser == "oracle" else [wrong] * len(right)

    monkeypatch.setattr(NgramProposer, "propose", propose)
    llm = LLM(str(tiny_llama), speculative_config={"method": "ngram",
                                                   "num_speculative_tokens": 4}, **kwargs)
    got = llm.generate([prompt], params, use_tqdm=False)
    assert got[0].outputs[0].token_ids == expected[0].outputs[0].token_ids
    engine = llm.engine
    steps = 120 - engine.num_spec_accepted_tokens  # each step: one token + the accepted
    if guesser == "oracle":
        assert engine.num_spec_accepted_tokens == engine.num_spec_draft_tokens
        assert engine.num_spec_drafts >= steps - 1  # all but the last step guessed
    else:
        assert engine.num_spec_accepted_tokens == 0
        assert engine.num_spec_drafts < 0.2 * steps, (engine.num_spec_drafts, steps)
