"""Prometheus metrics about the KV cache, the memory plan, the queues and request latency.

Every series is named `brim_*` and labelled with `model_name`. With
`enable_vllm_metrics`, the series vLLM also has are exported a second time under
vLLM's current names (`vllm:kv_cache_usage_perc`, `vllm:num_requests_waiting`, ...) so
that dashboards and autoscalers written for vLLM work unchanged. Names vLLM has retired
(`vllm:gpu_cache_usage_perc`, `vllm:time_per_output_token_seconds`) are not exported.

The memory gauges carry `source`: what the planner predicted for this GPU and these
settings (`predicted`), what the engine profiled at start-up (`measured`) — both CUDA
only — and what the engine runs with (`engine`: the measurement capped by
num_gpu_blocks; on CPU the only source). The same names as planner.report.MemoryUse.

Each ServerMetrics owns its CollectorRegistry (not the process-global one), so several
apps can live in one process (tests do).
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from brim.runtime.planner.report import MemoryReport

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
_REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)

# How a request can end (request_success's `finished_reason`): the engine's three, and
# `error` for a request failed by an engine step that raised.
FINISHED_REASONS = ("stop", "length", "abort", "error")
# The memory gauges' `source` values.
SOURCES = ("predicted", "measured", "engine")


def length_buckets(max_len: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to max_len (and max_len itself)."""
    buckets, scale = [], 1
    while True:
        for step in (1, 2, 5):
            value = step * scale
            if value >= max_len:
                return tuple(buckets + [max_len])
            buckets.append(value)
        scale *= 10


@dataclass(frozen=True, slots=True)
class MetricSpec:
    key: str  # how the code refers to it
    kind: type  # Gauge, Counter or Histogram
    name: str  # brim's name (counters: without `_total`, which the client appends)
    doc: str
    vllm_names: tuple[str, ...] = ()
    buckets: str | None = None  # "ttft", "itl", "request", "length"
    labels: tuple[str, ...] = ()


_SOURCE = ("source",)

