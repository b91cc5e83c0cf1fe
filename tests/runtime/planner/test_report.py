"""The memory report: predicted and measured side by side, as JSON and back."""

from __future__ import annotations

import json

import pytest

from brim.runtime.planner.facts import CheckpointFacts
from brim.runtime.planner.memory import GiB, PlanRequest, plan
from brim.runtime.planner.report import MemoryReport, MemoryUse
from tests.runtime.planner.conftest import config


def _report(predicted_blocks: int, measured_blocks: int, **changes) -> MemoryReport:
    def use(blocks):
        return MemoryUse(gpu_memory_bytes=80 * GiB, gpu_memory_utilization=0.9,
                         weights_bytes=16 * GiB, activation_bytes=GiB, non_torch_bytes=GiB,
                         non_kv_bytes=18 * GiB, num_gpu_blocks=blocks)
    values = dict(device="cuda", gpu_memory_utilization=0.9, block_size=16,
                  kv_bytes_per_token=131072, weights_bytes=16 * GiB,
                  num_gpu_blocks=measured_blocks, max_model_len=8192,
                  requested_max_model_len=8192, predicted=use(predicted_blocks),
                  measured=use(measured_blocks))
    return MemoryReport(**{**values, **changes})


def test_the_report_reads_back_what_it_wrote():
    report = _report(1010, 1000)
    text = json.dumps(report.to_json())
    assert MemoryReport.from_json(json.loads(text)) == report
    data = json.loads(text)
    assert data["kv_cache_tokens"] == 16000 and data["fits"] is True
    assert data["num_gpu_blocks_error_percent"] == pytest.approx(1.0)
    assert data["predicted"]["num_gpu_blocks"] == 1010 and data["measured"]["num_gpu_blocks"] == 1000


def test_fits_and_error_percent():
    assert not _report(600, 400).fits  # 400 x 16 = 6400 tokens < 8192
    assert _report(600, 400).num_gpu_blocks_error_percent == pytest.approx(50.0)
    assert _report(600, 400, predicted=None).num_gpu_blocks_error_percent is None
    cpu = _report(0, 0, device="cpu", predicted=None, measured=None, num_gpu_blocks=512)
    assert MemoryReport.from_json(cpu.to_json()) == cpu and cpu.max_concurrency == 1.0


def test_a_plan_predicts_in_the_report_s_terms():
    p = plan(PlanRequest(checkpoint=CheckpointFacts(config=config("Meta-Llama-3-8B-Instruct")),
                         gpu_memory_bytes=80 * GiB))
    use = p.memory_use()
    assert (use.num_gpu_blocks, use.non_kv_bytes, use.weights_bytes) == (
        p.num_gpu_blocks, p.non_kv_bytes, p.weights_bytes)


def test_a_report_without_its_fields_is_refused():
    data = _report(10, 10).to_json()
    del data["block_size"]
    with pytest.raises(ValueError, match="needs `block_size`"):
        MemoryReport.from_json(data)
