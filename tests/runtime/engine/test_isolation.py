"""One request must not fail the others: admission refuses what a step would choke on, and a
step that still raises for one request's row finishes only that request.

On the tiny random-weight Llama (tests/hub_fixtures.py): seconds, no bundled model.
"""

from __future__ import annotations

import pytest

from brim.runtime.config import EngineConfig
from brim.runtime.engine import sampler as sampler_module
from brim.runtime.engine.admission import Limits, RequestLimits, admit, admit_all
from brim.runtime.engine.engine import Engine, FailedRequestOutput
from brim.runtime.engine.errors import InvalidParamError, InvalidTokenIdError
from brim.runtime.sampling_params import SamplingParams
from tests.hub_fixtures import tiny_llama  # noqa: F401 (fixture)

VOCAB = 4096
PROMPTS = {"greedy": [5, 17, 300, 42, 9], "seeded": [7, 8, 9, 10], "other": [100, 200, 300]}
PARAMS = {
    "greedy": SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
    "seeded": SamplingParams(temperature=0.9, top_k=50, seed=1234, max_tokens=12, n=2,
                             ignore_eos=True, logprobs=2),
    "other": SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
}


@pytest.fixture(scope="module")
def engine(tiny_llama):  # noqa: F811 (fixture)
    config = EngineConfig.create(tiny_llama, dtype="float32", device="cpu", max_model_len=128,
                                 num_gpu_blocks=64, block_size=16, seed=0)
    return Engine(config, RequestLimits(max_n=4, max_logprobs=5))


