"""AWQ checkpoints (AutoAWQ's GEMM layout) into brim's packed layout.

Published layout, per linear layer (K = in_features, N = out_features, 4 bits):

    qweight  int32 [K, N / 8]   columns packed along N in AWQ's interleaved order: slot i of
                                word c (bits 4i) holds column 8c + ORDER[i]
    qzeros   int32 [G, N / 8]   the same packing, zeros as they are (no offset)
    scales   fp16  [G, N]

    W^T[k, n] = (q[k, n] - z[k // group_size, n]) * s[k // group_size, n]

brim repacks qweight along K (rows) in natural order; zeros are unpacked and repacked in
natural order along N.
"""

from __future__ import annotations

import torch
from brim.kernels.quant_reference import pack_rows, unpack_cols
from brim.runtime.planner.quantization import QuantizationSpec

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # slot -> column within the word's 8
TENSORS = ("qweight", "qzeros", "scales")


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C / 8] in AWQ order -> int32 [R, C] in natural column order."""
    slots = unpack_cols(packed, 4)  # [R, C]: column 8c + i holds slot i
    rows, cols = slots.shape
    inverse = torch.tensor(ORDER).argsort()  # column j within the word came from slot inverse[j]
    return slots.view(rows, cols // 8, 8)[:, :, inverse].reshape(rows, cols)


def convert(spec: QuantizationSpec, module: str, parts: dict) -> dict:
    for leaf in TENSORS:
        if leaf not in parts:
            raise ValueError(f"AWQ checkpoint: {module} lacks `{leaf}` (has {sorted(parts)})")
    q = unpack_awq(parts["qweight"])  # [K, N]
    in_features = q.shape[0]
    group_size = in_features if spec.group_size == -1 else spec.group_size
    return {"qweight": pack_rows(q, 4), "zeros": unpack_awq(parts["qzeros"]),
                "scales": parts["scales"], "perm": None, "in_features": in_features,
                "group_size": group_size}