SPECS = (
    # -- KV cache (gauges, from the engine after every step) --
    MetricSpec("kv_usage", Gauge, "brim_kv_cache_usage_ratio",
               "Fraction of KV-cache blocks in use by requests (0 to 1).",
               ("vllm:kv_cache_usage_perc",)),
    MetricSpec("blocks_free", Gauge, "brim_kv_cache_blocks_free",
               "KV-cache blocks no request holds (cached blocks included)."),
    MetricSpec("blocks_used", Gauge, "brim_kv_cache_blocks_used",
               "KV-cache blocks held by running requests."),
    MetricSpec("blocks_cached", Gauge, "brim_kv_cache_blocks_cached",
               "KV-cache blocks holding a reusable prefix (prefix caching)."),
    MetricSpec("capacity_tokens", Gauge, "brim_kv_cache_capacity_tokens",
               "Tokens the KV cache holds: the engine's blocks x block_size."),
    # -- the memory plan (gauges, from the MemoryReport at start-up) --
    MetricSpec("num_gpu_blocks", Gauge, "brim_kv_cache_num_gpu_blocks",
               "KV-cache blocks, as predicted by the planner, as measured at start-up, and as "
               "the engine runs with (source).", labels=_SOURCE),
    MetricSpec("kv_cache_bytes", Gauge, "brim_memory_kv_cache_bytes",
               "Bytes of KV cache: blocks x block_size x KV bytes per token (source).",
               labels=_SOURCE),
    MetricSpec("weights_bytes", Gauge, "brim_memory_weights_bytes",
               "Bytes of model weights on one GPU (source).", labels=_SOURCE),
    MetricSpec("activation_bytes", Gauge, "brim_memory_activation_bytes",
               "Peak activation bytes of one forward at max_num_batched_tokens (source).",
               labels=_SOURCE),
    MetricSpec("non_torch_bytes", Gauge, "brim_memory_non_torch_bytes",
               "Bytes held outside torch's allocator: CUDA context, libraries (source).",
               labels=_SOURCE),
    MetricSpec("non_kv_bytes", Gauge, "brim_memory_non_kv_bytes",
               "Bytes of everything but the KV cache: weights, activations, non-torch (source).",
               labels=_SOURCE),
    MetricSpec("gpu_memory_bytes", Gauge, "brim_gpu_memory_bytes",
               "The GPU's total memory in bytes (source).", labels=_SOURCE),
    MetricSpec("gpu_memory_utilization", Gauge, "brim_gpu_memory_utilization_ratio",
               "Share of the GPU's memory the engine may use (--gpu-memory-utilization)."),
    MetricSpec("max_model_len", Gauge, "brim_max_model_len_tokens",
               "The longest request (prompt + output) the engine serves, in tokens."),
    # -- queues --
    MetricSpec("running", Gauge, "brim_num_requests_running",
               "Requests in the running batch.", ("vllm:num_requests_running",)),
    MetricSpec("waiting", Gauge, "brim_num_requests_waiting",
               "Requests waiting to be scheduled (preempted ones included).",
               ("vllm:num_requests_waiting",)),
    # -- counters (deltas of the engine's cumulative counts) --
    MetricSpec("preemptions", Counter, "brim_num_preemptions",
               "Requests preempted (KV freed, recomputed later) for lack of KV blocks.",
               ("vllm:num_preemptions",)),
    MetricSpec("prompt_tokens", Counter, "brim_prompt_tokens",
               "Prompt tokens prefilled.", ("vllm:prompt_tokens",)),
    MetricSpec("generation_tokens", Counter, "brim_generation_tokens",
               "Tokens generated.", ("vllm:generation_tokens",)),
    MetricSpec("prefix_queries", Counter, "brim_prefix_cache_queries",
               "Prompt tokens looked up in the prefix cache.", ("vllm:prefix_cache_queries",)),
    MetricSpec("prefix_hits", Counter, "brim_prefix_cache_hits",
               "Prompt tokens found in the prefix cache.", ("vllm:prefix_cache_hits",)),
    # -- speculative decoding (engine/speculative.py; zero when it is off) --
    MetricSpec("spec_drafts", Counter, "brim_spec_decode_num_drafts",
               "Times a request's guessed tokens were checked by the target model.",
               ("vllm:spec_decode_num_drafts",)),
    MetricSpec("spec_draft_tokens", Counter, "brim_spec_decode_num_draft_tokens",
               "Guessed (proposed) tokens checked.", ("vllm:spec_decode_num_draft_tokens",)),
    MetricSpec("spec_accepted_tokens", Counter, "brim_spec_decode_num_accepted_tokens",
               "Guessed tokens the target accepted.",
               ("vllm:spec_decode_num_accepted_tokens",)),
    MetricSpec("spec_emitted_tokens", Counter, "brim_spec_decode_num_emitted_tokens",
               "Tokens emitted by steps that checked guesses (accepted + the target's own)."),
    MetricSpec("spec_mean_accepted_length", Gauge, "brim_spec_decode_mean_accepted_length",
               "Tokens emitted per check of guesses, since start (1 = no guess accepted)."),
    MetricSpec("request_success", Counter, "brim_request_success",
               "Requests finished, by finish reason (stop, length, abort, error).",
               ("vllm:request_success",), labels=("finished_reason",)),
    # -- per-request histograms --
    MetricSpec("ttft", Histogram, "brim_time_to_first_token_seconds",
               "Arrival to first generated token.", ("vllm:time_to_first_token_seconds",),
               "ttft"),
    MetricSpec("itl", Histogram, "brim_inter_token_latency_seconds",
               "Time between consecutive tokens of a request.",
               ("vllm:inter_token_latency_seconds",), "itl"),
    MetricSpec("e2e", Histogram, "brim_e2e_request_latency_seconds",
               "Arrival to last token, for requests that finished.",
               ("vllm:e2e_request_latency_seconds",), "request"),
    MetricSpec("queue_time", Histogram, "brim_request_queue_time_seconds",
               "Arrival to the start of the engine step that produced the first token.",
               ("vllm:request_queue_time_seconds",), "request"),
    MetricSpec("prompt_len", Histogram, "brim_request_prompt_tokens",
               "Prompt length of finished requests, in tokens.",
               ("vllm:request_prompt_tokens",), "length"),
    MetricSpec("generation_len", Histogram, "brim_request_generation_tokens",
               "Generated tokens of finished requests (all n completions).",
               ("vllm:request_generation_tokens",), "length"),
    # -- configuration --
    MetricSpec("cache_config", Gauge, "brim_cache_config_info",
               "KV-cache configuration (always 1; the labels carry the values).",
               ("vllm:cache_config_info",),
               labels=("block_size", "num_gpu_blocks", "max_model_len",
                       "gpu_memory_utilization")),
)

# Engine stat -> counter key, for the counters fed from cumulative engine counts.
_COUNTER_STATS = {
    "num_preemptions": "preemptions",
    "num_prompt_tokens": "prompt_tokens",
    "num_generation_tokens": "generation_tokens",
    "prefix_cache_queries": "prefix_queries",
    "prefix_cache_hits": "prefix_hits",
    "spec_drafts": "spec_drafts",
    "spec_draft_tokens": "spec_draft_tokens",
    "spec_accepted_tokens": "spec_accepted_tokens",
    "spec_emitted_tokens": "spec_emitted_tokens",
}
# MemoryUse fields exported per source (the spec key is the field's name).
_MEMORY_USE_FIELDS = ("num_gpu_blocks", "weights_bytes", "activation_bytes", "non_torch_bytes",
                      "non_kv_bytes", "gpu_memory_bytes")


