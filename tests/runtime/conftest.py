"""Fixtures shared by the runtime tests: the bundled model and transformers' reference."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def bundled_model_dir():
    from brim.runtime.models.bundled import bundled_model_path

    return bundled_model_path()


# One tensor-parallel engine over the bundled SmolLM2 (9 heads, 3 KV heads: one per rank) for
# the whole session, shared by the parity test (48 blocks of 16 force preemption) and the
# openai-client tests: its three processes start once.
TP3_ENGINE_KWARGS = dict(dtype="float32", max_model_len=768, num_gpu_blocks=48, max_num_seqs=64,
                         block_size=16, seed=0)


@pytest.fixture(scope="session")
def tp3_engine(bundled_model_dir):
    from brim.runtime.config import EngineConfig
    from brim.runtime.engine.engine import Engine

    engine = Engine(EngineConfig.create(bundled_model_dir, device="cpu", tensor_parallel_size=3,
                                        **TP3_ENGINE_KWARGS))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def hf_bundled_model(bundled_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(bundled_model_dir, dtype=torch.float32).eval()


def hf_greedy(model, prompt_ids: list[int], num_new_tokens: int) -> list[int]:
    """transformers' own forward with its own KV cache, greedy, not stopping at EOS.

    Written out instead of `generate()` so EOS handling cannot differ: brim runs these
    with ignore_eos=True.
    """
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode():
        ids = torch.tensor([prompt_ids], device=device)
        out = model(input_ids=ids, use_cache=True)
        generated = []
        for _ in range(num_new_tokens):
            token = int(out.logits[0, -1].argmax())
            generated.append(token)
            out = model(input_ids=torch.tensor([[token]], device=device),
                        past_key_values=out.past_key_values, use_cache=True)
        return generated
