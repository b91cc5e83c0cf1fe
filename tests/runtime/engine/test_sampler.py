"""Sampler and filter_logits on synthetic logits: support and frequencies of top-k / top-p /
min-p against an independent numpy computation, greedy, seeds, logprobs, min_tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brim.runtime.engine import sampler as sampler_module
from brim.runtime.engine.sampler import (Sampler, _inverse_cdf, _inverse_cdf_flat, apply_min_tokens,
                                         filter_logits)

from tests.runtime.engine.conftest import EOS, make_request

NUM_DRAWS = 20_000
# Eight distinct probabilities, none of them on a top_p / min_p boundary used below.
PROBS = np.array([0.30, 0.22, 0.16, 0.12, 0.09, 0.06, 0.03, 0.02])


def reference_distribution(logits: np.ndarray, temperature: float, top_k: int, top_p: float,
                           min_p: float) -> np.ndarray:
    """The documented rule, written independently: softmax(logits / T); keep the top_k most
    likely; of those (renormalised) keep the smallest most-likely prefix whose mass reaches
    top_p; then drop tokens below min_p x the largest probability; renormalise."""
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.zeros(len(p), dtype=bool)
    keep[order[: top_k or len(p)]] = True
    kept = np.where(keep, p, 0.0)
    kept /= kept.sum()
    mass_before = 0.0
    for token in order:
        if not keep[token]:
            continue
        if mass_before >= top_p:
            keep[token] = False
        mass_before += kept[token]
    keep &= p >= min_p * p.max()
    out = np.where(keep, p, 0.0)
    return out / out.sum()


CASES = [  # temperature, top_k, top_p, min_p, the support size it leaves on PROBS
    (1.0, 3, 1.0, 0.0, 3),
    (1.0, 0, 0.7, 0.0, 4),  # masses before: .30 .52 .68 (keep) .80 (drop)
    (1.0, 0, 1.0, 0.5, 3),  # threshold .15
    (1.0, 5, 0.8, 0.0, 4),  # top 5 renormalised by .89: before 4th .76 keep, 5th .90 drop
    (0.7, 6, 0.9, 0.1, 5),
    (2.0, 0, 0.5, 0.0, 3),  # flatter: needs 3 tokens to reach half the mass
    (1.0, 0, 1.0, 0.0, 8),  # no restriction
]


def test_reference_supports_are_what_the_cases_say():
    for temperature, top_k, top_p, min_p, size in CASES:
        ref = reference_distribution(np.log(PROBS), temperature, top_k, top_p, min_p)
        assert int((ref > 0).sum()) == size


@pytest.fixture(params=["cpu-op", "torch"])
def draw_path(request, monkeypatch):
    """Sampler._sample through the C++ op (kernels/cpu_sampling.cpp), and through the torch
    inverse CDF that devices other than the CPU use."""
    if request.param == "torch":
        monkeypatch.setattr(sampler_module, "_cpu_sample_op", lambda: None)
    else:
        assert sampler_module._cpu_sample_op() is not None, "the C++ kernels did not build"
    return request.param


def test_sampled_support_and_frequencies_match_the_filtered_distribution(draw_path):
    # Every case shuffles the probabilities differently, and the cases are interleaved
    # row by row in one batch, so a row reading another row's parameters or a scatter
    # back to the wrong vocabulary position shows up.
    rng = np.random.default_rng(0)
    perms = [rng.permutation(len(PROBS)) for _ in CASES]
    row_logits = [np.log(PROBS[perm]) for perm in perms]
    requests = [make_request(f"c{i}", 1, temperature=t, top_k=k, top_p=p, min_p=m)
                for i, (t, k, p, m, _) in enumerate(CASES)]
    num_cases = len(CASES)
    logits = torch.tensor(np.tile(np.stack(row_logits), (NUM_DRAWS, 1)), dtype=torch.float32)
    tokens = np.array(Sampler(seed=0)(logits, requests * NUM_DRAWS).token_ids)
    for i, (temperature, top_k, top_p, min_p, _) in enumerate(CASES):
        expected = reference_distribution(row_logits[i], temperature, top_k, top_p, min_p)
        counts = np.bincount(tokens[i::num_cases], minlength=len(PROBS))
        outside = counts[expected == 0]
        assert outside.sum() == 0, f"case {CASES[i]} sampled outside its support"
        freq = counts / NUM_DRAWS
        sigma = np.sqrt(expected * (1 - expected) / NUM_DRAWS)
        assert np.all(np.abs(freq - expected) <= 4 * sigma + 1e-12), (CASES[i], freq, expected)


def test_filter_logits_masks_exactly_outside_the_support():
    logits = torch.log(torch.tensor(np.stack([PROBS[::-1], PROBS]), dtype=torch.float32))
    out = filter_logits(logits.clone(), top_k=torch.tensor([2, 0]),
                        top_p=torch.tensor([1.0, 0.7]), min_p=torch.tensor([0.0, 0.0]))
    assert torch.isinf(out).tolist() == [
        [True] * 6 + [False] * 2,
        [False] * 4 + [True] * 4,
    ]
    kept = ~torch.isinf(out)
    assert torch.equal(out[kept], logits[kept])  # surviving logits are left unchanged


def test_top_p_of_one_drops_nothing_even_beside_a_top_p_row():
    # One dominant token: the float32 cumulative mass reaches 1.0 before the tail.
    logits = torch.zeros(2, 1000)
    logits[:, 0] = 20.0
    out = filter_logits(logits, torch.tensor([0, 0]), torch.tensor([1.0, 0.5]),
                        torch.tensor([0.0, 0.0]))
    assert int(torch.isinf(out[0]).sum()) == 0
    assert int(torch.isinf(out[1]).sum()) == 999


def test_top_p_always_keeps_the_most_likely_token():
    logits = torch.tensor([[5.0, 1.0, 0.0]])
    out = filter_logits(logits, torch.tensor([0]), torch.tensor([0.01]), torch.tensor([0.0]))
    assert torch.isinf(out).tolist() == [[False, True, True]]


def test_greedy_rows_take_the_argmax_in_a_mixed_batch(draw_path):
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    requests = [
        make_request("g0", 1, temperature=0.0),
        make_request("s1", 1, temperature=1.5),
        make_request("g2", 1, temperature=1e-6),  # below 1e-5: greedy
        make_request("s3", 1, temperature=1.0, top_k=40),
        make_request("g4", 1, temperature=0.0, top_k=1),
        make_request("g5", 1, temperature=0.0, top_p=0.5),
    ]
    tokens = Sampler(seed=0)(logits.clone(), requests).token_ids
    argmax = logits.argmax(dim=-1).tolist()
    assert [tokens[i] for i in (0, 2, 4, 5)] == [argmax[i] for i in (0, 2, 4, 5)]


def _seeded_tokens(seed, position, others, sampler_seed, num_steps=8):
    """The tokens a request with `seed` gets at `position` in a batch with `others` rows."""
    gen = torch.Generator().manual_seed(99)
    target_logits = torch.randn(100, generator=gen)
    target = make_request("target", 1, seed=seed, temperature=1.0)
    sampler = Sampler(seed=sampler_seed)
    tokens = []
    for _ in range(num_steps):
        rows = [make_request(f"o{i}", 1, temperature=0.9 if i % 2 else 0.0)
                for i in range(others)]
        rows.insert(position, target)
        logits = torch.randn(len(rows), 100)  # other rows see other logits each step
        logits[position] = target_logits
        tokens.append(sampler(logits, rows).token_ids[position])
    return tokens


def test_same_seed_same_tokens_whatever_else_is_in_the_batch(draw_path):
    alone = _seeded_tokens(7, 0, 0, sampler_seed=0)
    assert len(set(alone)) > 1  # it really samples
    assert _seeded_tokens(7, 0, 3, sampler_seed=0) == alone
    assert _seeded_tokens(7, 2, 3, sampler_seed=1) == alone
    assert _seeded_tokens(7, 5, 5, sampler_seed=2) == alone
    assert _seeded_tokens(8, 0, 0, sampler_seed=0) != alone


def test_unseeded_requests_vary():
    logits = torch.zeros(2, 1000)  # uniform
    sampler = Sampler(seed=0)
    requests = [make_request("a", 1), make_request("b", 1)]
    draws = [sampler(logits.clone(), requests).token_ids for _ in range(10)]
    assert len({d[0] for d in draws}) > 5
    assert sum(d[0] != d[1] for d in draws) > 5
    # A second sampler seeded alike repeats the unseeded draws: the engine's seed holds.
    again = Sampler(seed=0)
    assert [again(logits.clone(), requests).token_ids for _ in range(10)] == draws


def test_logprobs_of_the_chosen_token_rank_and_top_k():
    torch.manual_seed(1)
    logits = torch.randn(4, 30)
    requests = [
        make_request("a", 1, temperature=0.0, logprobs=3),
        make_request("b", 1, temperature=0.5, top_k=5, logprobs=2),  # processing ignored
        make_request("c", 1, temperature=1.0),  # no logprobs asked
        make_request("d", 1, temperature=1.3, top_p=0.9, logprobs=0),
    ]
    out = Sampler(seed=0)(logits.clone(), requests)
    reference = torch.log_softmax(logits, dim=-1)
    assert out.logprobs[2] is None
    for row, k in ((0, 3), (1, 2), (3, 0)):
        token = out.token_ids[row]
        chosen, rank, top_ids, top_values = out.logprobs[row]
        assert chosen == pytest.approx(reference[row, token].item(), abs=1e-6)
        order = reference[row].argsort(descending=True).tolist()
        assert rank == order.index(token) + 1
        assert top_ids == order[:k]
        assert top_values == pytest.approx(reference[row, order[:k]].tolist(), abs=1e-6)
    assert out.logprobs[0][1] == 1  # greedy picks rank 1


def test_logprobs_are_of_the_raw_logits_even_while_min_tokens_masks_eos():
    logits = torch.tensor([[0.0, 1.0, 4.0, 2.0]])  # EOS (2) is the argmax
    request = make_request("a", 1, temperature=0.0, min_tokens=2, logprobs=2)
    out = Sampler(seed=0)(logits.clone(), [request])
    reference = torch.log_softmax(logits, dim=-1)[0]
    assert out.token_ids == [3]  # EOS masked: the next best
    chosen, rank, top_ids, top_values = out.logprobs[0]
    assert chosen == pytest.approx(reference[3].item(), abs=1e-6)
    assert rank == 2
    assert top_ids == [2, 3]
    assert top_values == pytest.approx(reference[[2, 3]].tolist(), abs=1e-6)


def test_apply_min_tokens_masks_eos_and_stop_tokens_until_min_tokens():
    below = make_request("below", 1, min_tokens=2, stop_token_ids=[5])
    below.append_token(9)  # 1 output token < 2
    reached = make_request("reached", 1, min_tokens=1, stop_token_ids=[5])
    reached.append_token(9)
    ignoring = make_request("ignoring", 1, min_tokens=3, stop_token_ids=[6], ignore_eos=True)
    logits = torch.zeros(3, 8)
    apply_min_tokens(logits, [below, reached, ignoring])
    inf = float("-inf")
    assert logits.tolist() == [
        [0, 0, inf, 0, 0, inf, 0, 0],  # EOS (2) and stop token 5
        [0] * 8,
        [0, 0, 0, 0, 0, 0, inf, 0],  # ignore_eos: only the stop token
    ]


def test_sampling_never_picks_eos_below_min_tokens():
    logits = torch.zeros(NUM_DRAWS // 10, 4)
    logits[:, EOS] = 5.0  # EOS would win ~ 98% of draws
    request = make_request("a", 1, min_tokens=1)
    tokens = Sampler(seed=0)(logits, [request] * logits.shape[0]).token_ids
    assert EOS not in tokens
    assert set(tokens) == {0, 1, 3}


def test_values_beyond_the_tensors_range_are_clamped_not_fatal():
    """top_k above the vocabulary (even 2**63, past int64) keeps every token; a temperature
    past float32's range flattens the distribution instead of making NaNs of -inf logits."""
    logits = torch.tensor(np.log(PROBS), dtype=torch.float32)[None, :].repeat(2, 1)
    requests = [make_request("k", 1, temperature=1.0, top_k=2**63, seed=3),
                make_request("t", 1, temperature=1e300, min_tokens=1, seed=4)]
    draws = []
    for _ in range(400):
        draws.append(Sampler(seed=0)(logits.clone(), requests).token_ids)
        for r in requests:
            r.generator.manual_seed(len(draws))
    tokens = np.array(draws)
    assert set(tokens[:, 0]) == set(range(len(PROBS)))  # the whole support, none cut
    assert EOS not in set(tokens[:, 1])  # min_tokens still masks EOS, no NaN rows
    assert set(tokens[:, 1]) == set(range(len(PROBS))) - {EOS}


