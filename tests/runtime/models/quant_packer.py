"""An independent packer for the tests: round-to-nearest quantization of a float model,
written out in GPTQ's, AWQ's and FP8's published checkpoint layouts.

Written from the formats' descriptions, in numpy, sharing no code with brim's loader
(`brim.runtime.models.quantization`), so that a misreading of a layout in one cannot hide
in the other. For each layer it also returns the dequantized weight: the float model that
transformers runs as the reference.

Layouts (K = in_features, N = out_features, PACK = 32 // bits):
- GPTQ: qweight int32 [K/PACK, N] (row k at bits (k % PACK) * bits of word k // PACK),
  qzeros int32 [G, N/PACK] (column n at bits (n % PACK) * bits, storing zero - 1 for the
  v1 format), scales fp16 [G, N], g_idx int32 [K] (with desc_act: a permuted assignment of
  rows to groups, each group group_size rows).
- AWQ (GEMM): qweight int32 [K, N/8] and qzeros int32 [G, N/8], slot i of a word holding
  column 8c + (0, 2, 4, 6, 1, 3, 5, 7)[i]; scales fp16 [G, N]; no zero offset.
- FP8: weight float8_e4m3fn [N, K], weight_scale float32 ([] per tensor, [N, 1] per channel).
"""

from __future__ import annotations

import json

import numpy as np
import torch

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _pack_words(values: np.ndarray, bits: int, axis: int, order=None) -> np.ndarray:
    """Pack unsigned `values` along `axis` into int32 words of 32 // bits slots; slot i
    takes element order[i] of each run of 32 // bits."""
    pack = 32 // bits
    values = np.moveaxis(values.astype(np.uint32), axis, 0)
    runs = values.reshape(values.shape[0] // pack, pack, *values.shape[1:])
    words = np.zeros((runs.shape[0], *values.shape[1:]), dtype=np.uint32)
    for slot in range(pack):
        source = slot if order is None else order[slot]
        words |= runs[:, source] << np.uint32(slot * bits)
    return np.moveaxis(words.view(np.int32), 0, axis)


def rtn(weight: torch.Tensor, bits: int, group_size: int, *, sym: bool, act_order_seed=None):
    """Round-to-nearest quantization of weight [N, K] in groups of input rows.

    Returns (q [K, N], zeros [G, N], scales fp16 [G, N], g_idx [K], dequantized [N, K] f32).
    """
    w = weight.detach().float().numpy().T  # [K, N]
    k_size, n_size = w.shape
    gs = k_size if group_size == -1 else group_size
    order = np.arange(k_size)
    if act_order_seed is not None:  # GPTQ's act-order: groups over a permutation of rows
        order = np.random.default_rng(act_order_seed).permutation(k_size)
    g_idx = np.empty(k_size, dtype=np.int32)
    g_idx[order] = np.arange(k_size) // gs
    num_groups = -(-k_size // gs)
    top = 2**bits - 1
    q = np.zeros((k_size, n_size), dtype=np.int64)
    zeros = np.zeros((num_groups, n_size), dtype=np.int64)
    scales = np.zeros((num_groups, n_size), dtype=np.float16)
    for g in range(num_groups):
        rows = w[g_idx == g]
        if sym:
            scale = np.maximum(np.abs(rows).max(0), 1e-6) * 2 / top
            zero = np.full(n_size, 2 ** (bits - 1))
        else:
            lo, hi = np.minimum(rows.min(0), 0), np.maximum(rows.max(0), 0)
            scale = np.maximum(hi - lo, 1e-6) / top
            zero = np.clip(np.round(-lo / scale.astype(np.float16).astype(np.float32)), 0, top)
        scales[g] = scale.astype(np.float16)
        zeros[g] = zero
    s = scales.astype(np.float32)[g_idx]
    q = np.clip(np.round(w / s) + zeros[g_idx], 0, top).astype(np.int64)
    dequantized = ((q - zeros[g_idx]).astype(np.float32) * s).T
    return q, zeros, scales, g_idx, torch.from_numpy(np.ascontiguousarray(dequantized))


def gptq_tensors(weight, bits, group_size, *, sym, desc_act, seed=0, v1=True):
    q, zeros, scales, g_idx, deq = rtn(weight, bits, group_size, sym=sym,
                                       act_order_seed=seed if desc_act else None)
    stored_zeros = (zeros - 1) & (2**bits - 1) if v1 else zeros
    tensors = {"qweight": _pack_words(q, bits, axis=0),
               "qzeros": _pack_words(stored_zeros, bits, axis=1),
               "scales": scales, "g_idx": g_idx}
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}, deq


def awq_tensors(weight, group_size):
    q, zeros, scales, _, deq = rtn(weight, 4, group_size, sym=False)
    tensors = {"qweight": _pack_words(q, 4, axis=1, order=AWQ_ORDER),
               "qzeros": _pack_words(zeros, 4, axis=1, order=AWQ_ORDER), "scales": scales}
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}, deq