class ServerMetrics:
    """The metrics of one served model.

    memory_report: how the engine sized its KV cache; sets the memory gauges and
        cache_config_info once, at construction (they do not change while it runs).
    """

    def __init__(self, model_name: str, memory_report: MemoryReport, *,
                 enable_vllm_metrics: bool = False) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        self.enable_vllm_metrics = enable_vllm_metrics
        bucket_sets = {
            "ttft": _TTFT_BUCKETS,
            "itl": _ITL_BUCKETS,
            "request": _REQUEST_BUCKETS,
            "length": length_buckets(memory_report.max_model_len),
        }
        self._metrics: dict[str, list] = {}
        self._child_cache: dict[tuple, list] = {}
        for spec in SPECS:
            names = (spec.name,) + (spec.vllm_names if enable_vllm_metrics else ())
            kwargs = {"buckets": bucket_sets[spec.buckets]} if spec.buckets else {}
            self._metrics[spec.key] = [
                spec.kind(name, spec.doc, ("model_name",) + spec.labels, registry=self.registry,
                          **kwargs)
                for name in names
            ]
        self._last_counts = dict.fromkeys(_COUNTER_STATS, 0)
        self._set_memory(memory_report)
        # Create the labelled children now, so every series exists (at 0) before traffic.
        for key in ("kv_usage", "blocks_free", "blocks_used", "blocks_cached", "running",
                    "waiting", "ttft", "itl", "e2e", "queue_time", "prompt_len",
                    "generation_len", *_COUNTER_STATS.values()):
            for metric in self._metrics[key]:
                metric.labels(model_name=model_name)
        for reason in FINISHED_REASONS:
            for metric in self._metrics["request_success"]:
                metric.labels(model_name=model_name, finished_reason=reason)

    def _set_memory(self, report: MemoryReport) -> None:
        block_bytes = report.block_size * report.kv_bytes_per_token
        for source, use in (("predicted", report.predicted), ("measured", report.measured)):
            if use is None:  # CPU: nothing predicted or profiled
                continue
            for field in _MEMORY_USE_FIELDS:
                self._set(field, getattr(use, field), source=source)
            self._set("kv_cache_bytes", use.num_gpu_blocks * block_bytes, source=source)
        self._set("num_gpu_blocks", report.num_gpu_blocks, source="engine")
        self._set("kv_cache_bytes", report.kv_cache_bytes, source="engine")
        self._set("weights_bytes", report.weights_bytes, source="engine")
        self._set("capacity_tokens", report.kv_cache_tokens)
        self._set("gpu_memory_utilization", report.gpu_memory_utilization)
        self._set("max_model_len", report.max_model_len)
        self._set("cache_config", 1, block_size=str(report.block_size),
                  num_gpu_blocks=str(report.num_gpu_blocks),
                  max_model_len=str(report.max_model_len),
                  gpu_memory_utilization=str(report.gpu_memory_utilization))

    def _children(self, key: str, labels: dict):
        """The labelled series of `key` (brim's and vLLM's names), looked up once: labels()
        takes a lock and validates per call, and update_engine runs after every step."""
        cache_key = (key, *sorted(labels.items()))
        children = self._child_cache.get(cache_key)
        if children is None:
            children = self._child_cache[cache_key] = [
                m.labels(model_name=self.model_name, **labels) for m in self._metrics[key]]
        return children

    def _set(self, key: str, value: float, **labels) -> None:
        for child in self._children(key, labels):
            child.set(value)

    def _inc(self, key: str, amount: float = 1, **labels) -> None:
        for child in self._children(key, labels):
            child.inc(amount)

    def _observe(self, key: str, value: float) -> None:
        for child in self._children(key, {}):
            child.observe(value)

    # -- updates ----------------------------------------------------------------------------

    def update_engine(self, stats) -> None:
        """Gauges from a stats snapshot; counters grow by the engine counters' deltas."""
        self._set("kv_usage", stats.kv_cache_usage)
        self._set("blocks_free", stats.num_free_blocks)
        self._set("blocks_used", stats.num_used_blocks)
        self._set("blocks_cached", stats.num_cached_blocks)
        self._set("running", stats.num_running)
        self._set("waiting", stats.num_waiting)
        drafts = getattr(stats, "spec_drafts", 0)
        if drafts:
            self._set("spec_mean_accepted_length", stats.spec_emitted_tokens / drafts)
        for stat, key in _COUNTER_STATS.items():
            value = getattr(stats, stat, 0)
            delta = value - self._last_counts[stat]
            if delta > 0:
                self._inc(key, delta)
            self._last_counts[stat] = value

    def observe_first_token(self, ttft: float, queue_time: float) -> None:
        self._observe("ttft", ttft)
        self._observe("queue_time", max(queue_time, 0.0))

    def observe_inter_token(self, seconds: float) -> None:
        self._observe("itl", seconds)

    def observe_finished(self, e2e: float, num_prompt_tokens: int, num_generation_tokens: int,
                         finish_reason: str) -> None:
        self._observe("e2e", e2e)
        self._observe("prompt_len", num_prompt_tokens)
        self._observe("generation_len", num_generation_tokens)
        self.observe_finished_reason(finish_reason)

    def observe_finished_reason(self, finish_reason: str) -> None:
        """Count a request that ended (FINISHED_REASONS), whether or not it produced tokens."""
        self._inc("request_success", finished_reason=finish_reason)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
