"""Quantization as a transformation of a loaded model: the loader's one hook.

`WeightTransform` sees every checkpoint tensor before the loader does (`take`), keeps the
quantized layers' tensors (and FP8 KV-cache scales), and after the loop replaces those
layers' `nn.Linear`s by the quantized layers of `layers.py` (`apply`), returning their
tensors for the loader to assign. The model code never branches on quantization.

Schemes, one module each: `gptq.py`, `awq.py`, `fp8.py`; which ones a checkpoint uses is
read torch-free by `brim.runtime.planner.quantization` (refused there by name, before a
weight is read).
"""

from __future__ import annotations

import torch
from brim.kernels.quant_reference import pack_cols
from brim.runtime.models.quantization import awq, fp8, gptq
from brim.runtime.models.quantization.layers import Fp8Linear, PackedIntLinear
from brim.runtime.planner.quantization import QuantizationSpec
from torch import nn

# brim's fused projections (models/llama.py) a scheme replaces.
TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
_INT_SCHEMES = {"gptq": gptq, "awq": awq}
# Checkpoint names of FP8 KV-cache scales, under `layers.N.self_attn.`: which cache each
# scales (compressed-tensors writes k_scale/v_scale; AutoFP8 wrote k/v_proj.output_scale;
# older checkpoints one kv_scale for both).
KV_SCALE_SUFFIXES = {"k_scale": ("k",), "v_scale": ("v",), "kv_scale": ("k", "v"),
                     "k_proj.output_scale": ("k",), "v_proj.output_scale": ("v",)}


def _is_target(module: str) -> bool:
    return module.startswith("layers.") and module.rpartition(".")[2] in TARGETS


