"""oneDNN packed linear layers on CPU: the same numbers as nn.Linear, all layers replaced."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from brim.runtime.models.cpu_linear import PackedLinear, is_available, pack_linears

pytestmark = pytest.mark.skipif(not is_available(), reason="this torch has no oneDNN")


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("tokens", [1, 7, 64, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_nn_linear(dtype, tol, tokens, bias):
    torch.manual_seed(0)
    linear = nn.Linear(96, 160, bias=bias).to(dtype)
    x = torch.randn(tokens, 96).to(dtype)
    with torch.inference_mode():
        want = linear(x).float()
        got = PackedLinear(linear)(x).float()
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= tol * max(1.0, want.abs().max().item())


def test_every_linear_of_a_model_is_packed_and_counted():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 4)))
    assert pack_linears(model) == 2
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    from brim.runtime.models.loader import model_weights_bytes

    # Weights now live packed (counted from their unpacked size), biases as parameters.
    assert model_weights_bytes(model) == (8 * 16 + 16 * 4) * 4 + (16 + 4) * 4
