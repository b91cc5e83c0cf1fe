"""The Llama family against transformers: tiny random-weight Llama (GQA, llama3 RoPE),
Mistral (sliding window) and Qwen2 (q/k/v biases, tied embeddings) checkpoints, saved by
transformers and served by brim, give the same greedy tokens.

No bundled model is needed (a word-level tokenizer stands in), so these stay in the quick
`-m "not slow"` loop; the real model's parity is tests/runtime/engine/test_parity.py.
"""

from __future__ import annotations

import pytest
import torch

from brim.runtime import LLM, SamplingParams
from tests.runtime.conftest import hf_greedy


def write_tokenizer(path, vocab_size: int) -> None:
    """A word-level tokenizer over `t0` .. `t{vocab_size - 1}`: enough for the engine's
    tokenizer and detokenizer, built in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0", bos_token="t1",
                            eos_token="t2").save_pretrained(path)


def _tiny_checkpoint(tmp_path, family: str):
    """A random-weight checkpoint of a real architecture, saved by transformers."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM)

    common = dict(vocab_size=49152, hidden_size=64, intermediate_size=160,
                  num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
                  max_position_embeddings=512, initializer_range=0.1, eos_token_id=2,
                  bos_token_id=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    if family == "llama":
        config = LlamaConfig(**common, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
        model = LlamaForCausalLM(config)
    elif family == "mistral":
        config = MistralConfig(**{**common, "num_key_value_heads": 4}, sliding_window=24)
        model = MistralForCausalLM(config)
    else:
        config = Qwen2Config(**{**common, "tie_word_embeddings": True})
        model = Qwen2ForCausalLM(config)
        with torch.no_grad():  # random q/k/v biases, so a dropped bias cannot pass
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                             layer.self_attn.v_proj):
                    proj.bias.normal_(std=0.5)
    path = tmp_path / family
    model.save_pretrained(path, safe_serialization=True)
    write_tokenizer(path, common["vocab_size"])
    return path, model.eval()


@pytest.mark.parametrize("enforce_eager", [False, True], ids=["compiled", "eager"])
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_tiny_random_models_match_transformers(tmp_path, family, enforce_eager, monkeypatch):
    from brim.runtime.models import compiled

    # The steps here are of 32 tokens at most: through the compiled graphs, not the fused
    # C++ ops that steps under MIN_COMPILED_TOKENS take (test_compiled.py covers both).
    monkeypatch.setattr(compiled, "MIN_COMPILED_TOKENS", 2)
    path, hf_model = _tiny_checkpoint(tmp_path, family)
    generator = torch.Generator().manual_seed(1)
    lengths = [5, 17, 40, 90]  # past the Mistral window of 24, across block boundaries
    prompts = [torch.randint(3, 49152, (n,), generator=generator).tolist() for n in lengths]
    want = [hf_greedy(hf_model, p, 24) for p in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    # A small step budget so prefill is chunked and sequences mix prefill and decode.
    llm = LLM(str(path), dtype="float32", device="cpu", max_num_batched_tokens=32,
              max_num_seqs=4, num_gpu_blocks=64, enforce_eager=enforce_eager)
    assert llm.engine.config.compiles_model is not enforce_eager
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert got == want
