"""The `fake_hub` fixture: a fake Hugging Face Hub (tests/hub_server.py) for a test; and
`tiny_llama`, a small real checkpoint to serve from it.

Import it into a test module (`from tests.hub_fixtures import fake_hub`); the one server is
started on first use and shared by the whole session, the repositories and request log are
the test's own. The fixture points huggingface_hub's environment at it (HF_ENDPOINT, and
HF_HOME in the test's tmp_path, with no token and offline mode off), so that code reading the
environment when it runs (`brim.runtime.models.hub`, a `brim serve` subprocess) reaches the
fake hub and an empty cache. huggingface_hub itself reads HF_ENDPOINT and HF_HOME once, at
import: pass `endpoint=fake_hub.url` (and a cache_dir) to its functions called directly.

    def test_download(fake_hub, tmp_path):
        sha = fake_hub.add_repo("org/tiny", checkpoint_folder)          # branch main
        fake_hub.add_repo("org/gated", checkpoint_folder, token="hf_secret")
        path = resolve_model("hf://org/tiny")
        assert set(fake_hub.bytes_sent("org/tiny")) == {"config.json", ...}
"""

from __future__ import annotations

import atexit
import functools
import json
from pathlib import Path

import pytest

from tests.hub_server import FakeHub


@functools.cache
def hub_server() -> FakeHub:
    """The session's fake hub, started on first use and stopped when the process exits."""
    hub = FakeHub()
    atexit.register(hub.close)
    return hub


@pytest.fixture
def fake_hub(monkeypatch, tmp_path) -> FakeHub:
    hub = hub_server()
    hub.reset()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
                 "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # The library fixed the stored login's path and offline mode at import: a developer's own
    # `hf auth login` must not reach the fake hub, nor a shell's HF_HUB_OFFLINE stop it.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    yield hub
    hub.reset()


# The tiny checkpoint's shape: big enough (2.6 MB of fp32 weights) that reading a weight file
# instead of its header shows in the request log; small enough to save and run in a second.
TINY_LLAMA = dict(vocab_size=4096, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  initializer_range=0.1, bos_token_id=1, eos_token_id=2,
                  tie_word_embeddings=False)
TINY_MODEL_MAX_LENGTH = 200  # tokenizer_config.json's limit, below max_position_embeddings


def write_tiny_llama(folder: Path, *, max_shard_size: str | None = None,
                     **config_overrides) -> Path:
    """A random-weight LlamaForCausalLM saved by transformers (safetensors, sharded when
    max_shard_size is given) with a word-level tokenizer over t0 .. t4095."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.runtime.models.test_llama import write_tokenizer

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **config_overrides}))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    write_tokenizer(folder, TINY_LLAMA["vocab_size"])
    tokenizer_config = folder / "tokenizer_config.json"
    settings = json.loads(tokenizer_config.read_text())
    tokenizer_config.write_text(json.dumps({**settings,
                                            "model_max_length": TINY_MODEL_MAX_LENGTH}))
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """The tiny checkpoint (one model.safetensors), built once per session; do not modify."""
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