def run(engine: Engine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict:
    """Add the requests, step until done; req_id -> its final output."""
    for req_id, (prompt, params) in requests.items():
        engine.add_request(req_id, prompt, params)
    finals, num_steps = {}, 0
    while engine.has_unfinished_requests():
        num_steps += 1
        assert num_steps < 200
        for output in engine.step():
            if output.finished:
                finals[output.req_id] = output
    return finals


def tokens(output) -> list[list[int]]:
    return [c.token_ids for c in output.outputs]


def baseline(engine: Engine) -> dict:
    return run(engine, {name: (PROMPTS[name], PARAMS[name]) for name in PROMPTS})


@pytest.fixture
def poisoned_sampler(monkeypatch):
    """A sampler that raises whenever the request `poison` has a row in its batch, as a
    kernel or a sampling bug hit by one request's values would; counts the calls."""
    calls = {"n": 0, "raised": 0}
    original = sampler_module.Sampler.__call__

    def call(self, logits, requests):
        calls["n"] += 1
        if any(r.parent_id == "poison" for r in requests):
            calls["raised"] += 1
            raise IndexError("index 70000 is out of bounds for dimension 1 with size 4096")
        return original(self, logits, requests)

    monkeypatch.setattr(sampler_module.Sampler, "__call__", call)
    return calls


def test_a_step_failing_on_one_row_finishes_only_that_request(engine, poisoned_sampler):
    expected = baseline(engine)
    poisoned_sampler["n"] = 0
    requests = {name: (PROMPTS[name], PARAMS[name]) for name in PROMPTS}
    requests["poison"] = ([11, 12, 13], SamplingParams(temperature=0, max_tokens=12))
    finals = run(engine, requests)

    failed = finals["poison"]
    assert isinstance(failed, FailedRequestOutput) and failed.finished
    assert [c.finish_reason for c in failed.outputs] == ["error"]
    assert failed.error.startswith("IndexError('index 70000 is out of bounds")
    # The others produced exactly the tokens they produce alone, the seeded n=2 one included
    # (its generators are rewound before each retry), with their logprobs.
    for name in PROMPTS:
        assert not isinstance(finals[name], FailedRequestOutput)
        assert tokens(finals[name]) == tokens(expected[name]), name
        assert [c.finish_reason for c in finals[name].outputs] == \
            [c.finish_reason for c in expected[name].outputs]
    seeded, seeded_alone = finals["seeded"].outputs[0], expected["seeded"].outputs[0]
    assert [sorted(e) for e in seeded.logprobs] == [sorted(e) for e in seeded_alone.logprobs]
    # Only the first step held the poisoned request (added last, so last in the batch of 5
    # rows: greedy, seeded #0 and #1, other, poison): the 5 of them, then 3, 2, and 1.
    assert poisoned_sampler["raised"] == 4
    # Its blocks are back in the pool and none of them is left for the prefix cache to serve.
    stats = engine.get_stats()
    assert (stats.num_running, stats.num_waiting, stats.num_used_blocks) == (0, 0, 0)


def test_a_failing_request_alone_and_the_engine_goes_on(engine, poisoned_sampler):
    finals = run(engine, {"poison": ([11, 12, 13], SamplingParams(max_tokens=3))})
    assert isinstance(finals["poison"], FailedRequestOutput)
    finals = run(engine, {"other": (PROMPTS["other"], PARAMS["other"])})
    assert finals["other"].outputs[0].finish_reason == "length"


def test_failing_detokenization_finishes_only_its_request(engine, monkeypatch):
    expected = baseline(engine)
    original = Engine._process_token

    def process(self, request, token, logprob, is_last):
        if request.parent_id == "bad" and request.num_output_tokens == 3:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        return original(self, request, token, logprob, is_last)

    monkeypatch.setattr(Engine, "_process_token", process)
    requests = {name: (PROMPTS[name], PARAMS[name]) for name in PROMPTS}
    requests["bad"] = ([11, 12, 13], SamplingParams(temperature=0, max_tokens=12, n=2))
    finals = run(engine, requests)
    assert isinstance(finals["bad"], FailedRequestOutput)
    assert {c.finish_reason for c in finals["bad"].outputs} == {"error"}
    for name in PROMPTS:
        assert tokens(finals[name]) == tokens(expected[name]), name


# -- admission: what used to fail inside the step is refused when added ---------------------

LIMITS = Limits(max_model_len=128, vocab_size=VOCAB, request=RequestLimits(max_n=4))


def test_admission_accepts_large_values_the_sampler_can_hold():
    # top_k above the vocabulary keeps it all (the sampler clamps it before any tensor).
    assert admit([1, 2, 3], SamplingParams(top_k=2**63, temperature=1e300), LIMITS) == 16


@pytest.mark.parametrize(("params", "param", "message"), [
    (dict(seed=2**64), "seed", "Invalid value for 'seed': must be in "
                               "[-9223372036854775808, 9223372036854775807], got "
                               "18446744073709551616."),
    (dict(seed=-(2**63) - 1), "seed", None),
    (dict(stop_token_ids=[70000], min_tokens=2), "stop_token_ids",
     "Invalid value for 'stop_token_ids': must be token ids in [0, 4096) (this model's "
     "vocabulary), got [70000]."),
    (dict(stop_token_ids=[-1]), "stop_token_ids", None),
    (dict(temperature=float("nan")), "temperature", "Invalid value for 'temperature': must be "
                                                    ">= 0, got nan."),
    (dict(temperature=float("inf")), "temperature", None),
    (dict(top_p=float("nan")), "top_p", None),
    (dict(n=5), "n", "Invalid value for 'n': n=5 is more than this server's limit of 4 "
                     "completions per request (--max-n). Ask for fewer completions, or start "
                     "the server with a higher --max-n."),
    (dict(n=True), "n", None),
    (dict(logprobs=21), "logprobs", "Invalid value for 'logprobs': logprobs=21 is more than "
                                    "this server's limit of 20 alternatives per token "
                                    "(--max-logprobs). Ask for at most 20."),
    (dict(stop=["x"] * 17), "stop", None),
    (dict(stop=["x" * 257]), "stop", None),
    (dict(stop=[3]), "stop", None),
    (dict(stop_token_ids=list(range(65))), "stop_token_ids", None),
    (dict(max_tokens=None, min_tokens=200), "min_tokens", None),
])
def test_admission_refuses_what_a_step_would_choke_on(params, param, message):
    with pytest.raises(InvalidParamError) as info:
        admit([1, 2, 3], SamplingParams(**params), LIMITS)
    assert info.value.param == param
    api_message = info.value.message_for(param)  # what the server answers
    assert api_message.startswith(f"Invalid value for '{param}': ")
    if message is not None:
        assert api_message == message


def test_admission_rechecks_params_changed_after_creation():
    params = SamplingParams()
    params.seed = 2**64  # a mutable dataclass: the engine must not trust creation-time checks
    with pytest.raises(InvalidParamError, match="^seed must be in "):
        admit([1], params, LIMITS)
    with pytest.raises(InvalidTokenIdError):
        admit([1, True], SamplingParams(), LIMITS)


def test_work_limits_count_every_prompt_and_completion():
    limits = Limits(max_model_len=128, vocab_size=VOCAB,
                    request=RequestLimits(max_n=4, max_request_generation_tokens=100))
    assert admit_all([[1], [2]], SamplingParams(n=2, max_tokens=25), limits) == [25, 25]
    with pytest.raises(InvalidParamError) as info:
        admit_all([[1], [2], [3]], SamplingParams(n=2, max_tokens=10), limits)
    assert info.value.param == "n"
    assert str(info.value) == (
        "Invalid value for 'n': n=2 x 3 prompts = 6 completions is more than this server's "
        "limit of 4 completions per request (--max-n). Send fewer prompts per request, or "
        "lower n.")
    with pytest.raises(InvalidParamError) as info:
        admit_all([[1], [2]], SamplingParams(n=2, max_tokens=26), limits)
    assert info.value.param == "max_tokens"
    assert info.value.message_for("max_completion_tokens") == (
        "Invalid value for 'max_completion_tokens': n=2 x 2 prompts x max_completion_tokens=26 "
        "= 104 tokens is more than this server's limit of 100 generated tokens per request "
        "(--max-request-generation-tokens). Lower max_completion_tokens or n.")
    # Unset, max_tokens is what the context leaves: 127 here, and 16 x 128 by default.
    with pytest.raises(InvalidParamError, match="max_tokens unset"):
        admit([1], SamplingParams(max_tokens=None), limits)
    assert Limits(128, VOCAB).max_request_generation_tokens == 2048


def test_child_seeds_wrap_within_64_bits(engine):
    top = 2**63 - 1
    engine.add_request("wrap", [1, 2, 3], SamplingParams(seed=top, n=2, max_tokens=2))
    assert [r.params.seed for r in engine.parents["wrap"]] == [top, -(2**63)]
    engine.abort("wrap")


# -- output kinds -------------------------------------------------------------------------


def test_final_only_gives_each_request_one_output_equal_to_its_cumulative_last(engine):
    """"final_only" requests (LLM.generate's) get no output until every completion has
    ended, then the same one a "cumulative" request ends with; cumulative requests get one
    per step that gives them tokens. Stop token ids spread over the vocabulary end the two
    seeded completions at different steps."""
    stops = list(range(3, VOCAB, VOCAB // 64))  # 64: the limit
    base = {
        "greedy": ([5, 17, 300, 42, 9], SamplingParams(temperature=0, max_tokens=9,
                                                       ignore_eos=True)),
        "two": ([7, 8, 9, 10], SamplingParams(temperature=1.0, seed=99, n=2, max_tokens=60,
                                               stop_token_ids=stops, logprobs=1)),
    }
    for seed in range(99, 140):  # a seed whose completions end at different lengths
        base["two"][1].seed = seed
        finals = run(engine, {"probe": base["two"]})
        if len({len(c.token_ids) for c in finals["probe"].outputs}) == 2:
            break
    else:
        pytest.fail("no seed ended the two completions at different lengths")
    seen: dict[str, dict[str, list]] = {"cumulative": {}, "final_only": {}}
    for kind in seen:
        for req_id, (prompt, params) in base.items():
            engine.add_request(f"{kind}-{req_id}", prompt, params.clone(output_kind=kind))
        while engine.has_unfinished_requests():
            for output in engine.step():
                seen[kind].setdefault(output.req_id.split("-", 1)[1], []).append(output)
    for req_id in base:
        cumulative, final = seen["cumulative"][req_id], seen["final_only"][req_id]
        assert len(final) == 1 and final[0].finished
        assert [o.finished for o in cumulative] == [False] * (len(cumulative) - 1) + [True]
        assert len(cumulative) == max(len(c.token_ids) for c in final[0].outputs)
        for got, want in zip(final[0].outputs, cumulative[-1].outputs):
            assert (got.token_ids, got.text, got.finish_reason, got.logprobs) == (
                want.token_ids, want.text, want.finish_reason, want.logprobs)


def test_an_unknown_output_kind_is_refused():
    with pytest.raises(InvalidParamError, match="output_kind"):
        SamplingParams(output_kind="delta")
