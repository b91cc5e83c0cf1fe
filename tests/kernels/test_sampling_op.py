"""The C++ draw (kernels/cpu_sampling.cpp, `brim_cpu::sample_rows`) against a float64
reference: softmax of the logits in float64 by torch, and the token whose cumulative mass
a uniform lands in. The sampler-level checks (frequencies under top-k / top-p / min-p, seeds,
greedy rows) run through this op on CPU, and through the torch path it replaces, in
tests/runtime/engine/test_sampler.py."""

from __future__ import annotations

import pytest
import torch

from brim.kernels.cpu_decode import sample_op
from brim.runtime.engine.sampler import _inverse_cdf_flat


@pytest.fixture(scope="module")
def op():
    op = sample_op()
    assert op is not None, "the C++ kernels did not build"
    return op


def _reference_cdf(logits: torch.Tensor) -> torch.Tensor:
    """Per row, the cumulative float64 softmax (masked logits weigh 0)."""
    return logits.double().softmax(dim=-1).cumsum(dim=-1)


@pytest.mark.parametrize("vocab", [7, 256, 1000, 49_152, 50_001])
def test_a_uniform_inside_a_tokens_mass_draws_that_token(op, vocab):
    torch.manual_seed(vocab)
    logits = torch.randn(4, vocab) * 4
    logits[1, ::3] = float("-inf")  # a top-k / min_tokens style mask
    cdf = _reference_cdf(logits)
    start = torch.nn.functional.pad(cdf[:, :-1], (1, 0))
    mass = cdf - start
    for _ in range(25):
        # a token per row, chosen in proportion to its mass, then u at its mass's middle
        tokens = torch.multinomial(mass.float().clamp(min=0), 1)[:, 0]
        rows = torch.arange(4)
        u = (start[rows, tokens] + mass[rows, tokens] / 2) / cdf[:, -1]
        got = op(logits, u.contiguous())
        assert got.tolist() == tokens.tolist(), (u, got, tokens)


def test_masked_tokens_are_never_drawn_and_a_lone_token_always_is(op):
    torch.manual_seed(1)
    vocab = 49_999  # no multiple of the 256-token block
    logits = torch.randn(3, vocab) * 8
    logits[0, torch.rand(vocab) < 0.95] = float("-inf")  # most tokens masked
    logits[1] = float("-inf")
    logits[1, 12_345] = -3.0
    logits[2, 300:] = float("-inf")
    logits[2, 255:257] = float("nan")  # weighs 0, like a masked token
    sweep = torch.cat([torch.rand(500, dtype=torch.float64),
                       torch.tensor([0.0, 1 - 1e-16, 0.5], dtype=torch.float64)])
    for u in sweep:
        got = op(logits, u.repeat(3))
        assert torch.isfinite(logits[torch.arange(3), got]).all(), (u, got)
        assert got[1].item() == 12_345


def test_agrees_with_the_torch_inverse_cdf(op):
    """The sampler's torch path (exp(x - max) weights, then _inverse_cdf) draws the same
    token for almost every uniform: they may part only where rounding puts u on a boundary."""
    torch.manual_seed(2)
    logits = torch.randn(8, 49_152) * 3
    weights = (logits - logits.amax(dim=-1, keepdim=True)).exp()
    same = total = 0
    for u in torch.rand(300, 8, dtype=torch.float64):
        got = op(logits, u)
        want = _inverse_cdf_flat(weights, u[:, None])
        same += int((got == want).sum())
        total += got.numel()
    assert same / total > 0.999, same / total


def test_rows_may_be_views_of_a_wider_tensor(op):
    torch.manual_seed(3)
    wide = torch.randn(5, 2048)
    logits = wide[:, :1500]  # rows 2048 apart, as a slice of a padded buffer would be
    u = torch.rand(5, dtype=torch.float64)
    assert op(logits, u).tolist() == op(logits.contiguous(), u).tolist()


def test_bad_inputs_are_refused_with_what_was_expected(op):
    with pytest.raises(RuntimeError, match="float32"):
        op(torch.randn(2, 10, dtype=torch.float64), torch.rand(2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="uniforms float64"):
        op(torch.randn(2, 10), torch.rand(3, dtype=torch.float64))
