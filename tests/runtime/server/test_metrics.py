"""/metrics: parses with prometheus-client, has every series, moves with traffic."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from brim.runtime.server.metrics import ServerMetrics, length_buckets
from tests.runtime.server.conftest import MODEL, serve

BRIM_SERIES = [
    "brim_kv_cache_usage_ratio", "brim_kv_cache_blocks_total", "brim_kv_cache_blocks_free",
    "brim_kv_cache_blocks_used", "brim_kv_cache_blocks_cached", "brim_kv_cache_capacity_tokens",
    "brim_num_requests_running", "brim_num_requests_waiting", "brim_num_preemptions_total",
    "brim_prompt_tokens_total", "brim_generation_tokens_total",
    "brim_prefix_cache_queries_total", "brim_prefix_cache_hits_total",
    "brim_time_to_first_token_seconds_count", "brim_inter_token_latency_seconds_count",
    "brim_e2e_request_latency_seconds_count", "brim_request_queue_time_seconds_count",
    "brim_request_prompt_tokens_count", "brim_request_generation_tokens_count",
    "brim_cache_config_info",
]
VLLM_SERIES = [
    "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "vllm:num_requests_running",
    "vllm:num_requests_waiting", "vllm:num_preemptions_total", "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total", "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total", "vllm:time_to_first_token_seconds_count",
    "vllm:inter_token_latency_seconds_count", "vllm:time_per_output_token_seconds_count",
    "vllm:e2e_request_latency_seconds_count", "vllm:request_queue_time_seconds_count",
    "vllm:request_prompt_tokens_count", "vllm:request_generation_tokens_count",
    "vllm:cache_config_info", "vllm:request_success_total",
]


def samples(url: str) -> list:
    response = httpx.get(f"{url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return [s for family in text_string_to_metric_families(response.text)
            for s in family.samples]


def scrape(url: str) -> dict[str, float]:
    """name -> value for unlabelled-by-anything-but-model series; name{label="x"} otherwise."""
    values = {}
    for s in samples(url):
        assert s.labels.get("model_name") == MODEL, s
        extra = {k: v for k, v in s.labels.items() if k not in ("model_name", "le")}
        if "le" in s.labels:
            continue
        key = s.name
        if extra and s.name.endswith("_success_total"):
            key += "{" + ",".join(f'{k}="{v}"' for k, v in sorted(extra.items())) + "}"
        values[key] = s.value
    return values


@pytest.mark.slow
def test_every_series_is_present_and_moves_with_traffic(live_url):
    before = scrape(live_url)
    for name in BRIM_SERIES:
        assert name in before, name
    assert not any(name.startswith("vllm:") for name in before)
    assert before["brim_kv_cache_blocks_total"] == 160
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
        names = {s.name for s in samples(url)}
        for name in VLLM_SERIES + BRIM_SERIES:
            assert name in names, name
        values = scrape(url)
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

    metrics = ServerMetrics("m", {"block_size": 16, "num_gpu_blocks": 10, "max_model_len": 64,
                                  "gpu_memory_utilization": 0.9})
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
    ServerMetrics("m", {"block_size": 16, "num_gpu_blocks": 10, "max_model_len": 64,
                        "gpu_memory_utilization": 0.9}, enable_vllm_metrics=True)
