"""`brim serve`: the OpenAI-compatible server. Flags keep vLLM's names where vLLM has them."""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import signal
import socket
import sys

from brim.runtime.engine import admission
from brim.runtime.planner.lengths import DEFAULT_MAX_NUM_BATCHED_TOKENS, DEFAULT_MAX_NUM_SEQS
from brim.runtime.planner.memory import DEFAULT_BLOCK_SIZE, DEFAULT_GPU_MEMORY_UTILIZATION
from brim.runtime.server.settings import (
    DEFAULT_CHAT_TEMPLATE_TIMEOUT,
    DEFAULT_MAX_REQUEST_BODY_BYTES,
    DEFAULT_SHUTDOWN_TIMEOUT,
    ServerSettings,
)

logger = logging.getLogger("brim.runtime.server")

API_KEY_ENV = "BRIM_API_KEY"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a model over the OpenAI API",
        description="Serve a model over the OpenAI API (/v1/completions, /v1/chat/completions) "
                    "with Prometheus metrics at /metrics. Without --model it serves the bundled "
                    "SmolLM2-135M-Instruct.")
    model = p.add_argument_group("model")
    model.add_argument("--model", default=None,
                       help="checkpoint folder (config.json, *.safetensors, tokenizer) or "
                            "Hugging Face repository (hf://<org>/<name>, downloaded into "
                            "$HF_HOME/hub; HF_TOKEN for gated ones); default: the bundled "
                            "SmolLM2-135M-Instruct")
    model.add_argument("--revision", default=None,
                       help="branch, tag or commit of the --model repository (default: its "
                            "default branch)")
    model.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                       help="name(s) clients pass as `model`; the first labels the metrics "
                            "(default: the repository id, or the model folder's name)")
    model.add_argument("--dtype", default="auto",
                       help="auto, float32, bfloat16 or float16 (auto: the checkpoint's; "
                            "float32 on CPU)")
    model.add_argument("--quantization", "-q", default=None, choices=["gptq", "awq", "fp8"],
                       help="default: the checkpoint's own scheme (config.json's "
                            "quantization_config: GPTQ, AWQ or FP8); fp8 quantizes a 16/32-bit "
                            "checkpoint's linear layers to FP8 while loading")
    model.add_argument("--max-model-len", default=None, metavar="N|25.6k|auto",
                       help="longest prompt + output per request, in tokens; 'auto' takes the "
                            "model's limit, lowered to what the KV cache holds (default: the "
                            "model's limit)")
    model.add_argument("--allow-long-max-model-len", action="store_true",
                       help="allow --max-model-len above the model's own limit")
    model.add_argument("--cache-dir", default=None,
                       help="where the bundled model is converted (default: $BRIM_CACHE_DIR or "
                            "~/.cache/brim)")

    engine = p.add_argument_group("engine")
    engine.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: cuda when a GPU is visible, else cpu")
    engine.add_argument("--gpu-memory-utilization", type=float,
                        default=DEFAULT_GPU_MEMORY_UTILIZATION,
                        help="share of GPU memory brim may use; the KV cache gets what weights "
                             f"and activations leave (default {DEFAULT_GPU_MEMORY_UTILIZATION})")
    engine.add_argument("--max-num-seqs", type=int, default=None,
                        help=f"most requests in one engine step (default {DEFAULT_MAX_NUM_SEQS})")
    engine.add_argument("--max-num-batched-tokens", default=None,
                        help="most tokens in one engine step (default "
                             f"{DEFAULT_MAX_NUM_BATCHED_TOKENS['cpu']} on CPU, "
                             f"{DEFAULT_MAX_NUM_BATCHED_TOKENS['cuda']} on GPU)")
    engine.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE,
                        help=f"tokens per KV-cache block (default {DEFAULT_BLOCK_SIZE})")
    engine.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "fp8_e4m3",
                                                                       "bfloat16", "float16",
                                                                       "float32"],
                        help="auto: the model dtype; fp8: float8 e4m3 with per-layer scales "
                             "(the checkpoint's, else 1.0), half the bytes per token")
    engine.add_argument("--num-gpu-blocks", "--num-gpu-blocks-override", dest="num_gpu_blocks",
                        type=int, default=None,
                        help="KV-cache blocks: a cap on GPU, the exact count on CPU")
    engine.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                        default=True,
                        help="reuse the KV of shared prompt prefixes; "
                        "--no-enable-prefix-caching turns it off")
    engine.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                        help="split the model over N ranks, one process and GPU each (NCCL on "
                             "CUDA, gloo on CPU); N must divide the attention heads (default 1: "
                             "no worker processes)")
    engine.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1,
                        help="only 1: brim has no pipeline parallelism (use "
                             "--tensor-parallel-size)")
    engine.add_argument("--enforce-eager", action="store_true",
                        help="run the model op by op; by default, on CPU, the work between "
                             "attention calls is compiled by torch.compile at start-up")
    engine.add_argument("--seed", type=int, default=0, help="seed of requests without their own")
    engine.add_argument("--speculative-config", default=None, metavar="JSON",
                        help='speculative decoding, as vLLM\'s: \'{"method": "ngram", '
                             '"num_speculative_tokens": 3, "prompt_lookup_max": 3}\' (guesses '
                             "from the request's own tokens) or '{\"model\": \"<draft>\", "
                             '"num_speculative_tokens": 4}\' (a smaller model with the same '
                             "vocabulary); greedy output is unchanged")
    engine.add_argument("--memory-report-path", default=None, metavar="PATH",
                        help="when the KV cache cannot hold --max-model-len, write the memory "
                             "report (JSON: predicted and measured) here before exiting; in "
                             "Kubernetes, the container's terminationMessagePath, for the "
                             "operator to plan again with")

    server = p.add_argument_group("server")
    server.add_argument("--host", default="0.0.0.0", help="address to bind (default 0.0.0.0)")
    server.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    server.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                        help=f"require 'Authorization: Bearer KEY' on every path but /health "
                             f"and /metrics (default: ${API_KEY_ENV})")
    server.add_argument("--max-queue-len", type=int, default=None,
                        help="answer 503 while this many requests wait (default: no limit)")
    server.add_argument("--max-request-body-bytes", type=int,
                        default=DEFAULT_MAX_REQUEST_BODY_BYTES,
                        help=f"answer 413 to larger bodies (default "
                             f"{DEFAULT_MAX_REQUEST_BODY_BYTES})")
    server.add_argument("--enable-vllm-metrics", action="store_true",
                        help="also export metrics under vLLM's names (vllm:kv_cache_usage_perc, "
                             "...) for existing vLLM dashboards and autoscalers")
    server.add_argument("--trust-request-chat-template", action="store_true",
                        help="accept a chat template sent with a request (`chat_template`); "
                             "without it such requests get 400. It renders in a separate "
                             "process, killed past --chat-template-timeout")
    server.add_argument("--chat-template-timeout", type=float,
                        default=DEFAULT_CHAT_TEMPLATE_TIMEOUT, metavar="SECONDS",
                        help="budget for rendering a chat template and tokenizing a prompt; "
                             f"past it, 400 (default {DEFAULT_CHAT_TEMPLATE_TIMEOUT:g})")
    server.add_argument("--shutdown-timeout", type=float, default=DEFAULT_SHUTDOWN_TIMEOUT,
                        metavar="SECONDS",
                        help="on SIGTERM, stop accepting and give the requests in flight this "
                             "long to finish, then end the rest (streams get an error event "
                             "and [DONE]) and exit 0; keep it a few seconds below the pod's "
                             "terminationGracePeriodSeconds (default "
                             f"{DEFAULT_SHUTDOWN_TIMEOUT:g})")

    limits = p.add_argument_group("work per request")
    limits.add_argument("--max-n", type=int, default=admission.DEFAULT_MAX_N,
                        help="most completions one request may ask for: n, times the number "
                             "of prompts of a batched completions request (default "
                             f"{admission.DEFAULT_MAX_N})")
    limits.add_argument("--max-request-generation-tokens", type=int, default=None,
                        metavar="N",
                        help="most tokens one request may ask to generate: n x max_tokens over "
                             "its prompts, max_tokens being what the context leaves when unset "
                             f"(default {admission.GENERATION_TOKENS_PER_MAX_MODEL_LEN} x "
                             "max_model_len)")
    limits.add_argument("--max-logprobs", type=int, default=admission.DEFAULT_MAX_LOGPROBS,
                        help="most alternatives per token (`logprobs`, chat's `top_logprobs`) "
                             f"(default {admission.DEFAULT_MAX_LOGPROBS}, as vLLM)")
    limits.add_argument("--max-stop-strings", type=int,
                        default=admission.DEFAULT_MAX_STOP_STRINGS,
                        help="most entries in `stop` (default "
                             f"{admission.DEFAULT_MAX_STOP_STRINGS})")
    limits.add_argument("--max-stop-string-len", type=int,
                        default=admission.DEFAULT_MAX_STOP_STRING_LEN,
                        help="most characters in one stop string (default "
                             f"{admission.DEFAULT_MAX_STOP_STRING_LEN})")
    limits.add_argument("--max-stop-token-ids", type=int,
                        default=admission.DEFAULT_MAX_STOP_TOKEN_IDS,
                        help="most entries in `stop_token_ids` (default "
                             f"{admission.DEFAULT_MAX_STOP_TOKEN_IDS})")
    server.add_argument("--uvicorn-log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug", "trace"])
    p.set_defaults(func=run_serve)


