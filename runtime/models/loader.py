"""Load a Hugging Face-format checkpoint straight into brim's modules.

The model is built on the meta device and each parameter is assigned from the
(mmapped) safetensors files, so no weight is ever initialised and then overwritten.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import safe_open

from brim.runtime.models.cpu_linear import PackedLinear, pack_linears
from brim.runtime.models.llama import LlamaForCausalLM
from brim.runtime.models.quantization import WeightTransform
from brim.runtime.planner.dtypes import MODEL_DTYPE_BYTES
from brim.runtime.planner.facts import ModelFacts, safetensors_files
from brim.runtime.planner.quantization import QuantizationSpec

logger = logging.getLogger(__name__)

# architectures (config.json) -> implementation
ARCHITECTURES = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
}
TORCH_DTYPES = {name: getattr(torch, name) for name in MODEL_DTYPE_BYTES}


def model_class(facts: ModelFacts) -> type[LlamaForCausalLM]:
    for arch in facts.architectures:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    raise ValueError(
        f"unsupported architecture {list(facts.architectures)}; brim supports "
        f"{', '.join(ARCHITECTURES)}"
    )


def load_model(path: Path, facts: ModelFacts, dtype: str, device: str,
               group=None, quantization: QuantizationSpec | None = None) -> LlamaForCausalLM:
    """The model with its weights; group (models.parallel.TensorParallelGroup): only this
    rank's share of them, read slice by slice. quantization: the scheme served
    (planner.quantization.resolve_quantization)."""
    cls = model_class(facts)
    files = safetensors_files(path)
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors in {path}; brim loads safetensors checkpoints only "
            "(convert .bin weights with transformers' save_pretrained(safe_serialization=True))"
        )
    # -- tensor parallelism (models/parallel.py): the rank's slices instead of whole tensors
    if group is not None:
        from brim.runtime.models.parallel import load_sharded_model

        model = load_sharded_model(cls, path, facts, TORCH_DTYPES[dtype], device, group)
        return _finish(model, device)
    # --
    with torch.device("meta"):
        model = cls(facts)
    torch_dtype = TORCH_DTYPES[dtype]
    transform = WeightTransform(quantization, torch_dtype)
    params = dict(model.named_parameters())
    state: dict[str, torch.Tensor] = {}
    shards: dict[str, dict[int, torch.Tensor]] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for ckpt_name in f.keys():
                name, shard = model.checkpoint_name_map(ckpt_name)
                if transform.take(ckpt_name, name, shard, f):
                    continue
                if name not in params:
                    if "rotary_emb" in name:
                        continue  # some checkpoints store the derived inv_freq buffer
                    raise ValueError(f"{file.name}: unexpected tensor {ckpt_name!r}")
                tensor = f.get_tensor(ckpt_name).to(torch_dtype)
                if shard is None:
                    state[name] = tensor
                else:
                    shards.setdefault(name, {})[shard] = tensor
    for name, parts in shards.items():
        state[name] = torch.cat([parts[i] for i in sorted(parts)], dim=0)
    state.update(transform.apply(model))  # quantized layers replace their nn.Linears
    params = dict(model.named_parameters())
    if "lm_head.weight" not in state and facts.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    missing = sorted(set(params) - set(state))
    if missing:
        raise ValueError(f"checkpoint {path} lacks tensors for {missing[:5]}")
    state = {name: t.to(device) for name, t in state.items()}
    if facts.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    return _finish(model, device)


def _finish(model: LlamaForCausalLM, device: str) -> LlamaForCausalLM:
    """What every loaded model gets: its RoPE table, inference mode, packed CPU matmuls."""
    model.rotary.build(device)
    model = model.eval().requires_grad_(False)
    if device == "cpu":
        pack_linears(model)
    return model


def model_weights_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's weights (a tied weight once; a packed copy counts on its own)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total + sum(m.num_weight_bytes for m in model.modules()
                       if isinstance(m, PackedLinear))