class WeightTransform:
    """Collects a quantized checkpoint's layers while loading, then swaps them in.

    spec: the scheme served (None: plain weights; only KV-cache scales are read).
    dtype: the model dtype (scales of integer schemes, biases).
    """

    def __init__(self, spec: QuantizationSpec | None, dtype: torch.dtype) -> None:
        self.spec = spec
        self.dtype = dtype
        self.parts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}  # module -> shard -> leaf
        self.kv_scales: dict[str, dict[str, float]] = {}  # attention module -> {"k": s, "v": s}

    def take(self, ckpt_name: str, name: str, shard: int | None, f) -> bool:
        """Keep this checkpoint tensor (True), or leave it to the loader (False).

        name, shard: the loader's mapping of ckpt_name (fused parameter, shard index).
        f: the open safetensors file.
        """
        base = ckpt_name.removeprefix("model.")
        for suffix, caches in KV_SCALE_SUFFIXES.items():
            if base.endswith(f".self_attn.{suffix}"):
                attention = base[: -len(suffix) - 1]
                value = float(f.get_tensor(ckpt_name).float().reshape(-1)[0])
                self.kv_scales.setdefault(attention, {}).update(dict.fromkeys(caches, value))
                return True
        if self.spec is None:
            return False
        module, _, leaf = name.rpartition(".")
        if not _is_target(module):
            return False
        if self.spec.method in _INT_SCHEMES:
            keep = leaf in _INT_SCHEMES[self.spec.method].TENSORS
        elif leaf in fp8.IGNORED:
            return True
        else:
            keep = leaf == "weight" or leaf in fp8.SCALE_NAMES
        if keep:
            shards = self.parts.setdefault(module, {})
            shards.setdefault(shard or 0, {})[leaf] = f.get_tensor(ckpt_name)
        return keep

    def apply(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Replace the collected layers' nn.Linears by quantized layers; their tensors by
        parameter name (the loader assigns them with the rest of the state)."""
        state = {}
        for module, shards in self.parts.items():
            linear = model.get_submodule(module)
            parts = [shards[i] for i in sorted(shards)]
            if self.spec.method in _INT_SCHEMES:
                layer = self._int_layer(module, linear, parts)
            else:
                layer = self._fp8_layer(module, linear, parts)
            if layer is None:  # an FP8 checkpoint's unquantized layer: plain weight
                state[f"{module}.weight"] = torch.cat([p["weight"] for p in parts]).to(self.dtype)
                continue
            parent, _, child = module.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)
            state.update({f"{module}.{n}": p for n, p in layer.named_parameters()
                          if n != "bias"})
        for attention, scales in self.kv_scales.items():
            target = model.get_submodule(attention)
            target.k_scale = scales.get("k", target.k_scale)
            target.v_scale = scales.get("v", target.v_scale)
        return state

    def _int_layer(self, module: str, linear: nn.Linear, parts: list[dict]) -> PackedIntLinear:
        scheme = _INT_SCHEMES[self.spec.method]
        shards = [scheme.convert(self.spec, module, p) for p in parts]
        first = shards[0]
        for other in shards[1:]:
            if (other["perm"] is None) != (first["perm"] is None) or (
                    first["perm"] is not None and not torch.equal(other["perm"], first["perm"])):
                raise ValueError(
                    f"{self.spec.method.upper()} checkpoint: the projections fused into "
                    f"{module} have different g_idx; brim fuses them into one matmul and "
                    "needs one act-order permutation (GPTQ gives projections of the same "
                    "input the same one)")
        qweight = torch.cat([s["qweight"] for s in shards], dim=1)
        zeros = torch.cat([s["zeros"] for s in shards], dim=1)
        scales = torch.cat([s["scales"] for s in shards], dim=1).to(self.dtype)
        in_features, out_features = first["in_features"], scales.shape[1]
        if (in_features, out_features) != (linear.in_features, linear.out_features):
            raise ValueError(
                f"{self.spec.method.upper()} checkpoint: {module} holds a {in_features} x "
                f"{out_features} weight but config.json gives {linear.in_features} x "
                f"{linear.out_features}; the checkpoint does not match its config")
        bias = None if linear.bias is None else nn.Parameter(
            torch.empty(out_features, device="meta"), requires_grad=False)
        return PackedIntLinear(qweight, pack_cols(zeros, self.spec.bits), scales, first["perm"],
                               bias, bits=self.spec.bits, group_size=first["group_size"],
                               in_features=in_features, out_features=out_features)

    def _fp8_layer(self, module: str, linear: nn.Linear, parts: list[dict]) -> Fp8Linear | None:
        weights = [p.get("weight") for p in parts]
        if any(w is None for w in weights):
            raise ValueError(f"FP8 checkpoint: {module} lacks `weight`")
        is_fp8 = [w.dtype == torch.float8_e4m3fn for w in weights]
        if all(is_fp8):
            scales = []
            for p, w in zip(parts, weights):
                scale = next((p[n] for n in fp8.SCALE_NAMES if n in p), None)
                if scale is None:
                    raise ValueError(f"FP8 checkpoint: {module} has an FP8 weight without "
                                     "`weight_scale`")
                scales.append(fp8.channel_scales(module, scale, w.shape[0]))
            weight, scale = torch.cat(weights), torch.cat(scales)
        elif any(is_fp8) or any(w.dtype.is_floating_point is False for w in weights):
            raise ValueError(f"FP8 checkpoint: {module} mixes FP8 and other weights "
                             f"({[str(w.dtype) for w in weights]})")
        elif self.spec.on_load:
            weight, scale = fp8.quantize(torch.cat(weights))
        else:
            return None
        if tuple(weight.shape) != (linear.out_features, linear.in_features):
            raise ValueError(f"FP8 checkpoint: {module} holds a {tuple(weight.shape)} weight, "
                             f"config.json gives {(linear.out_features, linear.in_features)}")
        bias = None if linear.bias is None else nn.Parameter(
            torch.empty(linear.out_features, device="meta"), requires_grad=False)
        return Fp8Linear(weight, scale, bias)