def request_limits(args: argparse.Namespace) -> admission.RequestLimits:
    """The work one request may ask for, from the flags of the same names."""
    return admission.RequestLimits(
        max_n=args.max_n, max_request_generation_tokens=args.max_request_generation_tokens,
        max_logprobs=args.max_logprobs, max_stop_strings=args.max_stop_strings,
        max_stop_string_len=args.max_stop_string_len,
        max_stop_token_ids=args.max_stop_token_ids)


def create_engine(args: argparse.Namespace):
    """Build the engine from the flags (`--max-model-len auto` is resolved by the engine)."""
    from brim.runtime.config import EngineConfig
    from brim.runtime.engine.engine import Engine
    from brim.runtime.engine.llm import resolve_device

    model = args.model
    if model is None:
        from brim.runtime.models.bundled import bundled_model_path

        model = str(bundled_model_path(args.cache_dir))
    else:
        from brim.runtime.models.hub import resolve_model

        model = str(resolve_model(model, revision=args.revision))
    config = EngineConfig.create(
        model, dtype=args.dtype, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size, num_gpu_blocks=args.num_gpu_blocks,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=args.enable_prefix_caching,
        allow_long_max_model_len=args.allow_long_max_model_len, seed=args.seed,
        device=resolve_device(args.device), speculative_config=args.speculative_config,
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size, kv_cache_dtype=args.kv_cache_dtype,
        quantization=args.quantization, enforce_eager=args.enforce_eager)
    return Engine(config, request_limits(args))


