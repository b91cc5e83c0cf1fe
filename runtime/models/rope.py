"""Rotary position embeddings, with the scaling schemes of the Llama family."""

from __future__ import annotations

import math

import torch


def inverse_frequencies(head_dim: int, theta: float, scaling: dict) -> torch.Tensor:
    """Per-pair rotation frequencies [head_dim // 2], float32 (as transformers computes)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    rope_type = scaling["rope_type"]
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise ValueError(
        f"rope scaling type {rope_type!r} is not supported; brim's Llama-family models "
        "support default, linear and llama3"
    )


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, and the band
    # between low_freq_factor and high_freq_factor interpolated smoothly.
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
    high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
    original_len = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = original_len / low_freq_factor
    high_freq_wavelen = original_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    interpolated = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, interpolated, scaled)


class RotaryEmbedding(torch.nn.Module):
    """Rotates q and k by their positions (the rotate-half layout of Llama checkpoints)."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.theta = theta
        self.scaling = scaling
        self.cos_sin: torch.Tensor | None = None  # [max_positions, 2, head_dim], built on load

    def build(self, device: torch.device | str) -> None:
        inv_freq = inverse_frequencies(self.head_dim, self.theta, self.scaling).to(device)
        positions = torch.arange(self.max_positions, device=device, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, head_dim]
        # The sine with rotate_half's sign folded in: rotate_half(x) * sin equals
        # swap_halves(x) * [-sin, sin] exactly (negation commutes with IEEE products).
        half = self.head_dim // 2
        signed_sin = torch.cat((-emb[:, :half].sin(), emb[:, half:].sin()), dim=-1)
        self.cos_sin = torch.stack((emb.cos(), signed_sin), dim=1)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """q: [T, H, D], k: [T, KVH, D] -> both rotated (new tensors)."""
        cos, sin = self._table(positions, q.dtype)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)

    def rotate(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, D] (q's and k's heads side by side, say) -> rotated (a new tensor):
        one pass for all of them, which matters when a step is a few tokens and each op's
        dispatch costs more than its arithmetic."""
        cos, sin = self._table(positions, x.dtype)
        return _rotate(x, cos, sin)

    def _table(self, positions: torch.Tensor, dtype: torch.dtype):
        # Rotate in the activations' dtype like transformers.
        cos_sin = self.cos_sin[positions].to(dtype)  # [T, 2, D]
        return cos_sin[:, None, 0], cos_sin[:, None, 1]


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x2, x1] written as the halves
    swapped times the signed sine (`RotaryEmbedding.build`): the same values, bit for bit, in
    any dtype, from three kernels instead of six."""
    *lead, dim = x.shape
    swapped = x.unflatten(-1, (2, dim // 2)).flip(-2).flatten(-2)
    return x * cos + swapped * signed_sin
