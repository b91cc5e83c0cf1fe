"""The offline API, shaped like vLLM's: `LLM(...).generate(prompts, sampling_params)`."""

from __future__ import annotations

import itertools
import sys
from collections.abc import Sequence

from brim.runtime.config import EngineConfig
from brim.runtime.planner.memory import DEFAULT_BLOCK_SIZE, DEFAULT_GPU_MEMORY_UTILIZATION
from brim.runtime.engine.engine import Engine
from brim.runtime.engine.outputs import RequestOutput
from brim.runtime.sampling_params import SamplingParams

Prompt = str | list[int]


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but no CUDA GPU is visible; use device='cpu'")
    return "cuda" if device.startswith("cuda") else device


class LLM:
    """An engine with the model loaded, for batch generation in-process.

    model: a folder with a Hugging Face checkpoint, or a Hub repository (`hf://<org>/<name>`,
        downloaded once into the Hub cache, see brim.runtime.models.hub); None uses the
        bundled SmolLM2.
    revision: branch, tag or commit of a Hub repository (default: its default branch).
    max_model_len: int, a human-readable count ("25.6k", "32K"), None (the model's own) or
        "auto" (the model's own, lowered to what the KV cache holds instead of refusing).
    num_gpu_blocks: caps the KV cache at that many blocks. On CPU the default is
        10% of the RAM available at start-up (CacheConfig.cpu_kv_cache_fraction).
    tensor_parallel_size: split the model over that many ranks, one process (and GPU) each
        (NCCL on CUDA, gloo on CPU); this process is rank 0. Call `shutdown()` (or use the
        LLM as a context manager) to stop the workers before the interpreter exits.
    pipeline_parallel_size: only 1.
    kv_cache_dtype: "auto" (the model dtype) or "fp8" (e4m3, half the bytes per token).
    quantization: None reads the checkpoint's scheme (GPTQ, AWQ, FP8 or none); "fp8"
        quantizes a plain checkpoint's linear layers to FP8 while loading.
    speculative_config: vLLM's: {"method": "ngram", "num_speculative_tokens": k, ...} (prompt
        lookup) or {"model": <draft folder or Hub id>, "num_speculative_tokens": k} (a draft
        model with the target's vocabulary); see docs/engine.md.
    enforce_eager: run the model op by op. By default, on CPU, the work between attention
        calls is compiled on the first steps (seconds; cached on disk for later starts).
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        dtype: str = "auto",
        max_model_len: int | str | None = None,
        max_num_seqs: int | None = None,
        max_num_batched_tokens: int | str | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        num_gpu_blocks: int | None = None,
        gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION,
        enable_prefix_caching: bool = True,
        allow_long_max_model_len: bool = False,
        seed: int = 0,
        device: str = "auto",
        cache_dir: str | None = None,
        revision: str | None = None,
        speculative_config: dict | None = None,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        kv_cache_dtype: str = "auto",
        quantization: str | None = None,
        enforce_eager: bool = False,
    ) -> None:
        if model is not None:
            from brim.runtime.models.hub import resolve_model

            model = str(resolve_model(model, revision=revision))
        else:
            from brim.runtime.models.bundled import bundled_model_path

            model = str(bundled_model_path(cache_dir))
        config = EngineConfig.create(
            model,
            dtype=dtype,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            block_size=block_size,
            num_gpu_blocks=num_gpu_blocks,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_prefix_caching=enable_prefix_caching,
            allow_long_max_model_len=allow_long_max_model_len,
            seed=seed,
            device=resolve_device(device),
            speculative_config=speculative_config,
            tensor_parallel_size=tensor_parallel_size,
            pipeline_parallel_size=pipeline_parallel_size,
            kv_cache_dtype=kv_cache_dtype,
            quantization=quantization,
            enforce_eager=enforce_eager,
        )
        self.engine = Engine(config)
        self._ids = itertools.count()

    @classmethod
    def from_engine(cls, engine: Engine) -> "LLM":
        """An LLM over an engine built elsewhere (one engine shared with a server, say)."""
        llm = cls.__new__(cls)
        llm.engine = engine
        llm._ids = itertools.count()
        return llm

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers (a no-op at tensor_parallel_size=1)."""
        self.engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        cache_salt: str | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in the order of the prompts.

        prompts: a string, a list of strings, a list of token ids, or a list of those.
        cache_salt: prefix-cache blocks are shared only among requests with the same salt.
        """
        prompts = _as_prompt_list(prompts)
        tokenizer = self.engine.tokenizer
        encoded = [
            (p, tokenizer.encode(p)) if isinstance(p, str) else (None, list(p)) for p in prompts
        ]
        return self._run(encoded, sampling_params, use_tqdm, cache_salt)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        cache_salt: str | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tokenizer = self.engine.tokenizer
        encoded = []
        for conversation in conversations:
            text = tokenizer.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=add_generation_prompt
            )
            encoded.append((text, tokenizer.encode(text, add_special_tokens=False)))
        return self._run(encoded, sampling_params, use_tqdm, cache_salt)

    def _run(self, encoded, sampling_params, use_tqdm, cache_salt=None) -> list[RequestOutput]:
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(encoded)
        else:
            params = list(sampling_params)
            if len(params) != len(encoded):
                raise ValueError(
                    f"got {len(params)} SamplingParams for {len(encoded)} prompts; give one, "
                    "or one per prompt"
                )
        # Only finished outputs are returned: the engine need not build the others.
        final_only: dict[int, SamplingParams] = {}
        for i, p in enumerate(params):
            if isinstance(p, SamplingParams) and p.output_kind != "final_only":
                if id(p) not in final_only:
                    final_only[id(p)] = p.clone(output_kind="final_only")
                params[i] = final_only[id(p)]
        engine = self.engine
        order = []
        try:
            for (text, token_ids), p in zip(encoded, params):
                req_id = str(next(self._ids))
                engine.add_request(req_id, token_ids, p, prompt=text, cache_salt=cache_salt)
                order.append(req_id)
        except Exception:
            for req_id in order:
                engine.abort(req_id)
            raise
        results: dict[str, RequestOutput] = {}
        progress = None
        if use_tqdm and sys.stderr.isatty():
            from tqdm import tqdm

            progress = tqdm(total=len(order), desc="generating", unit="req")
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    results[output.req_id] = output
                    if progress is not None:
                        progress.update(1)
        if progress is not None:
            progress.close()
        return [results[req_id] for req_id in order]


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # a single prompt given as token ids
    return prompts
