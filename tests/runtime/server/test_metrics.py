"""/metrics: parses with prometheus-client, has every series, moves with traffic."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client import Counter
from prometheus_client.parser import text_string_to_metric_families

from brim.runtime.planner.report import MemoryReport, MemoryUse
from brim.runtime.server.metrics import SPECS, ServerMetrics, length_buckets
from tests.runtime.server.conftest import MODEL, serve

BRIM_SERIES = [
    "brim_kv_cache_usage_ratio", "brim_kv_cache_blocks_free",
    "brim_kv_cache_blocks_used", "brim_kv_cache_blocks_cached", "brim_kv_cache_capacity_tokens",
    'brim_kv_cache_num_gpu_blocks{source="engine"}', 'brim_memory_kv_cache_bytes{source="engine"}',
    'brim_memory_weights_bytes{source="engine"}', "brim_gpu_memory_utilization_ratio",
    "brim_max_model_len_tokens",
    "brim_num_requests_running", "brim_num_requests_waiting", "brim_num_preemptions_total",
    "brim_prompt_tokens_total", "brim_generation_tokens_total",
    "brim_prefix_cache_queries_total", "brim_prefix_cache_hits_total",
    "brim_time_to_first_token_seconds_count", "brim_inter_token_latency_seconds_count",
    "brim_e2e_request_latency_seconds_count", "brim_request_queue_time_seconds_count",
    "brim_request_prompt_tokens_count", "brim_request_generation_tokens_count",
    "brim_cache_config_info",
]
# vLLM's current names (as of vLLM 0.13); the retired ones must not come back.
VLLM_SERIES = [
    "vllm:kv_cache_usage_perc", "vllm:num_requests_running",
    "vllm:num_requests_waiting", "vllm:num_preemptions_total", "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total", "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total", "vllm:time_to_first_token_seconds_count",
    "vllm:inter_token_latency_seconds_count",
    "vllm:e2e_request_latency_seconds_count", "vllm:request_queue_time_seconds_count",
    "vllm:request_prompt_tokens_count", "vllm:request_generation_tokens_count",
    "vllm:cache_config_info", "vllm:request_success_total",
]
VLLM_RETIRED = ["vllm:gpu_cache_usage_perc", "vllm:time_per_output_token_seconds",
                "vllm:gpu_prefix_cache_queries", "vllm:gpu_prefix_cache_hits"]


def samples(url: str) -> list:
    response = httpx.get(f"{url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return [s for family in text_string_to_metric_families(response.text)
            for s in family.samples]


def scrape(url: str) -> dict[str, float]:
    """name -> value for series labelled by nothing but the model (and *_info series);
    name{label="x"} otherwise. Histogram buckets are left out."""
    values = {}
    for s in samples(url):
        assert s.labels.get("model_name") == MODEL, s
        if "le" in s.labels:
            continue
        values[series_key(s)] = s.value
    return values


def series_key(sample) -> str:
    extra = {k: v for k, v in sample.labels.items() if k != "model_name"}
    if not extra or sample.name.endswith("_info"):
        return sample.name
    return sample.name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(extra.items())) + "}"


@pytest.mark.slow
def test_every_series_is_present_and_moves_with_traffic(live_url):
    before = scrape(live_url)
    for name in BRIM_SERIES:
        assert name in before, name
    assert not any(name.startswith("vllm:") for name in before)
    assert before['brim_kv_cache_num_gpu_blocks{source="engine"}'] == 160
    assert before["brim_max_model_len_tokens"] == 256
    assert before["brim_kv_cache_capacity_tokens"] == 160 * 16
    info = next(s for s in samples(live_url) if s.name == "brim_cache_config_info")
    assert info.value == 1
    assert {k: info.labels[k] for k in ("block_size", "num_gpu_blocks", "max_model_len",
                                        "gpu_memory_utilization")} == {
        "block_size": "16", "num_gpu_blocks": "160", "max_model_len": "256",
        "gpu_memory_utilization": "0.9"}

    response = httpx.post(f"{live_url}/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0,
        "ignore_eos": True}).json()
    after = scrape(live_url)
    usage = response["usage"]
    assert after["brim_generation_tokens_total"] - before["brim_generation_tokens_total"] == 8
    assert (after["brim_prompt_tokens_total"] - before["brim_prompt_tokens_total"]
            == usage["prompt_tokens"])
    for name in ("brim_time_to_first_token_seconds_count", "brim_e2e_request_latency_seconds_count",
                 "brim_request_queue_time_seconds_count", "brim_request_prompt_tokens_count",
                 "brim_request_generation_tokens_count"):
        assert after[name] - before[name] == 1, name
    assert after["brim_inter_token_latency_seconds_count"] - before[
        "brim_inter_token_latency_seconds_count"] == 7  # 8 tokens, 7 gaps
    assert after["brim_request_generation_tokens_sum"] - before[
        "brim_request_generation_tokens_sum"] == 8
    assert after["brim_request_prompt_tokens_sum"] - before[
        "brim_request_prompt_tokens_sum"] == usage["prompt_tokens"]
    assert after["brim_time_to_first_token_seconds_sum"] > before[
        "brim_time_to_first_token_seconds_sum"]
    # Idle again: nothing holds blocks, nothing runs.
    assert after["brim_kv_cache_usage_ratio"] == 0
    assert after["brim_kv_cache_blocks_used"] == 0
    assert after["brim_kv_cache_blocks_free"] == 160
    assert after["brim_num_requests_running"] == 0


def test_vllm_names_only_with_the_flag(fake_engine, tokenizer):
    with serve(fake_engine, tokenizer=tokenizer, enable_vllm_metrics=True) as url:
        httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 3})
        values = scrape(url)
        exported = {s.name for s in samples(url)}
        for name in VLLM_SERIES + BRIM_SERIES:
            assert name in values or name in exported, name
        for retired in VLLM_RETIRED:
            assert not any(name.startswith(retired) for name in exported), retired
        assert values["vllm:generation_tokens_total"] == values["brim_generation_tokens_total"] == 3
        assert values["vllm:e2e_request_latency_seconds_count"] == 1
    with serve(fake_engine, tokenizer=tokenizer) as url:
        assert not any(s.name.startswith("vllm:") for s in samples(url))


def test_gauges_follow_running_requests(fake_engine, tokenizer):
    fake_engine.gate.clear()
    with serve(fake_engine, tokenizer=tokenizer) as url:
        done = threading.Event()
        thread = threading.Thread(target=lambda: (httpx.post(
            f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30),
            done.set()))
        thread.start()
        deadline = time.monotonic() + 10
        while scrape(url)["brim_num_requests_waiting"] != 1:
            assert time.monotonic() < deadline, "the request never showed as waiting"
            time.sleep(0.01)
        fake_engine.gate.set()
        thread.join(30)
        assert done.is_set()
        values = scrape(url)
        assert values["brim_num_requests_waiting"] == 0
        assert values["brim_num_requests_running"] == 0
        assert values["brim_kv_cache_usage_ratio"] == 0


def test_length_buckets():
    assert length_buckets(256) == (1, 2, 5, 10, 20, 50, 100, 200, 256)
    assert length_buckets(100) == (1, 2, 5, 10, 20, 50, 100)


def test_counters_grow_by_engine_deltas():
    class Stats:
        kv_cache_usage, num_total_blocks, num_free_blocks = 0.5, 10, 5
        num_used_blocks, num_cached_blocks, num_running, num_waiting = 5, 1, 2, 3
        num_preemptions, num_prompt_tokens, num_generation_tokens = 1, 40, 7
        prefix_cache_queries, prefix_cache_hits = 40, 16

    metrics = ServerMetrics("m", cpu_report())
    metrics.update_engine(Stats)
    Stats.num_generation_tokens = 12
    metrics.update_engine(Stats)
    text = metrics.render()[0].decode()
    assert 'brim_generation_tokens_total{model_name="m"} 12.0' in text
    assert 'brim_prompt_tokens_total{model_name="m"} 40.0' in text
    assert 'brim_prefix_cache_hits_total{model_name="m"} 16.0' in text
    assert 'brim_kv_cache_usage_ratio{model_name="m"} 0.5' in text
    assert 'brim_num_requests_waiting{model_name="m"} 3.0' in text
    # Two instances in one process: separate registries, no "Duplicated timeseries".
    ServerMetrics("m", cpu_report(), enable_vllm_metrics=True)


# -- the memory gauges: the MemoryReport's numbers, under `source` ----------------------------

GIB = 2**30


def cuda_report() -> MemoryReport:
    """An L4-sized report whose prediction is 4% optimistic on blocks."""
    predicted = MemoryUse(gpu_memory_bytes=24 * GIB, gpu_memory_utilization=0.9,
                          weights_bytes=16 * GIB, activation_bytes=GIB, non_torch_bytes=GIB // 2,
                          non_kv_bytes=35 * GIB // 2, num_gpu_blocks=2600)
    measured = MemoryUse(gpu_memory_bytes=24 * GIB, gpu_memory_utilization=0.9,
                         weights_bytes=16 * GIB + 4096, activation_bytes=5 * GIB // 4,
                         non_torch_bytes=3 * GIB // 4, non_kv_bytes=18 * GIB,
                         num_gpu_blocks=2500)
    return MemoryReport(device="cuda", gpu_memory_utilization=0.9, block_size=16,
                        kv_bytes_per_token=131072, weights_bytes=16 * GIB + 4096,
                        num_gpu_blocks=2048, max_model_len=32768,
                        requested_max_model_len=131072, predicted=predicted,
                        measured=measured)


def cpu_report() -> MemoryReport:
    return MemoryReport(device="cpu", gpu_memory_utilization=0.9, block_size=16,
                        kv_bytes_per_token=46080, weights_bytes=538_000_000, num_gpu_blocks=10,
                        max_model_len=64, requested_max_model_len=64)


def gauges(metrics: ServerMetrics) -> dict[str, float]:
    return {series_key(s): s.value
            for family in text_string_to_metric_families(metrics.render()[0].decode())
            for s in family.samples if "le" not in s.labels}


def test_memory_gauges_are_the_reports_numbers():
    report = cuda_report()
    values = gauges(ServerMetrics("m", report))
    block_bytes = 16 * 131072
    for source, use in (("predicted", report.predicted), ("measured", report.measured)):
        for field, name in (("num_gpu_blocks", "brim_kv_cache_num_gpu_blocks"),
                            ("weights_bytes", "brim_memory_weights_bytes"),
                            ("activation_bytes", "brim_memory_activation_bytes"),
                            ("non_torch_bytes", "brim_memory_non_torch_bytes"),
                            ("non_kv_bytes", "brim_memory_non_kv_bytes"),
                            ("gpu_memory_bytes", "brim_gpu_memory_bytes")):
            assert values[f'{name}{{source="{source}"}}'] == getattr(use, field), (name, source)
        assert values[f'brim_memory_kv_cache_bytes{{source="{source}"}}'] == (
            use.num_gpu_blocks * block_bytes)
    assert values['brim_kv_cache_num_gpu_blocks{source="engine"}'] == 2048  # capped
    assert values['brim_memory_kv_cache_bytes{source="engine"}'] == report.kv_cache_bytes
    assert values['brim_memory_weights_bytes{source="engine"}'] == 16 * GIB + 4096
    assert values["brim_kv_cache_capacity_tokens"] == 2048 * 16
    assert values["brim_max_model_len_tokens"] == 32768
    assert values["brim_gpu_memory_utilization_ratio"] == 0.9
    # The plan-missing-reality alert's arithmetic, on these gauges: 4% off.
    off = (values['brim_kv_cache_num_gpu_blocks{source="predicted"}']
           - values['brim_kv_cache_num_gpu_blocks{source="measured"}']) \
        / values['brim_kv_cache_num_gpu_blocks{source="measured"}']
    assert off * 100 == report.num_gpu_blocks_error_percent == 4.0


def test_cpu_has_only_what_the_engine_uses():
    values = gauges(ServerMetrics("m", cpu_report()))
    sources = {key.split('source="')[1].rstrip('"}') for key in values if "source=" in key}
    assert sources == {"engine"}
    assert {key for key in values if "source=" in key} == {
        'brim_kv_cache_num_gpu_blocks{source="engine"}',
        'brim_memory_kv_cache_bytes{source="engine"}',
        'brim_memory_weights_bytes{source="engine"}'}
    assert values['brim_memory_kv_cache_bytes{source="engine"}'] == 10 * 16 * 46080
    assert values['brim_memory_weights_bytes{source="engine"}'] == 538_000_000


def test_every_finish_reason_exists_before_traffic():
    values = gauges(ServerMetrics("m", cpu_report()))
    assert {key for key in values if key.startswith("brim_request_success_total")} == {
        f'brim_request_success_total{{finished_reason="{reason}"}}'
        for reason in ("stop", "length", "abort", "error")}


def test_a_failed_step_counts_its_requests_as_errors(fake_engine, tokenizer):
    poison = tokenizer.encode(" poison")[0]
    fake_engine.poison = poison
    with serve(fake_engine, tokenizer=tokenizer) as url:
        before = scrape(url)
        assert httpx.post(f"{url}/v1/completions", json={
            "model": MODEL, "prompt": [poison], "max_tokens": 2}).status_code == 500
        httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "hi",
                                                 "max_tokens": 2})
        after = scrape(url)
    grew = {reason: after[f'brim_request_success_total{{finished_reason="{reason}"}}']
            - before[f'brim_request_success_total{{finished_reason="{reason}"}}']
            for reason in ("stop", "length", "abort", "error")}
    assert grew == {"stop": 0, "length": 1, "abort": 0, "error": 1}


def test_the_docs_table_lists_exactly_what_is_exported():
    """docs/server.md's metrics table: one row per brim family, with its vLLM names."""
    docs = (Path(__file__).resolve().parents[3] / "docs" / "server.md").read_text()
    section = docs.split("## Metrics")[1].split("\n## ")[0]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if line.startswith("| `brim_"):
            name = cells[0].strip("`").split("{")[0]
            rows[name] = set(re.findall(r"`(vllm:[\w:]+)`", cells[2]))

    def exposed(name: str, kind: type) -> str:
        return name + ("_total" if kind is Counter else "")

    exported = {exposed(spec.name, spec.kind): {exposed(v, spec.kind) for v in spec.vllm_names}
                for spec in SPECS}
    families = {family.name for family in ServerMetrics(
        "m", cuda_report(), enable_vllm_metrics=True).registry.collect()}
    assert {name.removesuffix("_total") for name in exported} <= families
    assert rows == exported
