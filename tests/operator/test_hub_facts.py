"""hub_facts reads an hf:// model's facts from a (fake) Hugging Face Hub — configs and
safetensors headers, never the weights — and they equal what read_checkpoint reads from the
same checkpoint on disk."""

from __future__ import annotations

import json
import shutil
import socket
import struct
import subprocess
import sys

import pytest

from brim.operator.facts import FactsError
from brim.operator.hub import HubUnavailable, hub_facts, read_hub_facts
from brim.runtime.planner.facts import read_checkpoint
from tests.hub_fixtures import (TINY_MODEL_MAX_LENGTH, fake_hub, tiny_llama,  # noqa: F401
                                write_tiny_llama)

# huggingface_hub's first range request for a safetensors header: bytes=0-100000.
FIRST_RANGE_BYTES = 100_001


def assert_same_facts(got, want) -> None:
    assert got == want  # config, tokenizer and generation configs, weights table
    assert got.config == want.config
    assert got.tokenizer_max_length == want.tokenizer_max_length == TINY_MODEL_MAX_LENGTH
    assert got.eos_token_ids == want.eos_token_ids
    for dtype_bytes in (2, 4):
        for tp in (1, 2):
            assert (got.checkpoint_weights_bytes(dtype_bytes, tp)
                    == want.checkpoint_weights_bytes(dtype_bytes, tp))
    assert sorted(got.tensors, key=lambda t: t.name) == sorted(want.tensors,
                                                               key=lambda t: t.name)


def assert_only_headers_read(hub, repo: str, folder) -> None:
    """Each safetensors file was read up to its header (in range requests), not beyond."""
    weights = sorted(p.name for p in folder.glob("*.safetensors"))
    sent = hub.bytes_sent(repo)
    for name in weights:
        size = (folder / name).stat().st_size
        (header_len,) = struct.unpack("<Q", (folder / name).read_bytes()[:8])
        assert size > 10 * FIRST_RANGE_BYTES, "the weights must dwarf a header read"
        assert 0 < sent[name] <= 8 + header_len + FIRST_RANGE_BYTES, (name, sent[name])
    assert all(r.range for r in hub.downloads(repo) if r.filename.endswith(".safetensors"))


def test_facts_equal_the_local_checkpoints_and_read_only_headers(fake_hub, tiny_llama,
                                                                 tmp_path):
    folder = tmp_path / "repo"
    shutil.copytree(tiny_llama, folder)
    (folder / "pytorch_model.bin").write_bytes(b"\0" * 1000)
    commit = fake_hub.add_repo("org/tiny", folder)

    facts, got_commit = read_hub_facts("org/tiny", revision=None, token=None,
                                       endpoint=fake_hub.url)

    assert got_commit == commit
    assert_same_facts(facts, read_checkpoint(tiny_llama))
    assert_only_headers_read(fake_hub, "org/tiny", folder)
    assert set(fake_hub.bytes_sent("org/tiny")) == {
        "config.json", "tokenizer_config.json", "generation_config.json", "model.safetensors"}


def test_sharded_repository(fake_hub, tmp_path):
    folder = write_tiny_llama(tmp_path / "sharded", max_shard_size="2MB")
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(shards) == 2
    fake_hub.add_repo("org/sharded", folder)

    facts = hub_facts("org/sharded", revision="main", token=None, endpoint=fake_hub.url)

    assert_same_facts(facts, read_checkpoint(folder))
    assert_only_headers_read(fake_hub, "org/sharded", folder)


def test_consolidated_safetensors_beside_shards_is_not_read(fake_hub, tmp_path):
    folder = write_tiny_llama(tmp_path / "sharded", max_shard_size="2MB")
    (folder / "model.safetensors.index.json").unlink()  # shards alone, as some repos have them
    shutil.copy(folder / "model-00001-of-00002.safetensors",
                folder / "consolidated.safetensors")
    fake_hub.add_repo("org/mistral-style", folder)

    facts = hub_facts("org/mistral-style", revision=None, token=None, endpoint=fake_hub.url)

    assert_same_facts(facts, read_checkpoint(folder))
    assert "consolidated.safetensors" not in fake_hub.bytes_sent("org/mistral-style")