def fp8_tensors(weight, per_channel: bool):
    w = weight.detach().float()
    if per_channel:
        scale = w.abs().amax(dim=1, keepdim=True) / 448.0
    else:
        scale = w.abs().amax() / 448.0
    q = (w / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
    return {"weight": q, "weight_scale": scale.float()}, q.float() * scale


def quantization_config(scheme: str, bits: int = 4, group_size: int = 128, *, sym=False,
                        desc_act=False, per_channel=False, v1=True) -> dict:
    if scheme == "gptq":
        return {"quant_method": "gptq", "bits": bits, "group_size": group_size,
                "desc_act": desc_act, "sym": sym,
                "checkpoint_format": "gptq" if v1 else "gptq_v2"}
    if scheme == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group_size,
                "zero_point": True, "version": "gemm"}
    if scheme == "compressed-tensors":
        return {"quant_method": "compressed-tensors", "format": "float-quantized",
                "config_groups": {"group_0": {
                    "targets": ["Linear"],
                    "weights": {"num_bits": 8, "type": "float", "symmetric": True,
                                "strategy": "channel" if per_channel else "tensor"},
                    "input_activations": {"num_bits": 8, "type": "float", "dynamic": True}}},
                "ignore": ["lm_head"]}
    return {"quant_method": "fp8", "activation_scheme": "dynamic"}


def write_quantized(hf_model, folder, scheme: str, *, bits=4, group_size=128, sym=False,
                    desc_act=False, per_channel=False, v1=True, tokenizer_from=None) -> None:
    """Quantize hf_model's decoder projections, write the packed checkpoint to `folder`, and
    load the dequantized weights into hf_model (in place): it becomes the reference."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, tensor in hf_model.state_dict().items():
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and module.rpartition(".")[2] in LINEARS:
            if scheme == "gptq":
                packed, deq = gptq_tensors(tensor, bits, group_size, sym=sym, desc_act=desc_act,
                                           seed=int(module.split(".")[2]), v1=v1)
            elif scheme == "awq":
                packed, deq = awq_tensors(tensor, group_size)
            else:
                packed, deq = fp8_tensors(tensor, per_channel)
            state.update({f"{module}.{k}": v for k, v in packed.items()})
            with torch.no_grad():
                hf_model.get_submodule(module).weight.copy_(deq)
        elif name == "lm_head.weight" and hf_model.config.tie_word_embeddings:
            continue
        else:
            state[name] = tensor.detach().clone().contiguous()
    save_file(state, str(folder / "model.safetensors"))
    config = hf_model.config.to_dict()
    config["architectures"] = [type(hf_model).__name__]
    config["quantization_config"] = quantization_config(
        scheme, bits, group_size, sym=sym, desc_act=desc_act, per_channel=per_channel, v1=v1)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    if tokenizer_from is not None:
        for path in tokenizer_from.iterdir():
            if path.name.startswith(("tokenizer", "special_tokens")) or path.suffix == ".jinja":
                (folder / path.name).write_bytes(path.read_bytes())
