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
        # The op compiled regions call: the C++ one where brim's CPU library is built (a
        # call through the Python custom op below costs ~7 us more, 120 times a step).
        from brim.kernels.cpu_decode import packed_linear_op

        self.compiled_op = packed_linear_op() or packed_linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [tokens, in_features] -> [tokens, out_features]
        if torch.compiler.is_compiling():
            return self.compiled_op(x, self.packed_weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none",
                                                  [], "")


# Inside a compiled region (models/compiled.py) the matmul is an opaque custom op: inductor's
# own lowering of mkldnn._linear_pointwise accepts only weights frozen into the graph as
# constants, which would compile every layer separately. As an op it stays oneDNN's call,
# and inductor fuses the pointwise work on either side of it.
@torch.library.custom_op("brim::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, packed_weight: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight, bias, "none", [], "")


@packed_linear.register_fake
def _(x, packed_weight, bias):
    # The packed weight's shape is the plain one, [out_features, in_features].
    return x.new_empty(*x.shape[:-1], packed_weight.shape[0])


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