def write_memory_report(path: str, report) -> None:
    """The report as one JSON line (a termination message holds 4 KiB; this is ~1)."""
    import json

    try:
        with open(path, "w") as f:
            f.write(json.dumps(report.to_json(), separators=(",", ":")))
    except OSError as exc:
        logger.warning("could not write the memory report to %s: %s", path, exc)


def log_memory_plan(engine, host: str, port: int, model_name: str) -> None:
    report = engine.memory_report
    logger.info(
        "memory plan on %s: weights %.2f GiB; KV cache %.2f GiB = # GPU blocks: %d (%d tokens, "
        "%d per block, %d bytes per token); max_model_len=%d; maximum concurrency at "
        "max_model_len: %.2fx",
        report.device, report.weights_bytes / 2**30, report.kv_cache_bytes / 2**30,
        report.num_gpu_blocks, report.kv_cache_tokens, report.block_size,
        report.kv_bytes_per_token, report.max_model_len, report.max_concurrency)
    shown = "localhost" if host in ("0.0.0.0", "::") else host
    logger.info("serving %s at http://%s:%d/v1 (metrics at /metrics)", model_name, shown, port)


def bind(host: str, port: int) -> socket.socket:
    """The listening address, bound (not yet listening) before the model loads: a port
    already taken is reported in a second, not after minutes of loading."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from brim.runtime.models.hub import served_model_name
    from brim.runtime.server.app import build_app
    from brim.runtime.server.async_engine import EngineThread

    from brim.runtime.engine.errors import KVCacheTooSmallError

    try:
        sock = bind(args.host, args.port)
    except OSError as exc:
        print(f"brim serve: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}. "
              "Is another server running there? Stop it, or choose another --port.",
              file=sys.stderr)
        return 2
    # Built on the thread that will step it: one OpenMP team in the process (async_engine).
    engine_thread = EngineThread()
    try:
        engine = engine_thread.call(create_engine, args)
        names = args.served_model_name or [served_model_name(args.model or "",
                                                             engine.model_path)]
        settings = ServerSettings(served_model_names=names, api_key=args.api_key or None,
                                  max_queue_len=args.max_queue_len,
                                  max_request_body_bytes=args.max_request_body_bytes,
                                  enable_vllm_metrics=args.enable_vllm_metrics,
                                  trust_request_chat_template=args.trust_request_chat_template,
                                  chat_template_timeout=args.chat_template_timeout,
                                  shutdown_timeout=args.shutdown_timeout)
        app = build_app(engine, settings, engine_thread=engine_thread)
    except KVCacheTooSmallError as exc:
        sock.close()
        print(f"brim serve: {exc}", file=sys.stderr)
        if args.memory_report_path and exc.report is not None:
            write_memory_report(args.memory_report_path, exc.report)
        return 2
    except (ValueError, FileNotFoundError) as exc:
        sock.close()
        print(f"brim serve: {exc}", file=sys.stderr)
        return 2
    log_memory_plan(engine, args.host, args.port, names[0])
    server = _server_class()(uvicorn.Config(app, log_level=args.uvicorn_log_level,
                                            lifespan="on"))
    # An engine that can run no further step (a tensor-parallel worker died) ends the server.
    app.state.brim.engine.on_dead = lambda exc: setattr(server, "should_exit", True)
    # uvicorn restores the handlers it found when it stops and raises the signal it caught
    # again: found the default SIGTERM handler, the process would die of it (exit 143)
    # after the graceful shutdown. Handlers that do nothing make that a plain exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _already_handled)
    try:
        server.run(sockets=[sock])
    finally:
        shutdown = getattr(engine, "shutdown", None)
        if shutdown is not None:
            shutdown()
    dead = app.state.brim.engine.dead
    if dead is not None:
        print(f"brim serve: {dead}", file=sys.stderr)
        return 1
    return 0


def _already_handled(signum, frame) -> None:
    """uvicorn handled the signal (a graceful shutdown); its re-raise is a no-op."""


@functools.cache
def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn with a drain: on shutdown (SIGTERM, SIGINT) it stops accepting, gives the
        requests in flight the app's shutdown_timeout to finish, then ends the rest with a
        proper last event (streams: an error event and [DONE]; others: 503).

        config.app must be brim's app (build_app); timeout_graceful_shutdown is set to the
        drain timeout plus a margin, as a backstop only.
        """

        def __init__(self, config: uvicorn.Config) -> None:
            self.brim = config.app.state.brim
            config.timeout_graceful_shutdown = self.brim.settings.shutdown_timeout + 5
            super().__init__(config)

        async def shutdown(self, sockets=None) -> None:
            from brim.runtime.server import serving

            timeout = self.brim.settings.shutdown_timeout
            logger.info("shutting down: the requests in flight get up to %g s to finish "
                        "(--shutdown-timeout)", timeout)
            drain = asyncio.get_running_loop().call_later(
                timeout, self.brim.engine.end_all, serving.ShutdownError(timeout))
            try:
                await super().shutdown(sockets)
            finally:
                drain.cancel()

    return Server


def __getattr__(name: str):
    # `Server` needs uvicorn, which `brim serve --help` must not import.
    if name == "Server":
        return _server_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
