"""brim's dashboards and alerts against the metrics the runtime really exports.

- promtool checks the rules file and runs its unit tests (rules_test.yaml), and a broken copy
  of each alert fails them: the unit tests can tell an alert that fires from one that does not.
- Every metric name a dashboard panel, a dashboard variable or an alert uses is one that
  `ServerMetrics` exports (parsed out of the expressions, compared with the exposition's
  sample names: `_bucket`, `_sum`, `_count` and `_total` are part of a sample's name there).
- A real Prometheus (Debian's) scrapes a live `brim serve` on CPU every second under a short
  load, with the labels prometheus-operator gives a ServiceMonitor's targets (`namespace`,
  `job` = the ModelDeployment's name, `pod`); it loads the rules, and every dashboard query,
  variable query and alert expression is evaluated through its HTTP API, as Grafana would
  send it once the variables are filled in.
"""

from __future__ import annotations

import json
import math
import re
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from brim.runtime.planner.report import MemoryReport, MemoryUse
from brim.runtime.server.metrics import ServerMetrics
from tests import tools
from tests.runtime.conftest import bundled_model_dir  # noqa: F401  (fixture)
from tests.runtime.server.conftest import MODEL, serve, server_engine  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "charts" / "brim" / "dashboards").glob("*.json"))
RULES = ROOT / "charts" / "brim" / "rules" / "brim-rules.yaml"
RULES_TEST = Path(__file__).with_name("rules_test.yaml")
OPERATIONS = ROOT / "docs" / "operations.md"
RUNBOOK_BASE = "https://github.com/brim-dev/brim/blob/main/docs/operations.md#"

# What the scrape of the live server is labelled with, and what Grafana's variables become.
NAMESPACE, DEPLOYMENT, POD = "brim-test", "smollm2", "smollm2-7d9f-x2x4z"
VARIABLES = {"namespace": NAMESPACE, "model_deployment": DEPLOYMENT, "pod": POD,
             "__rate_interval": "1m", "datasource": "prometheus"}

# Names from outside the runtime: Prometheus' own, and kube-state-metrics' (one alert, which
# says it needs kube-state-metrics).
PROMETHEUS_NAMES = {"up"}
KUBE_STATE_METRICS_NAMES = {"kube_deployment_spec_replicas",
                            "kube_deployment_status_replicas_available"}
# Exported only where there is a prediction and a measurement to report: CUDA.
CUDA_ONLY_NAMES = {"brim_memory_activation_bytes", "brim_memory_non_torch_bytes",
                   "brim_memory_non_kv_bytes", "brim_gpu_memory_bytes"}


# -- reading the dashboards and the rules ---------------------------------------------------------


def load_dashboard(path: Path) -> dict:
    return json.loads(path.read_text())


def panels(board: dict) -> list[dict]:
    """Every panel, rows' collapsed children included, rows themselves excluded."""
    out = []
    for panel in board["panels"]:
        if panel["type"] == "row":
            out.extend(panel.get("panels", []))
        else:
            out.append(panel)
    return out


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, expr) for every panel target."""
    return [(path.name, panel["title"], target["expr"])
            for path in DASHBOARDS for panel in panels(load_dashboard(path))
            for target in panel["targets"]]


def variable_queries() -> list[tuple[str, str, str]]:
    """(dashboard file, variable name, PromQL) for every query variable: Grafana's
    `label_values(selector, label)` is `group by (label) (selector)` in PromQL."""
    out = []
    for path in DASHBOARDS:
        for var in load_dashboard(path)["templating"]["list"]:
            if var["type"] != "query":
                continue
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
            assert match, f"{path.name} ${var['name']}: not a label_values(...) query: {query}"
            out.append((path.name, var["name"], f"group by ({match[2]}) ({match[1]})"))
    return out


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"]
            for rule in group["rules"]]


def concrete(expr: str) -> str:
    """Grafana's variables replaced by values, as Grafana does before sending a query."""
    def value(match: re.Match) -> str:
        name = match[1] or match[2]
        assert name in VARIABLES, f"unknown variable ${name} in {expr}"
        return VARIABLES[name]
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
             "group_right", "bool", "offset", "inf", "nan"}
