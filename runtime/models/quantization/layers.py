"""Linear layers that compute with quantized weights; they replace `nn.Linear` at load.

The model code keeps plain `nn.Linear`s; `WeightTransform.apply` swaps in these, so a
quantized model is the same model with different leaves (as gpt-fast does it). Neither is
an `nn.Linear`, so the CPU's oneDNN packing (`cpu_linear.pack_linears`) leaves them alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from brim.kernels import quant_matmul
from brim.runtime.planner.quantization import FP8_E4M3_MAX
from torch import nn


def _frozen(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)


class PackedIntLinear(nn.Module):
    """y = x W^T + b with W as 4/8-bit integers in brim's packed layout (GPTQ and AWQ are
    converted to it; kernels/quant_reference.py draws it).

    qweight int32 [K / PACK, N], qzeros int32 [G, N / PACK], scales [G, N] (model dtype),
    perm int32 [K] (act-order only), bias [N] or None.
    """

    def __init__(self, qweight, qzeros, scales, perm, bias, *, bits: int, group_size: int,
                 in_features: int, out_features: int) -> None:
        super().__init__()
        self.bits, self.group_size = bits, group_size
        self.in_features, self.out_features = in_features, out_features
        self.qweight = _frozen(qweight)
        self.qzeros = _frozen(qzeros)
        self.scales = _frozen(scales)
        self.perm = None if perm is None else _frozen(perm)
        self.bias = None if bias is None else _frozen(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [tokens, in_features] -> [tokens, out_features]
        # The backend follows the device, as the model's attention does: the Triton kernel
        # on CUDA, the torch path on CPU (even where TRITON_INTERPRET=1 is set, as the kernel
        # tests set it: interpreting a whole model's matmuls takes minutes).
        backend = "triton" if x.is_cuda else "torch"
        return quant_matmul(x, self.qweight, self.qzeros, self.scales, self.perm,
                            bits=self.bits, group_size=self.group_size, bias=self.bias,
                            backend=backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, group_size={self.group_size}, act_order="
                f"{self.perm is not None}")


class Fp8Linear(nn.Module):
    """y = x W^T + b with W in float8_e4m3fn and one float32 scale per output channel.

    weight float8_e4m3fn [N, K], weight_scale float32 [N], bias [N] or None.
    """

    def __init__(self, weight, weight_scale, bias) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = _frozen(weight)
        self.weight_scale = _frozen(weight_scale)
        self.bias = None if bias is None else _frozen(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.weight_scale, self.bias)


def has_fp8_matmul(device: torch.device) -> bool:
    """torch._scaled_mm on this device: CUDA compute capability 8.9 (Ada) and later."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] @ (weight [N, K] x weight_scale [N])^T + bias, in x's dtype.

    On FP8 GPUs: x is quantized to e4m3 with one dynamic scale (its absolute maximum), the
    FP8 matmul accumulates in float32, and the per-channel weight scale is applied to the
    float32 result (it factors out of the sum over K). Elsewhere, and on CPU: the weight is
    dequantized (float32, then x's dtype) and multiplied by torch.
    """
    # _scaled_mm wants K and N in multiples of 16.
    if (has_fp8_matmul(x.device) and x.shape[0] > 0 and weight.shape[0] % 16 == 0
            and weight.shape[1] % 16 == 0):
        x_scale = (x.abs().amax().float() / FP8_E4M3_MAX).clamp(min=1e-12)
        x_fp8 = (x.float() / x_scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
        one = torch.ones((), dtype=torch.float32, device=x.device)
        out = torch._scaled_mm(x_fp8, weight.t(), scale_a=x_scale, scale_b=one,
                               out_dtype=torch.float32)
        out = out * weight_scale
        if bias is not None:
            out = out + bias.float()
        return out.to(x.dtype)
    dequantized = (weight.float() * weight_scale[:, None]).to(x.dtype)
    return F.linear(x, dequantized, bias)
