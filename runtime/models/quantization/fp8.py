"""FP8 weights: read from FP8 checkpoints, or quantized from float weights while loading.

Published layouts (per linear layer, N = out_features, K = in_features):

- `quant_method: fp8` (AutoFP8, llm-compressor's older format) and compressed-tensors'
  `float-quantized`: `weight` float8_e4m3fn [N, K]; `weight_scale` float32, per tensor
  ([] or [1]) or per channel ([N, 1] or [N]); optional `input_scale` (static activation
  scale; brim scales activations dynamically and ignores it). W = weight x weight_scale.

brim keeps `weight` as stored and one float32 scale per output channel (a per-tensor scale
is repeated), so q, k and v fuse into one layer even when their scales differ.
"""

from __future__ import annotations

import torch
from brim.runtime.planner.quantization import FP8_E4M3_MAX

SCALE_NAMES = ("weight_scale", "weight_scale_inv")
IGNORED = ("input_scale",)


def channel_scales(module: str, scale: torch.Tensor, out_features: int) -> torch.Tensor:
    """A per-tensor or per-channel weight scale as float32 [out_features]."""
    scale = scale.float().reshape(-1)
    if scale.numel() == 1:
        return scale.expand(out_features).clone()
    if scale.numel() != out_features:
        raise ValueError(f"FP8 checkpoint: {module}.weight_scale has {scale.numel()} values "
                         f"for {out_features} output channels; brim reads per-tensor and "
                         "per-channel scales (block-wise scales are not served)")
    return scale


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A float weight [N, K] -> (float8_e4m3fn weight, float32 scale [N]): each output
    channel scaled so that its largest magnitude maps to e4m3's 448."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / FP8_E4M3_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    q = (w / scale[:, None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale
