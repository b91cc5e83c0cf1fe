"""/openapi.json as served: every body, response, status and media type documented, and a
schemathesis run against it (no hand-made spec) that finds no 5xx and no response the
document does not describe.

The fuzzed server runs the fake engine (conftest.FakeEngine, which applies the real
admission rules): what is fuzzed here is the HTTP layer; the engine's own isolation is
test_isolation.py's.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.runtime.server.conftest import FakeEngine, serve

# Per operation and mode (13 in all): about 20 s on 2 CPU cores.
MAX_EXAMPLES = 30
JSON_POSTS = {"/v1/completions": "CompletionRequest",
              "/v1/chat/completions": "ChatCompletionRequest",
              "/tokenize": "TokenizeRequest", "/detokenize": "DetokenizeRequest"}


@pytest.fixture(scope="module")
def fuzzed_url(bundled_model_dir, tokenizer):
    with serve(FakeEngine(bundled_model_dir, tokenizer), tokenizer=tokenizer,
               trust_request_chat_template=True, chat_template_timeout=2.0) as url:
        yield url


@pytest.fixture(scope="module")
def document(fuzzed_url) -> dict:
    response = httpx.get(f"{fuzzed_url}/openapi.json")
    assert response.status_code == 200
    return response.json()


def test_every_json_endpoint_documents_its_body_and_errors(document):
    paths, schemas = document["paths"], document["components"]["schemas"]
    for path, model in JSON_POSTS.items():
        operation = paths[path]["post"]
        body = operation["requestBody"]
        assert body["required"] is True
        assert body["content"] == {"application/json": {"schema": {
            "$ref": f"#/components/schemas/{model}"}}}
        assert model in schemas
        for status in ("400", "401", "404", "413", "415"):
            assert operation["responses"][status]["content"] == {"application/json": {
                "schema": {"$ref": "#/components/schemas/ErrorResponse"}}}, (path, status)
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = paths[path]["post"]["responses"]
        assert set(responses) == {"200", "400", "401", "404", "413", "415", "500", "503"}
        assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}
    assert schemas["ErrorResponse"]["properties"]["error"] == {
        "$ref": "#/components/schemas/ErrorDetail"}
    # The documented ranges are the validated ones.
    top_p = schemas["CompletionRequest"]["properties"]["top_p"]["anyOf"][0]
    assert (top_p["exclusiveMinimum"], top_p["maximum"]) == (0, 1)
    assert schemas["CompletionRequest"]["properties"]["n"]["minimum"] == 1


def test_health_and_metrics_have_their_real_media_types(document, fuzzed_url):
    health = document["paths"]["/health"]["get"]["responses"]
    assert "content" not in health["200"]  # an empty body
    assert "503" in health
    response = httpx.get(f"{fuzzed_url}/health")
    assert response.status_code == 200 and response.content == b""
    metrics = document["paths"]["/metrics"]["get"]["responses"]["200"]
    assert list(metrics["content"]) == ["text/plain"]
    assert httpx.get(f"{fuzzed_url}/metrics").headers["content-type"].startswith("text/plain")
    docs = httpx.get(f"{fuzzed_url}/docs")
    assert docs.status_code == 200 and "/openapi.json" in docs.text


# Every check about what the server answers; positive_data_acceptance is left out: a body
# the document allows may still ask for more than the model's context or the flags allow.
CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance", "response_headers_conformance",
          "negative_data_rejection")


def test_the_server_behaves_as_its_document_says(fuzzed_url):
    """Each operation of /openapi.json, with bodies that fit the document and bodies that do
    not (schemathesis' positive and negative modes), MAX_EXAMPLES of each."""
    from schemathesis.generation.modes import GenerationMode

    api = schemathesis.openapi.from_url(f"{fuzzed_url}/openapi.json")
    checks = [getattr(schemathesis.checks, name) for name in CHECKS]
    operations = [result.ok() for result in api.get_all_operations()]
    assert {op.path for op in operations} >= set(JSON_POSTS) | {"/health", "/metrics"}
    failures, statuses = [], {}
    for operation in operations:
        modes = [GenerationMode.POSITIVE]
        if operation.body:  # nothing to get wrong in a GET without parameters
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:
            seen = statuses.setdefault((operation.path, mode.value), set())

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True,
                      database=None, suppress_health_check=list(HealthCheck))
            def call(case):
                seen.add(case.call_and_validate(timeout=30, checks=checks).status_code)

            try:
                call()
            except Exception as exc:  # noqa: BLE001 (collected, reported together)
                failures.append(f"{operation.method.upper()} {operation.path} ({mode}): {exc}")
    assert not failures, "\n\n".join(failures)
    # Not only refusals: documented bodies were served.
    for path in JSON_POSTS:
        assert 200 in statuses[(path, "positive")], (path, statuses[(path, "positive")])
        assert statuses[(path, "negative")] <= {400, 404, 413, 415}, path
