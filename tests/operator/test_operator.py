"""The operator end to end against the emulated cluster, kopf running: apply a
ModelDeployment, and the plan, the children and the status follow; edits, deletions, scale,
refusals and API faults are handled without a crash loop or a duplicate."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest

from brim.operator import children as ch
from tests.hub_fixtures import fake_hub  # noqa: F401
from tests.operator.operator_fixtures import (eventually, llama_config, operator,  # noqa: F401
                                              validated)
from tests.operator.planning_helpers import CONFIGS, KUBERNETES_VERSION

LLAMA_WEIGHTS = "16Gi"


def llama_spec(**engine) -> dict:
    return {"model": {"uri": "hf://meta-llama/Llama-3.1-8B-Instruct", "config": llama_config()},
            "gpu": {"products": ["NVIDIA-L4", "NVIDIA-H100-80GB-HBM3"]},
            "engine": {"maxModelLen": "auto", "minModelLen": "16k", **engine}}


def brim_plan(*args) -> dict:
    brim = Path(sys.executable).with_name("brim")
    out = subprocess.run([str(brim), "plan", *args, "--json"], capture_output=True, text=True)
    assert out.returncode in (0, 1), out.stderr
    return json.loads(out.stdout)


def test_apply_plans_before_any_pod_and_creates_the_children(operator, namespace):
    kube = operator.kube
    operator.apply_md(namespace, "llama", llama_spec())
    md = operator.wait_condition(namespace, "llama", "Planned", "True")
    plan = md["status"]["plan"]
    # The same numbers as `brim plan` for the chosen GPU (one L4, auto utilization).
    expected = brim_plan("--config", str(CONFIGS / "Llama-3.1-8B-Instruct.json"),
                         "--gpu", "NVIDIA-L4", "--max-model-len", "auto",
                         "--min-model-len", "16k", "--gpu-memory-utilization", "0.9")
    assert (plan["gpuProduct"], plan["tensorParallelSize"]) == ("NVIDIA-L4", 1)
    for key in ("maxModelLen", "numGpuBlocks", "kvCacheTokens", "nonKvBytes", "weightsBytes",
                "kvBytesPerToken", "gpuMemoryBytes"):
        snake = "".join("_" + c.lower() if c.isupper() else c for c in key)
        assert plan[key] == expected[snake], key
    assert md["status"]["selector"] == ch.selector_string("llama")
    assert md["status"]["endpoint"] == f"http://llama.{namespace}.svc:8000/v1"
    deployment = kube.get("deployments.apps", "llama", namespace)
    service = kube.get("services", "llama", namespace)
    for child in (deployment, service):
        kubernetes_validate.validate(
            {k: v for k, v in child.items() if k != "status"}, KUBERNETES_VERSION, strict=True)
        owner = child["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
            "ModelDeployment", "llama", md["metadata"]["uid"], True)
    pod = deployment["spec"]["template"]["spec"]
    assert pod["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-L4"
    args = pod["containers"][0]["args"]
    assert args[args.index("--max-model-len") + 1] == str(plan["maxModelLen"])
    assert kube.get("poddisruptionbudgets.policy", "llama", namespace) is None  # 1 replica
    # The kubelet runs the pods: the status follows.
    kube.rollout("llama", namespace)
    md = operator.wait_md(namespace, "llama", lambda o: o["status"].get("phase") == "Available")
    assert md["status"]["ready"] == "1/1" and md["status"]["readyReplicas"] == 1


def _deployment(kube, namespace, name="llama"):
    return kube.get("deployments.apps", name, namespace)


def _arg(deployment, flag):
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    return args[args.index(flag) + 1]


def test_scale_through_the_scale_subresource(operator, namespace):
    kube = operator.kube
    operator.apply_md(namespace, "llama", llama_spec())
    operator.wait_condition(namespace, "llama", "Planned", "True")
    kube.kubectl("scale", "-n", namespace, "md/llama", "--replicas=3")
    eventually(lambda: _deployment(kube, namespace)["spec"]["replicas"] == 3)
    assert kube.get("poddisruptionbudgets.policy", "llama", namespace)["spec"][
        "maxUnavailable"] == 1
    kube.rollout("llama", namespace)
    md = operator.wait_md(namespace, "llama", lambda o: o["status"].get("readyReplicas") == 3)
    assert md["status"]["replicas"] == 3 and md["status"]["ready"] == "3/3"
    scale = json.loads(kube.kubectl("get", "--raw", f"/apis/brim.dev/v1alpha1/namespaces/"
                                    f"{namespace}/modeldeployments/llama/scale").stdout)
    assert scale["status"]["selector"] == ch.selector_string("llama")
    assert scale["spec"]["replicas"] == 3


def test_an_edit_patches_the_children_and_is_observed(operator, namespace):
    kube = operator.kube
    operator.apply_md(namespace, "llama", llama_spec())
    operator.wait_condition(namespace, "llama", "Planned", "True")
    before = _deployment(kube, namespace)
    operator.apply_md(namespace, "llama", llama_spec(maxNumSeqs=32))
    md = operator.wait_condition(namespace, "llama", "Planned", "True")
    assert md["metadata"]["generation"] == 2 and md["status"]["observedGeneration"] == 2
    after = eventually(lambda: (d := _deployment(kube, namespace)) and
                       _arg(d, "--max-num-seqs") == "32" and d)
    assert after["metadata"]["uid"] == before["metadata"]["uid"]  # patched, not replaced
    assert md["status"]["plan"]["maxNumSeqs"] == 32


def test_deleted_and_edited_children_come_back(operator, namespace):
    kube = operator.kube
    operator.apply_md(namespace, "llama", llama_spec())
    operator.wait_condition(namespace, "llama", "Planned", "True")
    kube.delete("deployments.apps", "llama", namespace=namespace)
    kube.delete("services", "llama", namespace=namespace)
    eventually(lambda: _deployment(kube, namespace) and kube.get("services", "llama", namespace))
    kube.patch("deployments.apps", "llama", {"spec": {"template": {"spec": {"containers": [
        {"name": "runtime", "image": "someone/else:latest"}]}}}}, namespace=namespace)
    restored = eventually(lambda: (d := _deployment(kube, namespace)) and d["spec"]["template"][
        "spec"]["containers"][0]["image"] == operator.settings.runtime_image and d)
    assert _arg(restored, "--max-model-len")


def test_a_spec_that_fits_nowhere_launches_nothing(operator, namespace):
    kube = operator.kube
    spec = llama_spec()
    spec["model"]["config"] = json.loads((CONFIGS / "Llama-3.1-70B-Instruct.json").read_text())
    spec["gpu"] = {"products": ["NVIDIA-L4"]}
    operator.apply_md(namespace, "big", spec)
    md = operator.wait_condition(namespace, "big", "Planned", "False", "DoesNotFit")
    message = next(c["message"] for c in md["status"]["conditions"] if c["type"] == "Planned")
    assert "131.5 GiB of weights" in message and "NVIDIA-L4 has 22.5 GiB x 1 per node" in message
    assert "NVIDIA-H100-80GB-HBM3" in message
    assert md["status"]["phase"] == "DoesNotFit" and md["status"]["plan"]["fits"] is False
    assert _deployment(kube, namespace, "big") is None
    assert kube.get("services", "big", namespace) is None
    # kopf posts events in the background: they follow shortly.
    eventually(lambda: any(e.get("reason") == "DoesNotFit" for e in kube.list("events", namespace)
                           if e.get("involvedObject", {}).get("name") == "big"))


def test_an_edit_that_no_longer_fits_leaves_the_running_deployment_alone(operator, namespace):
    kube = operator.kube
    operator.apply_md(namespace, "llama", llama_spec())
    operator.wait_condition(namespace, "llama", "Planned", "True")
    kube.rollout("llama", namespace)
    before = _deployment(kube, namespace)
    bad = llama_spec()
    bad["gpu"] = {"products": ["NVIDIA-L4"]}
    bad["engine"] = {"maxModelLen": 131072}
    operator.apply_md(namespace, "llama", bad)
    md = operator.wait_condition(namespace, "llama", "Degraded", "True", "EditRefused")
    assert md["status"]["phase"] == "Degraded" and md["status"]["lastGoodPlanGeneration"] == 1
    planned = next(c for c in md["status"]["conditions"] if c["type"] == "Planned")
    assert (planned["status"], planned["reason"]) == ("False", "DoesNotFit")
    assert "maxModelLen <= " in planned["message"]
    after = _deployment(kube, namespace)
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    # Fixing the edit rolls forward again.
    operator.apply_md(namespace, "llama", llama_spec())
    operator.wait_condition(namespace, "llama", "Degraded", "False")


def _fit_failure_report(plan: dict, extra_bytes: int) -> str:
    """What a runtime on the planned GPU writes to its termination message when it measures
    `extra_bytes` more non-KV memory than predicted (brim serve --memory-report-path)."""
    from brim.runtime.planner.report import MemoryReport, MemoryUse

    block_bytes = plan["kvBytesPerToken"] * plan["blockSize"]
    predicted = MemoryUse(gpu_memory_bytes=plan["gpuMemoryBytes"],
                          gpu_memory_utilization=plan["gpuMemoryUtilization"],
                          weights_bytes=plan["weightsBytes"],
                          activation_bytes=plan["activationBytes"],
                          non_torch_bytes=plan["nonTorchBytes"],
                          non_kv_bytes=plan["nonKvBytes"], num_gpu_blocks=plan["numGpuBlocks"])
    measured_blocks = plan["numGpuBlocks"] - -(-extra_bytes // block_bytes)
    measured = dataclasses.replace(predicted, non_torch_bytes=plan["nonTorchBytes"] + extra_bytes,
                                   non_kv_bytes=plan["nonKvBytes"] + extra_bytes,
                                   num_gpu_blocks=measured_blocks)
    report = MemoryReport(device="cuda", gpu_memory_utilization=plan["gpuMemoryUtilization"],
                          block_size=plan["blockSize"], kv_bytes_per_token=plan["kvBytesPerToken"],
                          weights_bytes=plan["weightsBytes"], num_gpu_blocks=measured_blocks,
                          max_model_len=plan["maxModelLen"],
                          requested_max_model_len=plan["maxModelLen"], predicted=predicted,
                          measured=measured)
    assert not report.fits
    return json.dumps(report.to_json())


def _crash_with_report(kube, namespace, name, message):
    """Play the kubelet: every runtime pod's container exited with this termination message
    and is waiting to restart."""
    pods = kube.rollout(name, namespace, ready=False)
    for pod in pods:
        status = dict(pod["status"])
        status["containerStatuses"] = [{
            "name": "runtime", "ready": False, "restartCount": 1, "image": "x", "imageID": "",
            "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"exitCode": 1, "reason": "Error", "message": message}}}]
        kube.set_status("pods", pod["metadata"]["name"], status, namespace=namespace)


def test_a_pod_that_cannot_fit_is_replanned_with_what_it_measured(operator, namespace):
    kube = operator.kube
    operator.apply_md(namespace, "llama", llama_spec())
    md = operator.wait_condition(namespace, "llama", "Planned", "True")
    plan = md["status"]["plan"]
    extra = 512 * 2**20
    _crash_with_report(kube, namespace, "llama", _fit_failure_report(plan, extra))
    md = operator.wait_md(namespace, "llama", lambda o: o["status"]["plan"].get(
        "extraNonKvBytes") == extra)
    measured = md["status"]["measured"]
    assert (measured["source"], measured["fits"]) == ("termination-message", False)
    assert measured["nonKvBytes"] - measured["predictedNonKvBytes"] == extra
    assert measured["errorPercent"] > 0  # the prediction was optimistic
    corrected = md["status"]["plan"]
    assert corrected["maxModelLen"] < plan["maxModelLen"]
    assert corrected["nonKvBytes"] == plan["nonKvBytes"] + extra
    eventually(lambda: _arg(_deployment(kube, namespace), "--max-model-len") ==
               str(corrected["maxModelLen"]))
    assert md["status"]["conditions"][0]["status"] == "True"


def test_an_explicit_length_that_cannot_fit_stops_instead_of_crash_looping(operator, namespace):
    kube = operator.kube
    spec = llama_spec()
    spec["gpu"] = {"products": ["NVIDIA-L4"]}
    spec["engine"] = {"maxModelLen": 20000}
    operator.apply_md(namespace, "llama", spec)
    md = operator.wait_condition(namespace, "llama", "Planned", "True")
    plan = md["status"]["plan"]
    assert _deployment(kube, namespace)["spec"]["replicas"] == 1
    _crash_with_report(kube, namespace, "llama", _fit_failure_report(plan, 2 * 2**30))
    md = operator.wait_condition(namespace, "llama", "Degraded", "True", "DoesNotFitMeasured")
    assert _deployment(kube, namespace)["spec"]["replicas"] == 0
    degraded = next(c for c in md["status"]["conditions"] if c["type"] == "Degraded")
    assert "maxModelLen <= " in degraded["message"]
    assert md["status"]["phase"] == "Degraded"
    # Lowering the length brings the replicas back.
    spec["engine"] = {"maxModelLen": 4096}
    operator.apply_md(namespace, "llama", spec)
    operator.wait_condition(namespace, "llama", "Degraded", "False")
    eventually(lambda: _deployment(kube, namespace)["spec"]["replicas"] == 1)


def test_api_errors_and_timeouts_converge_without_duplicates(operator, namespace):
    kube = operator.kube
    kube.fail("create", "deployments.apps", code=500, times=2, namespace=namespace)
    kube.fail("create", "services", code=409, times=1, namespace=namespace)
    kube.fail("patch", "md", code=500, times=2, subresource="status", namespace=namespace)
    kube.hang("list", "nodes", seconds=12, times=1)
    operator.apply_md(namespace, "llama", llama_spec())
    operator.wait_condition(namespace, "llama", "Planned", "True", timeout=40)
    eventually(lambda: kube.get("services", "llama", namespace))
    assert len(kube.list("deployments.apps", namespace)) == 1
    assert len(kube.list("services", namespace)) == 1
    assert kube.faults.pending() == []  # every injected fault was met


def test_twenty_at_once_one_broken_the_others_planned(operator, namespace):
    names = [f"m{i:02d}" for i in range(20)]
    for name in names:
        spec = llama_spec()
        if name == "m07":  # a config the planner cannot read: one bad resource
            spec["model"]["config"] = {"model_type": "mystery", "width": 5}
        operator.apply_md(namespace, name, spec)
    for name in names:
        if name == "m07":
            md = operator.wait_condition(namespace, name, "Planned", "False", "ModelUnreadable",
                                         timeout=60)
            message = md["status"]["conditions"][0]["message"]
            assert "hidden_size" in message and "spec.model.config" in message
        else:
            operator.wait_condition(namespace, name, "Planned", "True", timeout=60)
    assert len(operator.kube.list("deployments.apps", namespace)) == 19


def test_kubectl_apply_get_describe_scale(operator, namespace, tmp_path):
    kube = operator.kube
    examples = Path(__file__).parents[2] / "examples"
    applied = kube.kubectl("apply", "--validate=false", "-n", namespace, "-f", str(examples))
    assert applied.stdout.count("created") == 3  # every example, as written
    operator.wait_condition(namespace, "smollm2", "Planned", "True")
    table = kube.kubectl("get", "md", "-n", namespace).stdout
    header, *rows = table.splitlines()
    for column in ("MODEL", "GPU", "TP", "MAX-LEN", "KV-TOKENS", "READY", "STATUS", "AGE"):
        assert column in header
    assert sorted(row.split()[0] for row in rows) == ["llama-8b", "qwen2-7b", "smollm2"]
    smol = next(row for row in rows if row.startswith("smollm2"))
    assert smol.split()[:2] == ["smollm2", "bundled"] and "4000" in smol
    described = kube.kubectl("describe", "md", "smollm2", "-n", namespace).stdout
    assert "Planned" in described and "Max Model Len" in described
    kube.kubectl("scale", "md/smollm2", "-n", namespace, "--replicas=2")
    eventually(lambda: _deployment(kube, namespace, "smollm2")["spec"]["replicas"] == 2)
    # The gated hub model without its secret says what is missing.
    llama = operator.wait_condition(namespace, "llama-8b", "Planned", "False", "ModelUnreadable")
    assert "hf-token" in llama["status"]["conditions"][0]["message"]


def _play_job_controller(kube, namespace, checkpoint: Path, *, message: str | None = None) -> str:
    """Wait for the operator's inspect Job, run its command (the real `brim facts`) on a real
    checkpoint folder standing for the claim, and report the pod and the Job as done (with
    `message` instead of the command's termination message, when given)."""
    job = eventually(lambda: next((j for j in kube.list("jobs.batch", namespace)
                                   if not (j.get("status") or {}).get("succeeded")
                                   and not (j.get("status") or {}).get("failed")), None))
    container = job["spec"]["template"]["spec"]["containers"][0]
    command = container["command"]
    assert command[:2] == ["brim", "facts"] and command[2].startswith("/models/")
    termination = checkpoint.parent / "termination-log"
    brim = Path(sys.executable).with_name("brim")
    result = subprocess.run([str(brim), "facts", str(checkpoint), "--output", str(termination)],
                            capture_output=True, text=True)
    name = job["metadata"]["name"]
    pod = kube.create({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": f"{name}-x", "namespace": namespace,
                     "labels": {**job["spec"]["template"]["metadata"]["labels"],
                                "job-name": name}},
        "spec": job["spec"]["template"]["spec"]}, namespace)
    exit_code = result.returncode
    kube.set_status("pods", pod["metadata"]["name"], {
        "phase": "Succeeded" if exit_code == 0 else "Failed",
        "containerStatuses": [{"name": "facts", "ready": False, "restartCount": 0, "image": "x",
                               "imageID": "", "state": {"terminated": {
                                   "exitCode": exit_code, "reason": "Completed",
                                   "message": termination.read_text() if message is None
                                   else message}}}]}, namespace=namespace)
    kube.set_status("jobs.batch", name, {"succeeded": 1} if exit_code == 0 else {"failed": 1},
                    namespace=namespace)
    return name