def test_revision_resolves_to_its_commit(fake_hub, tiny_llama, tmp_path):
    fake_hub.add_repo("org/tiny", tiny_llama)
    v2 = write_tiny_llama(tmp_path / "v2", max_position_embeddings=128)
    commit = fake_hub.add_repo("org/tiny", v2, revision="v2")

    facts, got_commit = read_hub_facts("org/tiny", revision="v2", token=None,
                                       endpoint=fake_hub.url)

    assert got_commit == commit
    assert facts.config["max_position_embeddings"] == 128
    # Every file was read at the commit, not at the moving branch.
    assert {r.path.split("/")[4] for r in fake_hub.downloads("org/tiny")} == {commit}


def test_unknown_repository_or_revision(fake_hub, tiny_llama):
    with pytest.raises(FactsError, match=r"^hf://org/nope: no such repository on "
                                         r"http://127\.0\.0\.1:\d+, or it is private; check "
                                         r"spec\.model\.uri"):
        hub_facts("org/nope", revision=None, token=None, endpoint=fake_hub.url)
    fake_hub.add_repo("org/tiny", tiny_llama)
    with pytest.raises(FactsError, match=r"^hf://org/tiny at revision v9: the repository has "
                                         r"no such revision; set spec\.model\.revision"):
        hub_facts("org/tiny", revision="v9", token=None, endpoint=fake_hub.url)


def test_unreachable_hub_is_a_try_again_not_a_facts_error():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"  # bound, not listening
        with pytest.raises(HubUnavailable, match=r"^hf://org/tiny: http://127\.0\.0\.1:\d+ "
                                                 r"could not be read \(ConnectError: .*\); "
                                                 r"will try again$") as raised:
            hub_facts("org/tiny", revision=None, token=None, endpoint=endpoint)
    assert isinstance(raised.value, OSError) and not isinstance(raised.value, ValueError)


def test_gated_repository_needs_the_token_secret(fake_hub, tiny_llama, monkeypatch):
    fake_hub.add_repo("org/gated", tiny_llama, token="hf_right")
    # The operator's own token is not lent to a ModelDeployment without a Secret.
    monkeypatch.setenv("HF_TOKEN", "hf_right")
    with pytest.raises(FactsError, match=r"^hf://org/gated is gated and no token was given: "
                                         r".* set spec\.model\.tokenSecretRef to a Secret"):
        hub_facts("org/gated", revision=None, token=None, endpoint=fake_hub.url)
    with pytest.raises(FactsError, match=r"the token of spec\.model\.tokenSecretRef has no "
                                         r"access to it"):
        hub_facts("org/gated", revision=None, token="hf_wrong", endpoint=fake_hub.url)
    assert hub_facts("org/gated", revision=None, token="hf_right",
                     endpoint=fake_hub.url) == read_checkpoint(tiny_llama)


def test_repository_without_safetensors_or_config(fake_hub, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (pickled / "pytorch_model.bin").write_bytes(b"\0" * 1000)
    fake_hub.add_repo("org/pickled", pickled)
    with pytest.raises(FactsError, match=r"^hf://org/pickled has no \*\.safetensors weights "
                                         r"\(it has pytorch_model\.bin\); brim serves"):
        hub_facts("org/pickled", revision=None, token=None, endpoint=fake_hub.url)

    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.safetensors").write_bytes(b"\0" * 16)
    fake_hub.add_repo("org/bare", bare)
    with pytest.raises(FactsError, match=r"^hf://org/bare has no config\.json, so brim cannot "
                                         r"tell what model it is"):
        hub_facts("org/bare", revision=None, token=None, endpoint=fake_hub.url)
    assert fake_hub.downloads() == []


def test_hub_facts_imports_neither_torch_nor_transformers(fake_hub, tiny_llama, tmp_path):
    """The operator image has neither: reading facts must not need them."""
    fake_hub.add_repo("org/tiny", tiny_llama)
    script = ("import sys\n"
              "from brim.operator.hub import hub_facts\n"
              f"facts = hub_facts('org/tiny', revision=None, token=None, "
              f"endpoint={fake_hub.url!r})\n"
              "print(facts.config['hidden_size'], [m for m in ('torch', 'transformers') "
              "if m in sys.modules])\n")
    # From tmp_path: run from the repository root, operator/ would shadow the stdlib module.
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "64 []\n"