def test_inverse_cdf_maps_each_uniform_to_the_token_whose_mass_it_lands_in():
    """The draw behind Sampler._sample: u in [0, 1) picks the first token whose cumulative
    mass exceeds u times the total; a token of probability 0 is never picked, and the
    running sum has the resolution to reach a token far below float32's."""
    probs = torch.tensor([[0.2, 0.0, 0.5, 0.3], [1.4, 0.0, 3.5, 2.1]])  # the second: x7
    for u, want in ((0.0, 0), (0.19, 0), (0.21, 2), (0.69, 2), (0.71, 3), (0.999999, 3)):
        got = _inverse_cdf(probs, torch.tensor([u, u], dtype=torch.float64))
        assert got.tolist() == [want, want], (u, got)
    sweep = torch.linspace(0, 1, 10_001, dtype=torch.float64)[:-1]
    picked = _inverse_cdf(probs[:1].expand(len(sweep), -1), sweep)
    assert 1 not in picked.tolist() and set(picked.tolist()) == {0, 2, 3}
    # each token's share of the sweep is its probability
    assert [round(float((picked == t).double().mean()), 3) for t in (0, 2, 3)] == [0.2, 0.5, 0.3]
    tiny = torch.full((1, 100_001), 1e-5)
    tiny[0, -1] = 1e-12  # ~1e-12 of the mass, after 100k tokens: float32 sums lose it
    u = 1 - 0.5e-12 / float(tiny.double().sum())
    assert _inverse_cdf_flat(tiny, torch.tensor([[u]], dtype=torch.float64)).item() == 100_000
    # the largest float64 below 1 can put the target at the total: the last possible token
    # is drawn, not the zero-probability tail after it
    top = torch.tensor([1 - 2.0**-53] * 2, dtype=torch.float64)
    assert _inverse_cdf(probs, top).tolist() == [3, 3]
    tail = torch.tensor([[0.25, 0.5, 0.25, 0.0, 0.0]])
    assert _inverse_cdf_flat(tail, top[:1, None]).item() == 2


def test_inverse_cdf_in_blocks_picks_what_the_flat_sum_picks():
    """Large vocabularies go block first, then token: the same token as one float64 sum over
    the row for almost every u (they may part only where rounding puts u on a boundary),
    never one of probability 0, and the lone possible token of a row always."""
    torch.manual_seed(0)
    probs = torch.rand(6, 49_999) ** 8  # peaky, with a vocabulary no multiple of the block
    probs[probs < 0.05] = 0.0  # most tokens impossible
    probs[3] = 0.0
    probs[3, 12_345] = 1e-3
    same = total = 0
    for row_u in torch.rand(2000, 6, dtype=torch.float64):
        got = _inverse_cdf(probs, row_u)
        want = _inverse_cdf_flat(probs, row_u[:, None])
        assert bool((probs[torch.arange(6), got] > 0).all())
        assert got[3].item() == 12_345
        same += int((got == want).sum())
        total += got.numel()
    assert same / total > 0.999, same / total