_TOKEN = re.compile(r"""
    "(?:[^"\\]|\\.)*" | '(?:[^'\\]|\\.)*' | `[^`]*`     # strings
  | \{[^}]*\}                                          # label matchers
  | \[[^\]]*\]                                         # ranges and subqueries
  | \b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)   # label lists
  | \d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?:ms|[smhdwy])?\b   # numbers and durations
  | (?P<name>[A-Za-z_:][A-Za-z0-9_:]*)
""", re.VERBOSE)
# What follows a function or an aggregation: `rate(`, `sum by (...) (`, `topk without (...)`.
_CALL = re.compile(r"\s*(?:\(|(?:by|without)\s*\()")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not its functions, keywords or labels)."""
    names = set()
    for match in _TOKEN.finditer(expr):
        name = match["name"]
        if (name and name.lower() not in _KEYWORDS
                and not _CALL.match(expr, match.end())):
            names.add(name)
    return names


def every_expression() -> list[tuple[str, str]]:
    """(where, PromQL) for every dashboard query and variable query, with the variables filled
    in, and every alert."""
    return ([(f"{board}: {title}", concrete(expr)) for board, title, expr in dashboard_queries()]
            + [(f"{board}: ${name}", concrete(expr)) for board, name, expr in variable_queries()]
            + [(f"alert {rule['alert']}", rule["expr"]) for rule in alert_rules()])


def exported_sample_names(metrics: ServerMetrics) -> set[str]:
    """The names of the samples in the exposition: `x_total`, `x_bucket`, `x_sum`, ..."""
    text = metrics.render()[0].decode()
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def cuda_report() -> MemoryReport:
    use = MemoryUse(gpu_memory_bytes=24 * 2**30, gpu_memory_utilization=0.9,
                    weights_bytes=16 * 2**30, activation_bytes=2**30, non_torch_bytes=2**29,
                    non_kv_bytes=35 * 2**29, num_gpu_blocks=2600)
    return MemoryReport(device="cuda", gpu_memory_utilization=0.9, block_size=16,
                        kv_bytes_per_token=131072, weights_bytes=16 * 2**30,
                        num_gpu_blocks=2600, max_model_len=32768, requested_max_model_len=32768,
                        predicted=use, measured=use)


# -- the parsing the checks below rely on ---------------------------------------------------------


def test_metric_names_are_read_out_of_promql():
    assert metric_names(
        'histogram_quantile(0.95, sum by (namespace, le) (rate(brim_time_to_first_token_seconds_'
        'bucket{namespace="a", job=~"b|c"}[5m]))) > 1e-3') == {
        "brim_time_to_first_token_seconds_bucket"}
    assert metric_names(
        'up == 0 and on (namespace, job, instance) max by (job) (max_over_time(x_ratio[1h]))'
        ' unless ignoring(source) y offset 5m') == {"up", "x_ratio", "y"}
    assert metric_names('label_replace(max(a:b_total), "deployment", "$1", "job", "(.*)")'
                        ' / on() group_left(pod) c * 2') == {"a:b_total", "c"}
    assert metric_names(concrete('sum(rate(brim_prompt_tokens_total{namespace="$namespace"}'
                                 '[$__rate_interval]))')) == {"brim_prompt_tokens_total"}
    with pytest.raises(AssertionError, match="unknown variable"):
        concrete("x{a=\"$nope\"}")


# -- promtool -------------------------------------------------------------------------------------


def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([str(tools.promtool()), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60)


def test_rules_pass_promtool_check():
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_rules_unit_tests_pass():
    result = promtool("test", "rules", str(RULES_TEST))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_case_that_fires_and_one_that_does_not():
    cases = [case for test in yaml.safe_load(RULES_TEST.read_text())["tests"]
             for case in test["alert_rule_test"]]
    for rule in alert_rules():
        mine = [case for case in cases if case["alertname"] == rule["alert"]]
        assert any(case["exp_alerts"] for case in mine), f"{rule['alert']} never fires"
        assert any(not case["exp_alerts"] for case in mine), f"{rule['alert']} never stays silent"


def failing_cases(tmp_path: Path, alert: str, expr: str) -> set[tuple[str, int]]:
    """(test name, eval_time) of the unit-test cases that fail when `alert` is `expr` with
    no `for`."""
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            if rule["alert"] == alert:
                rule["expr"], rule["for"] = expr, "0s"
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(doc))
    tests = yaml.safe_load(RULES_TEST.read_text())
    tests["rule_files"] = ["rules.yaml"]
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(tests))
    result = promtool("test", "rules", "test.yaml", cwd=tmp_path)
    assert result.returncode in (0, 1), result.stdout + result.stderr
    return {(name, seconds(time)) for name, time in re.findall(
        r"^\s+name: (.+),\n\s+alertname: \w+, time: (\w+),", result.stdout + result.stderr,
        re.MULTILINE)}


def seconds(duration: str) -> int:
    """A Prometheus duration ("75m", "1h15m") in seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    parts = re.findall(r"(\d+)([smhdw])", duration)
    assert "".join(n + u for n, u in parts) == duration, duration
    return sum(int(n) * units[u] for n, u in parts)


