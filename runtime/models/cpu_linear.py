"""Linear layers on CPU through oneDNN, with each weight packed once at load.

torch's default CPU matmul (MKL's sgemm) runs the model's shapes 2-3x slower than oneDNN on
this project's CPUs (AMD Zen 4), and bfloat16 at batch 1 some 20x slower; oneDNN's packed
weights skip the per-call reorder as well (figures: docs/benchmarks.md). vLLM's CPU backend
gets the same from oneDNN. Applied to a loaded model as a transformation, like quantization
would be: the model code keeps its plain `nn.Linear`s.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


def is_available() -> bool:
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class PackedLinear(nn.Module):
    """`nn.Linear`'s forward on a weight packed for oneDNN (inference only).

    num_weight_bytes: the unpacked weight's size (the packed one is opaque).
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.num_weight_bytes = weight.numel() * weight.element_size()
        self.register_buffer("packed_weight",
                             torch.ops.mkldnn._reorder_linear_weight(weight, None),
                             persistent=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [tokens, in_features] -> [tokens, out_features]
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none",
                                                  [], "")


def pack_linears(model: nn.Module) -> int:
    """Replace every nn.Linear in the model by a PackedLinear; the number replaced."""
    if not is_available():
        logger.info("oneDNN is not available in this torch: linear layers stay on MKL")
        return 0
    targets = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children() if isinstance(child, nn.Linear)]
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear(child))
    return len(targets)
