"""GPTQ checkpoints (AutoGPTQ / GPTQModel / optimum) into brim's packed layout.

Published layout, per linear layer (K = in_features, N = out_features, PACK = 32 // bits):

    qweight  int32 [K / PACK, N]   rows packed along K, row k at bits (k % PACK) * bits
    qzeros   int32 [G, N / PACK]   zeros packed along N, column n at bits (n % PACK) * bits;
                                   checkpoint_format "gptq" (v1) stores zero - 1 (mod 2^bits)
    scales   fp16  [G, N]
    g_idx    int32 [K]             group of each input row (i // group_size without
                                   desc_act; a permuted assignment with it)

brim's layout is the same for qweight and scales; zeros lose the v1 offset; with desc_act
the rows are sorted by group (stable) so that groups are consecutive again, and the sort
order becomes `perm`, the column order the layer gathers from its input.
"""

from __future__ import annotations

import torch
from brim.kernels.quant_reference import pack_cols, pack_rows, unpack_cols, unpack_rows
from brim.runtime.planner.quantization import QuantizationSpec

TENSORS = ("qweight", "qzeros", "scales", "g_idx")


def convert(spec: QuantizationSpec, module: str, parts: dict) -> dict:
    """One checkpoint projection (its TENSORS) -> qweight, zeros [G, N] (unpacked), scales,
    perm (or None), in_features."""
    for leaf in ("qweight", "qzeros", "scales"):
        if leaf not in parts:
            raise ValueError(f"GPTQ checkpoint: {module} lacks `{leaf}` (has "
                             f"{sorted(parts)}); the checkpoint is incomplete")
    bits, pack = spec.bits, spec.pack_factor
    qweight = parts["qweight"]
    in_features = qweight.shape[0] * pack
    group_size = in_features if spec.group_size == -1 else spec.group_size
    zeros = (unpack_cols(parts["qzeros"], bits) + spec.zero_offset) & ((1 << bits) - 1)
    perm = None
    if spec.desc_act:
        g_idx = parts.get("g_idx")
        if g_idx is None:
            raise ValueError(f"GPTQ checkpoint with desc_act: {module} lacks `g_idx`")
        perm = torch.sort(g_idx.long(), stable=True).indices
        expected = torch.arange(in_features) // group_size
        if not torch.equal(g_idx.long()[perm], expected):
            raise ValueError(
                f"GPTQ checkpoint: {module}.g_idx does not give every group {group_size} rows "
                "(the act-order layout GPTQ writes); brim cannot serve this g_idx")
        qweight = pack_rows(unpack_rows(qweight, bits)[perm], bits)
        perm = perm.to(torch.int32)
    return {"qweight": qweight, "zeros": zeros, "scales": parts["scales"], "perm": perm,
                "in_features": in_features, "group_size": group_size}


def to_layout(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    return pack_cols(zeros, bits)