def cases_of(alert: str, firing: bool) -> set[tuple[str, int]]:
    return {(test["name"], seconds(case["eval_time"]))
            for test in yaml.safe_load(RULES_TEST.read_text())["tests"]
            for case in test["alert_rule_test"]
            if case["alertname"] == alert and bool(case["exp_alerts"]) == firing}


@pytest.mark.parametrize("alert", [rule["alert"] for rule in alert_rules()])
def test_the_unit_tests_catch_an_alert_that_never_fires_or_always_does(tmp_path, alert):
    # Never fires: exactly the cases that expect it fail.
    assert failing_cases(tmp_path, alert, "vector(1) == 2") == cases_of(alert, firing=True)
    # Always fires: every case that expects silence fails too.
    assert cases_of(alert, firing=False) <= failing_cases(tmp_path, alert, "vector(1)")


def test_every_alert_says_what_to_do_and_links_its_runbook():
    headings = {slug(line.lstrip("#").strip()) for line in OPERATIONS.read_text().splitlines()
                if line.startswith("#")}
    for rule in alert_rules():
        name = rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert {"summary", "description", "runbook_url"} <= set(rule["annotations"]), name
        url = rule["annotations"]["runbook_url"]
        assert url == RUNBOOK_BASE + name.lower(), name
        assert name.lower() in headings, f"docs/operations.md has no section for {name}"


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.lower())
    return text.replace(" ", "-")


# -- the dashboards -------------------------------------------------------------------------------


def test_dashboards_are_templated_grafana_json():
    assert {path.name for path in DASHBOARDS} >= {"brim-model-deployment.json"}
    uids = set()
    for path in DASHBOARDS:
        board = load_dashboard(path)
        assert board["uid"] not in uids and len(board["uid"]) <= 40, path.name
        uids.add(board["uid"])
        assert board["title"].startswith("brim") and "brim" in board["tags"], path.name
        variables = {var["name"]: var for var in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        assert "namespace" in variables, path.name
        for var in variables.values():
            if var["type"] == "query":
                assert var["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        ids = [panel["id"] for panel in board["panels"]] + [
            child["id"] for row in board["panels"] for child in row.get("panels", [])]
        assert len(ids) == len(set(ids)), f"{path.name}: panel ids repeat"
        for panel in panels(board):
            where = f"{path.name}: {panel['title']}"
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, where
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
            assert panel["targets"] and panel.get("description"), where
            for target in panel["targets"]:
                assert target["datasource"] == panel["datasource"], where
                used = set(re.findall(r"\$\{?(\w+)", target["expr"])) - {"__rate_interval"}
                assert used <= set(variables), f"{where}: undefined variables {used}"


def test_the_model_deployment_dashboard_selects_one_deployment_everywhere():
    board = load_dashboard(DASHBOARDS[[p.name for p in DASHBOARDS].index(
        "brim-model-deployment.json")])
    variables = {var["name"]: var for var in board["templating"]["list"]}
    assert variables["model_deployment"]["label"] == "ModelDeployment"
    assert variables["model_deployment"]["definition"].endswith(", job)")
    for panel in panels(board):
        for target in panel["targets"]:
            for selector in re.findall(r"\w+\{[^}]*\}", target["expr"]):
                assert 'namespace="$namespace"' in selector, (panel["title"], selector)
                assert 'job="$model_deployment"' in selector, (panel["title"], selector)


def test_the_dashboards_cover_what_operators_look_for():
    exprs = " ".join(expr for _, _, expr in dashboard_queries())
    for needed in ("brim_kv_cache_usage_ratio", "brim_kv_cache_blocks_used",
                   "brim_kv_cache_num_gpu_blocks", "brim_memory_non_kv_bytes",
                   "brim_num_requests_running", "brim_num_requests_waiting",
                   "brim_num_preemptions_total", "brim_time_to_first_token_seconds_bucket",
                   "brim_inter_token_latency_seconds_bucket",
                   "brim_e2e_request_latency_seconds_bucket", "brim_prompt_tokens_total",
                   "brim_generation_tokens_total", "brim_prefix_cache_hits_total",
                   "brim_request_success_total"):
        assert needed in exprs, needed
    assert "vllm:" not in exprs


# -- names: every one a dashboard or an alert uses is exported ------------------------------------


def test_every_metric_name_used_is_exported():
    exported = exported_sample_names(ServerMetrics(MODEL, cuda_report()))
    for where, expr in every_expression():
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr}"
        outside = names - exported - PROMETHEUS_NAMES
        if where == "alert BrimReplicasUnavailable":
            outside -= KUBE_STATE_METRICS_NAMES
        assert not outside, f"{where} uses {sorted(outside)}, which the runtime does not export"


