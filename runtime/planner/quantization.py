"""Quantized weights: which schemes brim serves, read from config.json, and what they weigh.

Torch-free (the planner and the operator use it). The engine's side, the layers that
compute with packed weights, is `brim.runtime.models.quantization`.

A checkpoint declares its scheme in config.json's `quantization_config`; `--quantization
fp8` quantizes an ordinary 16/32-bit checkpoint while loading. Anything else is refused by
name before a weight is read, with the list of what is served.
"""

from __future__ import annotations

from dataclasses import dataclass

# `--quantization` values (vLLM's names) and what each means.
METHODS = ("gptq", "awq", "fp8")
# Linear layers a scheme replaces: every projection inside a decoder layer; the embedding
# and lm_head stay in the model dtype.
LINEAR_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                   "down_proj")
FP8_E4M3_MAX = 448.0  # largest finite float8_e4m3fn


@dataclass(frozen=True, slots=True)
class QuantizationSpec:
    """How a checkpoint's linear weights are stored, and how brim computes with them.

    method: "gptq", "awq" or "fp8".
    bits: 4 or 8 (GPTQ/AWQ integers; 8 for FP8).
    group_size: input rows sharing one scale and zero (GPTQ/AWQ); -1 = one group per
        column (the whole input dimension).
    desc_act: GPTQ's act-order: rows are quantized in a permuted order and `g_idx` names
        each row's group.
    sym: symmetric GPTQ (zeros fixed at 2^(bits-1); stored anyway).
    zero_offset: GPTQ's v1 checkpoint format stores zero - 1 (1); gptq_v2 and AWQ store the
        zero itself (0).
    on_load: fp8 only: quantize a 16/32-bit checkpoint while loading (`--quantization fp8`)
        rather than read FP8 weights.
    fp8_scales: fp8 checkpoints: "tensor" or "channel" (compressed-tensors' strategy; the
        `fp8` format may hold either shape, read per tensor).
    """

    method: str
    bits: int
    group_size: int = -1
    desc_act: bool = False
    sym: bool = True
    zero_offset: int = 0
    on_load: bool = False
    fp8_scales: str = "tensor"

    @property
    def pack_factor(self) -> int:
        """Integers per int32 word (GPTQ/AWQ)."""
        return 32 // self.bits

    def describe(self) -> str:
        if self.method == "fp8":
            return "fp8 (quantized while loading)" if self.on_load else "fp8"
        group = "per column" if self.group_size == -1 else f"group {self.group_size}"
        act = ", desc_act" if self.desc_act else ""
        return f"{self.method} {self.bits}-bit, {group}{act}"


SUPPORTED = ("GPTQ (quant_method gptq: 4 or 8 bits, any group size, desc_act), "
             "AWQ (quant_method awq, GEMM layout: 4 bits), FP8 (quant_method fp8 or "
             "compressed-tensors float-quantized 8-bit weights, per-tensor or per-channel "
             "scales), or --quantization fp8 on a float16/bfloat16/float32 checkpoint")


def _refuse(what: str) -> ValueError:
    return ValueError(f"unsupported quantization: {what}. brim serves {SUPPORTED}")


def checkpoint_quantization(hf_config: dict) -> QuantizationSpec | None:
    """The scheme config.json's `quantization_config` declares (None: plain weights)."""
    qc = hf_config.get("quantization_config")
    if not qc:
        return None
    method = str(qc.get("quant_method", "")).lower()
    if method == "gptq":
        return _gptq(qc)
    if method == "awq":
        return _awq(qc)
    if method == "fp8":
        if qc.get("weight_block_size"):
            raise _refuse(f"fp8 with block-wise scales (weight_block_size "
                          f"{qc['weight_block_size']})")
        if str(qc.get("fmt", "e4m3")).lower() != "e4m3":
            raise _refuse(f"fp8 format {qc.get('fmt')!r} (only e4m3 weights are served)")
        return QuantizationSpec(method="fp8", bits=8)
    if method == "compressed-tensors":
        return _compressed_tensors(qc)
    raise _refuse(f"quant_method {method or '(missing)'!r} in config.json's "
                  "quantization_config")


def _gptq(qc: dict) -> QuantizationSpec:
    bits = int(qc.get("bits", 4))
    if bits not in (4, 8):
        raise _refuse(f"gptq with bits={bits} (brim packs 4 and 8 bits)")
    group_size = int(qc.get("group_size", 128))
    if group_size != -1 and group_size < 1:
        raise _refuse(f"gptq with group_size={group_size} (use -1 or a positive size)")
    fmt = str(qc.get("checkpoint_format", "gptq")).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise _refuse(f"gptq checkpoint_format {fmt!r} (gptq and gptq_v2 are served)")
    if qc.get("lm_head"):
        raise _refuse("gptq with a quantized lm_head")
    return QuantizationSpec(method="gptq", bits=bits, group_size=group_size,
                            desc_act=bool(qc.get("desc_act", False)),
                            sym=bool(qc.get("sym", True)),
                            zero_offset=1 if fmt == "gptq" else 0)


def _awq(qc: dict) -> QuantizationSpec:
    bits = int(qc.get("bits", qc.get("w_bit", 4)))
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm":
        raise _refuse(f"awq version {version!r} (the GEMM layout is served)")
    if bits != 4:
        raise _refuse(f"awq with bits={bits} (AWQ's GEMM layout is 4-bit)")
    if qc.get("zero_point", True) is False:
        raise _refuse("awq without zero points")
    group_size = int(qc.get("group_size", qc.get("q_group_size", 128)))
    return QuantizationSpec(method="awq", bits=4, group_size=group_size, sym=False)