def test_a_pvc_model_is_read_by_a_job_and_planned_from_its_headers(operator, namespace,
                                                                   tmp_path):
    from tests.hub_fixtures import write_tiny_llama

    kube = operator.kube
    checkpoint = write_tiny_llama(tmp_path / "tiny")
    operator.apply_md(namespace, "tiny", {"model": {"uri": "pvc://models/tiny"},
                                          "gpu": {"products": ["NVIDIA-L4"]},
                                          "engine": {"maxModelLen": "auto"}})
    md = operator.wait_condition(namespace, "tiny", "Planned", "Unknown", "ReadingModel")
    assert md["status"]["phase"] == "Pending"
    job = _play_job_controller(kube, namespace, checkpoint)
    md = operator.wait_condition(namespace, "tiny", "Planned", "True")
    from brim.runtime.planner.facts import read_checkpoint

    plan = md["status"]["plan"]
    local = read_checkpoint(checkpoint)
    assert plan["weightsSource"] == "safetensors"
    # Exact weight bytes from the headers (fp32 checkpoint served in float32: "auto" keeps
    # the checkpoint's dtype on GPU) plus the RoPE table.
    assert plan["weightsBytes"] == local.checkpoint_weights_bytes(4, 1) + 256 * 2 * 16 * 4
    assert plan["derivedMaxModelLen"] == 200  # the tokenizer's limit, read from the volume
    eventually(lambda: kube.get("jobs.batch", job, namespace) is None)  # cleaned up
    deployment = _deployment(kube, namespace, "tiny")
    assert _arg(deployment, "--model") == "/models/tiny"