def test_the_exposition_passes_promtools_naming_lint():
    """Base units, `_total` on counters only, HELP on every family (vLLM's `:` names aside)."""
    text = ServerMetrics(MODEL, cuda_report()).render()[0]
    result = subprocess.run([str(tools.promtool()), "check", "metrics"], input=text,
                            capture_output=True, timeout=60)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


def test_the_name_check_fails_on_a_name_the_runtime_does_not_export():
    exported = exported_sample_names(ServerMetrics(MODEL, cuda_report()))
    for wrong in ("brim_num_preemptions", "brim_time_to_first_token_seconds",
                  "brim_kv_cache_blocks_total", "vllm:gpu_cache_usage_perc"):
        assert metric_names(f"rate({wrong}[5m])") - exported == {wrong}
    assert CUDA_ONLY_NAMES <= exported


# -- a real Prometheus scraping a live server -----------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def send_load(base_url: str) -> int:
    """A few dozen requests with the openai client, some streamed; returns how many."""
    import openai

    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0,
                           timeout=120)
    system = ("You are a helpful assistant who answers in one short sentence, "
              "and never more than that.")

    def chat(i: int) -> None:
        client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0, messages=[
            {"role": "system", "content": system},
            {"role": "user", "content": f"Name a colour, please ({i})."}])

    def streamed(i: int) -> None:
        stream = client.completions.create(model=MODEL, prompt=f"Count to {i}:", max_tokens=10,
                                           stream=True, stream_options={"include_usage": True})
        for _ in stream:
            pass

    def stopped(i: int) -> None:
        client.completions.create(model=MODEL, prompt="The capital of France is", stop=["."],
                                  max_tokens=12, temperature=0)

    jobs = [(chat, i) for i in range(14)] + [(streamed, i) for i in range(12)] + [
        (stopped, i) for i in range(6)]
    with ThreadPoolExecutor(8) as pool:
        for future in [pool.submit(fn, i) for fn, i in jobs]:
            future.result()
    return len(jobs)


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expr: str) -> list[dict]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=30)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", (expr, body)
        return body["data"]["result"]


