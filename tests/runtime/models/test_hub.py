"""`hf://` models: resolve_model downloads only what brim loads from a (fake) Hugging Face Hub,
and LLM, `brim generate` and `brim serve` serve them; errors say what to do."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
from pathlib import Path

import httpx
import pytest

from brim.runtime import LLM, SamplingParams
from brim.runtime.cli import main
from brim.runtime.models.hub import resolve_model
from tests.hub_fixtures import fake_hub, tiny_llama, write_tiny_llama  # noqa: F401 (fixtures)
from tests.runtime.conftest import hf_greedy
from tests.serve_process import brim_serve, free_port

# What save_pretrained and the tokenizer write for the tiny Llama: all of it is needed.
TINY_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
              "tokenizer_config.json"}


def repo_folder(tiny_llama: Path, tmp_path: Path, extras: dict[str, bytes]) -> Path:
    """The tiny checkpoint plus files a real repository carries beside it."""
    folder = tmp_path / "repo"
    shutil.copytree(tiny_llama, folder)
    for name, data in extras.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


# Files brim must never fetch: pickles, other formats, docs, originals in subfolders.
JUNK = {"pytorch_model.bin": b"\0" * 5000, "model.gguf": b"GGUF" + b"\0" * 100,
        "onnx/model.onnx": b"\0" * 100, "original/consolidated.00.pth": b"\0" * 100,
        "README.md": b"# tiny\n", ".gitattributes": b"*.safetensors filter=lfs\n"}


def test_downloads_only_what_brim_loads_then_generates(fake_hub, tiny_llama, tmp_path):
    folder = repo_folder(tiny_llama, tmp_path, JUNK)
    commit = fake_hub.add_repo("org/tiny", folder)

    path = resolve_model("hf://org/tiny")

    hub_cache = tmp_path / "hf-home" / "hub"
    assert path == hub_cache / "models--org--tiny" / "snapshots" / commit
    assert sorted(os.listdir(path)) == sorted(TINY_FILES)
    sent = fake_hub.bytes_sent("org/tiny")
    assert sent == {name: (folder / name).stat().st_size for name in TINY_FILES}
    for name in TINY_FILES:
        assert filecmp.cmp(path / name, folder / name, shallow=False)

    from transformers import AutoModelForCausalLM

    prompt = [1, 17, 400, 3999, 52]
    want = hf_greedy(AutoModelForCausalLM.from_pretrained(tiny_llama).eval(), prompt, 6)
    llm = LLM("hf://org/tiny", dtype="float32", device="cpu", num_gpu_blocks=16)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    assert llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids == want

    # The second time, the cache answers: the Hub is asked for the listing only.
    fake_hub.requests.clear()
    assert resolve_model("hf://org/tiny") == path
    assert fake_hub.downloads() == []
    assert all(r.method == "GET" and r.path.startswith("/api/models/org/tiny")
               for r in fake_hub.requests)


def test_bare_repo_id_resolves_when_no_such_folder_exists(fake_hub, tiny_llama, tmp_path,
                                                          monkeypatch):
    commit = fake_hub.add_repo("org/tiny", tiny_llama)
    monkeypatch.chdir(tmp_path)
    assert resolve_model("org/tiny").name == commit
    (tmp_path / "org" / "tiny").mkdir(parents=True)  # now it names a folder here
    assert resolve_model("org/tiny") == Path("org/tiny")


def test_revision_selects_a_branch_or_commit(fake_hub, tiny_llama, tmp_path, capsys):
    fake_hub.add_repo("org/tiny", tiny_llama)
    v2 = write_tiny_llama(tmp_path / "v2", max_position_embeddings=128)
    commit = fake_hub.add_repo("org/tiny", v2, revision="v2")

    path = resolve_model("hf://org/tiny", revision="v2")
    assert path.name == commit
    assert json.loads((path / "config.json").read_text())["max_position_embeddings"] == 128
    assert resolve_model("hf://org/tiny", revision=commit) == path
    assert json.loads((resolve_model("hf://org/tiny") / "config.json").read_text())[
        "max_position_embeddings"] == 256

    assert main(["generate", "t5 t6 t7", "--model", "hf://org/tiny", "--revision", "v2",
                 "--device", "cpu", "--num-gpu-blocks", "16", "--max-tokens", "3"]) == 0
    assert len(capsys.readouterr().out.split()) == 3

    with pytest.raises(ValueError, match=r"^hf://org/tiny \(revision v3\): the repository has "
                                         r"no such revision; pass one of its branches"):
        resolve_model("hf://org/tiny", revision="v3")


def test_unknown_repository_is_refused_with_what_to_check(fake_hub):
    with pytest.raises(FileNotFoundError, match=r"^hf://org/nope: no such repository on "
                                                r"http://127\.0\.0\.1:\d+; check the name, "
                                                r"and if the repository is private set HF_TOKEN"):
        resolve_model("hf://org/nope")


def test_gated_repository_needs_its_token(fake_hub, tiny_llama, monkeypatch):
    fake_hub.add_repo("org/gated", tiny_llama, token="hf_right")
    with pytest.raises(ValueError, match=r"^hf://org/gated is gated on http://127\.0\.0\.1:\d+ "
                                         r"and no token was given: accept its terms"):
        resolve_model("hf://org/gated")
    with pytest.raises(ValueError, match="the token given has no access"):
        resolve_model("hf://org/gated", token="hf_wrong")
    assert sorted(os.listdir(resolve_model("hf://org/gated", token="hf_right"))) == sorted(
        TINY_FILES)
    monkeypatch.setenv("HF_TOKEN", "hf_right")  # the library's own way, read at each call
    assert resolve_model("hf://org/gated").is_dir()


def test_repository_without_safetensors_is_refused_before_any_download(fake_hub, tmp_path):
    folder = tmp_path / "bin-only"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"\0" * 1000)
    fake_hub.add_repo("org/pickled", folder)
    with pytest.raises(ValueError, match=r"^hf://org/pickled: no \*\.safetensors weights: it "
                                         r"has pytorch_model\.bin\. brim loads safetensors only"):
        resolve_model("hf://org/pickled")
    assert fake_hub.downloads() == []


def test_sharded_repository_skips_consolidated_safetensors(fake_hub, tmp_path):
    folder = write_tiny_llama(tmp_path / "sharded", max_shard_size="2MB")
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(shards) == 2
    shutil.copy(folder / shards[0], folder / "consolidated.safetensors")  # Mistral's own copy
    fake_hub.add_repo("org/sharded", folder)

    path = resolve_model("hf://org/sharded")
    assert set(fake_hub.bytes_sent("org/sharded")) == {
        *shards, "model.safetensors.index.json", "config.json", "generation_config.json",
        "tokenizer.json", "tokenizer_config.json"}
    assert not (path / "consolidated.safetensors").exists()


def test_lone_consolidated_safetensors_is_the_checkpoint(fake_hub, tiny_llama, tmp_path):
    folder = repo_folder(tiny_llama, tmp_path, {})
    (folder / "model.safetensors").rename(folder / "consolidated.safetensors")
    fake_hub.add_repo("org/mistral-style", folder)
    path = resolve_model("hf://org/mistral-style")
    assert (path / "consolidated.safetensors").is_file()


def test_offline_or_unreachable_hub_serves_the_cache_and_says_when_it_cannot(
        fake_hub, tiny_llama, monkeypatch):
    fake_hub.add_repo("org/tiny", tiny_llama)
    path = resolve_model("hf://org/tiny")
    fake_hub.requests.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("hf://org/tiny") == path
    assert fake_hub.requests == []
    with pytest.raises(FileNotFoundError, match=r"^hf://org/other: the Hub cannot be reached "
                                                r"\(HF_HUB_OFFLINE is set\) and the model is "
                                                r"not in the cache"):
        resolve_model("hf://org/other")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens
    assert resolve_model("hf://org/tiny") == path
    with pytest.raises(FileNotFoundError, match=r"^hf://org/other: the Hub cannot be reached "
                                                r"\(ConnectError: .*\) and the model is not in "
                                                r"the cache .*\. Connect to the Hub"):
        resolve_model("hf://org/other")


def test_local_folders_are_returned_as_they_are(tmp_path):
    assert resolve_model(str(tmp_path)) == tmp_path
    with pytest.raises(FileNotFoundError, match=r"model '.*/missing': no such folder, and not "
                                                r"a Hugging Face repository id"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="revision 'main' applies to Hugging Face repositories"):
        resolve_model(str(tmp_path), revision="main")
    with pytest.raises(ValueError, match=r"'org/a/b' is not a repository id"):
        resolve_model("hf://org/a/b")


def test_brim_serve_serves_a_hub_revision(fake_hub, tiny_llama, tmp_path):
    fake_hub.add_repo("org/tiny", tiny_llama, revision="v1")
    args = ["--model", "hf://org/tiny", "--revision", "v1", "--device", "cpu",
            "--num-gpu-blocks", "16", "--max-model-len", "128"]
    with brim_serve(args, tmp_path / "serve.log", env=dict(os.environ), timeout=60) as (url, _):
        response = httpx.post(f"{url}/v1/completions", timeout=30, json={
            "model": "org/tiny", "prompt": "t5 t6 t7", "max_tokens": 4, "temperature": 0})
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] >= 1
    assert set(fake_hub.bytes_sent("org/tiny")) == TINY_FILES