def test_an_hf_model_is_planned_from_the_hub_without_its_weights(operator, namespace, tmp_path,
                                                                 fake_hub):
    from tests.hub_fixtures import write_tiny_llama

    kube = operator.kube
    folder = write_tiny_llama(tmp_path / "tiny")
    fake_hub.add_repo("acme/tiny", folder, token="hf_right")
    kube.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hf"},
                 "data": {"token": "aGZfcmlnaHQ="}}, namespace)  # hf_right
    operator.apply_md(namespace, "gated", {"model": {"uri": "hf://acme/tiny"},
                                           "gpu": {"products": ["NVIDIA-L4"]}})
    md = operator.wait_condition(namespace, "gated", "Planned", "False", "ModelUnreadable")
    assert "tokenSecretRef" in md["status"]["conditions"][0]["message"]
    operator.apply_md(namespace, "tiny", {"model": {"uri": "hf://acme/tiny",
                                                    "tokenSecretRef": {"name": "hf"}},
                                          "gpu": {"products": ["NVIDIA-L4"]}})
    md = operator.wait_condition(namespace, "tiny", "Planned", "True")
    assert md["status"]["plan"]["weightsSource"] == "safetensors"
    sent = fake_hub.bytes_sent("acme/tiny")
    weights = folder / "model.safetensors"
    assert 0 < sent["model.safetensors"] < weights.stat().st_size / 10  # headers, not weights
    env = {e["name"]: e for e in _deployment(kube, namespace, "tiny")["spec"]["template"][
        "spec"]["containers"][0]["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "token"}


@pytest.mark.slow
def test_a_serving_pod_reports_what_it_measured(operator, namespace, tmp_path):
    """A real `brim serve` on CPU plays the pod: the operator reads its memory report over
    HTTP once it is ready, and records it in status.measured."""
    from brim.runtime.models.bundled import bundled_model_path
    from tests.operator.operator_fixtures import POD_IP

    kube = operator.kube
    operator.apply_md(namespace, "smol", {
        "model": {"uri": "bundled"}, "device": "cpu",
        "resources": {"requests": {"memory": "2Gi"}}, "engine": {"maxModelLen": 1024,
                                                                 "maxNumSeqs": 4}})
    md = operator.wait_condition(namespace, "smol", "Planned", "True")
    deployment = _deployment(kube, namespace, "smol")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    # Run exactly the pod's command, on the pod's address.
    args = [a for a in args]
    args[args.index("--host") + 1] = POD_IP
    args[args.index("--memory-report-path") + 1] = str(tmp_path / "termination-log")
    brim = Path(sys.executable).with_name("brim")
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([str(brim), *args, "--model", str(bundled_model_path())],
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        import httpx

        url = f"http://{POD_IP}:{operator.settings.runtime_port}"

        def healthy():
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                return httpx.get(f"{url}/health", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        eventually(healthy, timeout=120, interval=0.5)
        kube.rollout("smol", namespace, ready=True, pod_ip=POD_IP)
        md = operator.wait_md(namespace, "smol",
                              lambda o: (o["status"].get("measured") or {}).get("source") == "http")
        measured = md["status"]["measured"]
        report = httpx.get(f"{url}/memory").json()
        assert measured["numGpuBlocks"] == report["num_gpu_blocks"] == \
            md["status"]["plan"]["numGpuBlocks"]
        assert measured["weightsBytes"] == report["weights_bytes"] and measured["fits"] is True
        assert measured["pod"].startswith("smol")
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_a_measured_correction_outlives_later_edits(operator, namespace):
    kube = operator.kube
    operator.apply_md(namespace, "llama", llama_spec())
    md = operator.wait_condition(namespace, "llama", "Planned", "True")
    extra = 256 * 2**20
    _crash_with_report(kube, namespace, "llama", _fit_failure_report(md["status"]["plan"], extra))
    operator.wait_md(namespace, "llama",
                     lambda o: o["status"]["plan"].get("extraNonKvBytes") == extra)
    # The corrected pods serve; an edit plans again, still with what the GPU taught.
    operator.apply_md(namespace, "llama", llama_spec(maxNumSeqs=64))
    md = operator.wait_condition(namespace, "llama", "Planned", "True")
    assert md["status"]["plan"]["maxNumSeqs"] == 64
    assert md["status"]["plan"]["extraNonKvBytes"] == extra