@pytest.fixture(scope="module")
def scraped(server_engine, tmp_path_factory):  # noqa: F811  (server_engine is a fixture)
    """A live server under load, scraped every second by a real Prometheus with the rules."""
    tmp = tmp_path_factory.mktemp("prometheus")
    with serve(server_engine) as base_url:
        target = base_url.removeprefix("http://")
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                       "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{
                # prometheus-operator: job = the Service's name = the ModelDeployment's.
                "job_name": DEPLOYMENT,
                "static_configs": [{"targets": [target], "labels": {
                    "namespace": NAMESPACE, "pod": POD, "service": DEPLOYMENT,
                    "endpoint": "http", "container": "runtime"}}],
            }],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        log = (tmp / "prometheus.log").open("w")
        process = subprocess.Popen(
            [str(tools.prometheus()), f"--config.file={tmp / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT)
        prometheus = Prometheus(f"http://127.0.0.1:{port}")
        try:
            wait_for(lambda: httpx.get(f"{prometheus.url}/-/ready").status_code == 200,
                     "Prometheus to start", tmp / "prometheus.log")
            wait_for(lambda: prometheus.query(f'up{{job="{DEPLOYMENT}"}} == 1'),
                     "Prometheus to scrape the server", tmp / "prometheus.log")
            num_requests = send_load(base_url)
            # Wait until Prometheus has scraped the last of it.
            served = sample_value(base_url, "brim_e2e_request_latency_seconds_count")
            assert served >= num_requests
            wait_for(lambda: prometheus.query(
                f"brim_e2e_request_latency_seconds_count >= {served}"),
                "Prometheus to scrape the load", tmp / "prometheus.log")
            yield prometheus
        finally:
            process.terminate()
            process.wait(timeout=30)
            log.close()


def sample_value(base_url: str, name: str) -> float:
    text = httpx.get(f"{base_url}/metrics").text
    return next(s.value for family in text_string_to_metric_families(text)
                for s in family.samples if s.name == name)


def wait_for(predicate, what: str, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except (httpx.HTTPError, AssertionError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.25)


@pytest.mark.slow
def test_every_query_evaluates_on_a_live_scrape(scraped):
    prometheus = scraped
    for where, expr in every_expression():
        prometheus.query(expr)  # asserts status "success": it parsed and ran


@pytest.mark.slow
def test_the_variables_find_the_namespace_deployment_and_pod(scraped):
    prometheus = scraped
    for board, name, expr in variable_queries():
        values = {series["metric"][re.search(r"group by \((\w+)\)", expr)[1]]
                  for series in prometheus.query(concrete(expr))}
        expected = {"namespace": NAMESPACE, "model_deployment": DEPLOYMENT, "pod": POD}[name]
        assert values == {expected}, (board, name, values)


def panel_values(prometheus: Prometheus, title: str) -> list[float]:
    exprs = [expr for board, panel, expr in dashboard_queries()
             if board == "brim-model-deployment.json" and panel == title]
    assert exprs, title
    return [float(series["value"][1]) for expr in exprs
            for series in prometheus.query(concrete(expr))]


@pytest.mark.slow
def test_the_core_panels_show_the_load(scraped):
    prometheus = scraped
    usage = panel_values(prometheus, "KV cache usage")
    assert usage and all(0 <= v <= 1 for v in usage)
    running = panel_values(prometheus, "Requests running / waiting")
    assert len(running) == 2 and all(v >= 0 for v in running)
    ttft = panel_values(prometheus, "Time to first token")  # p50, p95, p99
    assert len(ttft) == 3 and all(math.isfinite(v) and v > 0 for v in ttft), ttft
    tokens = panel_values(prometheus, "Tokens per second")  # in, out
    assert len(tokens) == 2 and all(v > 0 for v in tokens), tokens
    reasons = {series["metric"]["finished_reason"] for series in prometheus.query(concrete(
        'sum by (finished_reason) (increase(brim_request_success_total{namespace="$namespace",'
        ' job="$model_deployment"}[1m])) > 0'))}
    assert reasons == {"stop", "length"}
    blocks = panel_values(prometheus, "KV-cache blocks")  # CPU: only what the engine uses
    assert blocks == [160.0]
    assert panel_values(prometheus, "max_model_len") == [256.0]


@pytest.mark.slow
def test_prometheus_loads_and_evaluates_every_rule(scraped):
    prometheus = scraped
    response = httpx.get(f"{prometheus.url}/api/v1/rules", timeout=10).json()
    rules = {rule["name"]: rule for group in response["data"]["groups"]
             for rule in group["rules"]}
    assert set(rules) == {rule["alert"] for rule in alert_rules()}
    deadline = time.monotonic() + 10
    while any(rule["health"] == "unknown" for rule in rules.values()):
        assert time.monotonic() < deadline, "the rules were never evaluated"
        time.sleep(0.5)
        response = httpx.get(f"{prometheus.url}/api/v1/rules", timeout=10).json()
        rules = {rule["name"]: rule for group in response["data"]["groups"]
                 for rule in group["rules"]}
    for name, rule in rules.items():
        assert rule["health"] == "ok", (name, rule.get("lastError"))
    # A healthy server under a light load fires none of them (pending is possible: a CPU's
    # TTFT, and the test is shorter than any `for`).
    assert not [name for name, rule in rules.items() if rule["state"] == "firing"]


@pytest.mark.slow
def test_the_live_server_exports_every_name_used(scraped):
    prometheus = scraped
    ingested = set(httpx.get(f"{prometheus.url}/api/v1/label/__name__/values",
                             timeout=10).json()["data"])
    for where, expr in every_expression():
        outside = metric_names(expr) - ingested - CUDA_ONLY_NAMES - KUBE_STATE_METRICS_NAMES
        assert not outside, f"{where}: Prometheus never saw {sorted(outside)}"