def _compressed_tensors(qc: dict) -> QuantizationSpec:
    groups = qc.get("config_groups") or {}
    strategies = set()
    for name, group in groups.items():
        weights = group.get("weights") or {}
        if (weights.get("type") != "float" or int(weights.get("num_bits", 0)) != 8):
            raise _refuse(f"compressed-tensors group {name!r} with {weights.get('num_bits')}-"
                          f"bit {weights.get('type')} weights (FP8 float weights are served)")
        strategy = weights.get("strategy", "tensor")
        if strategy not in ("tensor", "channel"):
            raise _refuse(f"compressed-tensors FP8 with {strategy!r} weight scales "
                          "(per-tensor and per-channel are served)")
        strategies.add(strategy)
        activations = group.get("input_activations")
        if activations and activations.get("type") not in (None, "float"):
            raise _refuse(f"compressed-tensors group {name!r} with "
                          f"{activations.get('type')} activations")
    if not strategies:
        raise _refuse("compressed-tensors without config_groups")
    fmt = str(qc.get("format", "float-quantized"))
    if fmt not in ("float-quantized", "naive-quantized"):
        raise _refuse(f"compressed-tensors format {fmt!r} (float-quantized is served)")
    return QuantizationSpec(method="fp8", bits=8,
                            fp8_scales="channel" if strategies == {"channel"} else "tensor")


def resolve_quantization(requested: str | None, hf_config: dict) -> QuantizationSpec | None:
    """The scheme the engine serves: the checkpoint's, checked against `--quantization`.

    Raises ValueError naming the scheme when it is not served, or when the request does not
    match the checkpoint (a GPTQ checkpoint cannot be served as AWQ).
    """
    declared = checkpoint_quantization(hf_config)
    name = None if requested in (None, "", "none", "auto") else str(requested).lower()
    if name is not None and name not in METHODS:
        raise _refuse(f"--quantization {requested!r}")
    if declared is not None:
        if name is not None and name != declared.method:
            raise ValueError(
                f"--quantization {name} does not match the checkpoint, whose config.json "
                f"declares {declared.method}; drop --quantization (brim reads the "
                "checkpoint's scheme) or pass a different checkpoint")
        return declared
    if name is None:
        return None
    if name != "fp8":
        raise ValueError(
            f"--quantization {name} needs a checkpoint quantized with {name.upper()} (its "
            "config.json declares quantization_config); this one holds plain weights. Use "
            "--quantization fp8 to quantize it while loading, or pass a quantized checkpoint")
    return QuantizationSpec(method="fp8", bits=8, fp8_scales="channel", on_load=True)


# -- what a quantized checkpoint weighs in brim -------------------------------------------------


def _module_of(name: str) -> tuple[str, str]:
    module, _, leaf = name.rpartition(".")
    return module, leaf


def is_quantized_linear(module_name: str) -> bool:
    """A decoder-layer projection (the layers a scheme replaces)."""
    return ".layers." in f".{module_name}" and module_name.endswith(LINEAR_SUFFIXES)


def quantized_tensor_bytes(spec: QuantizationSpec, name: str, shape: tuple,
                           shapes: dict[str, tuple]) -> int | None:
    """Bytes brim holds for one checkpoint tensor under `spec`, or None where the plain rule
    applies (floats converted to the serving dtype, integers kept as stored).

    shapes: every tensor's shape by name (a scale's size follows its weight's).
    """
    module, leaf = _module_of(name)
    num = 1
    for d in shape:
        num *= d
    if spec.method in ("gptq", "awq"):
        if leaf == "g_idx":  # kept as the row permutation only under act-order, once per
            # fused layer (q/k/v and gate/up share their input, hence their permutation)
            shared = module.endswith((".k_proj", ".v_proj", ".up_proj"))
            return num * 4 if spec.desc_act and not shared else 0
        return None
    # fp8
    if leaf in ("input_scale", "output_scale", "k_scale", "v_scale", "kv_scale"):
        return 0  # read into Python floats (activations are scaled dynamically)
    if leaf == "weight_scale" or leaf == "weight_scale_inv":
        rows = shapes.get(f"{module}.weight", (1,))[0]
        return rows * 4  # float32, one per output channel
    if spec.on_load and leaf == "weight" and is_quantized_linear(module) and len(shape) == 2:
        return num * 1 + shape[0] * 4  # float8 weight + float32 per-channel scale
    return None


def dequant_workspace_bytes(spec: QuantizationSpec | None, linear_shapes: list[tuple[int, int]],
                            dtype_bytes: int, device: str) -> int:
    """Temporary memory of a dequantized weight during a matmul, beyond activations.

    GPU: GPTQ/AWQ dequantize inside the Triton kernel (none); FP8 runs `torch._scaled_mm`
    on an FP8 copy of the activations, counted as the largest layer's dequantized weight
    (the fallback on GPUs without FP8 matmuls, an upper bound). CPU: the torch path
    dequantizes one weight at a time, in the model dtype plus its float32 intermediate.
    linear_shapes: (out_features, in_features) of the quantized layers (fused as served).
    """
    if spec is None or not linear_shapes:
        return 0
    largest = max(n * k for n, k in linear_shapes)
    if device == "cpu":
        return largest * (dtype_bytes + 4)
    if spec.method == "fp8":
        return largest * dtype_bytes
    return 0
