"""The Python API types its inputs and keeps its numbers sane, with the same rules as the CLI and the server.

- a wrong type raises ParScaleError naming the argument, never a bare TypeError;
- numpy integers are taken wherever an integer is (and give the same result), bools are refused where a
  number or an id is meant;
- a temperature below MIN_TEMPERATURE is greedy; a repetition penalty outside [MIN_PENALTY, MAX_PENALTY]
  is refused;
- a batch whose KV cache cannot fit is refused before anything is allocated; `bench --gen 1` reports
  no decode time (n/a) instead of 0.00.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from runtime_helpers import run_cli

import parscale.runtime.memory as memory
from parscale.errors import ParScaleError
from parscale.runtime import Model
from parscale.runtime.bench import bench
from parscale.runtime.sampling import MAX_PENALTY, MIN_PENALTY, MIN_TEMPERATURE, SamplingConfig
from parscale.serve.protocol import APIError, ModelNames, parse_completion

IDS = [5, 17, 300]


@pytest.fixture(scope="module")
def model(tiny_exports) -> Model:
    return Model.load(tiny_exports[4][1], threads=1)


def _call(model: Model, fn: str, **kwargs):  # type: ignore[no-untyped-def]
    options = {"prompt_ids": IDS, "max_new_tokens": 2, **kwargs}
    if "prompt" in kwargs:
        options.pop("prompt_ids")
    out = getattr(model, fn)(**options)
    return out if fn == "generate" else list(out)


HOSTILE = st.one_of(st.none(), st.booleans(), st.text(max_size=3), st.floats(allow_nan=True), st.binary(max_size=2),
                    st.lists(st.integers(-2, 3), max_size=2), st.just(object()), st.just(np.array(5)),
                    st.just(np.float64("nan")), st.just({}))
# argument -> values of the right type that are accepted (whatever else is drawn must be refused by name)
VALID = {"temperature": lambda v: _num(v) and v >= 0, "top_p": lambda v: _num(v) and 0 < v <= 1,
         "top_k": lambda v: _int(v) and v >= 0,
         "repetition_penalty": lambda v: _num(v) and MIN_PENALTY <= v <= MAX_PENALTY,
         "max_new_tokens": lambda v: _int(v) and v >= 1, "seed": lambda v: v is None or (_int(v) and v >= 0),
         "greedy": lambda v: isinstance(v, bool), "ignore_eos": lambda v: isinstance(v, bool),
         "stop": lambda v: v is None or (isinstance(v, str) and v != "") or (isinstance(v, list) and not v),
         "P": lambda v: v is None or v == 4}


def _num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


def _int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@settings(max_examples=120, deadline=None)
@given(name=st.sampled_from(sorted(VALID)), value=HOSTILE, fn=st.sampled_from(["generate", "stream_tokens"]))
def test_wrong_types_raise_parscale_error_naming_the_argument(model, name, value, fn):
    if VALID[name](value):
        return  # a valid value (e.g. top_k=0 drawn from the integers): nothing to refuse
    with pytest.raises(ParScaleError, match=name if name != "P" else "P="):
        _call(model, fn, **{name: value})


@pytest.mark.parametrize("kwargs", [
    {"temperature": "1"}, {"top_p": None}, {"stop": 5}, {"stop": [5]}, {"stop": b"x"}, {"temperature": True},
    {"top_k": True}, {"greedy": "no"}, {"greedy": 1}, {"ignore_eos": "no"}, {"max_new_tokens": True},
    {"max_new_tokens": 2.0}, {"seed": True}, {"seed": 1.5}, {"repetition_penalty": None}, {"P": True}, {"P": 4.0},
], ids=repr)
def test_the_issue_examples_name_their_argument(model, kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ParScaleError, match=name if name != "P" else "P="):
        _call(model, "generate", **kwargs)


@pytest.mark.parametrize("prompt", [np.array(5), np.array([[[1]]]), np.array([1.5, 2.0]), np.array([[1, 2], [3.5, 4]]),
                                    [np.array([1, 2])], {1, 2}, object(), [1, [2]], [None]], ids=repr)
def test_malformed_prompts_are_refused(model, prompt):
    with pytest.raises(ParScaleError, match=r"prompt|token ids"):
        _call(model, "generate", prompt=prompt)


@pytest.mark.parametrize(("name", "value"), [("max_new_tokens", 2), ("top_k", 3), ("seed", 7), ("P", 4)])
@pytest.mark.parametrize("kind", [np.int64, np.int32, np.uint8])
def test_numpy_integers_are_taken_wherever_integers_are(model, name, value, kind):
    sampled = {"temperature": 0.7, "seed": 1} | {name: value}
    expected = _call(model, "generate", **sampled).generated_ids
    assert _call(model, "generate", **(sampled | {name: kind(value)})).generated_ids == expected
    ids = np.array(IDS, dtype=kind if kind is not np.uint8 else np.int64)
    assert model.generate(prompt_ids=ids, max_new_tokens=2).generated_ids == \
        model.generate(prompt_ids=IDS, max_new_tokens=2).generated_ids
    assert model.generate(prompt_ids=[kind(i) if i < 256 else i for i in IDS], max_new_tokens=2).generated_ids == \
        model.generate(prompt_ids=IDS, max_new_tokens=2).generated_ids


def test_numpy_bools_are_taken_where_bools_are_and_nowhere_else(model):
    expected = _call(model, "generate", greedy=True, ignore_eos=True).generated_ids
    assert _call(model, "generate", greedy=np.True_, ignore_eos=np.bool_(True)).generated_ids == expected
    for name in ("top_k", "max_new_tokens", "temperature", "seed"):
        with pytest.raises(ParScaleError, match=name):
            _call(model, "generate", **{name: np.True_})


@settings(max_examples=20, deadline=None)
@given(t=st.floats(min_value=5e-324, max_value=MIN_TEMPERATURE, exclude_max=True), seed=st.integers(0, 2**32))
def test_a_temperature_below_the_floor_is_greedy(model, t, seed):
    greedy = model.generate(prompt_ids=IDS, max_new_tokens=6).generated_ids
    assert model.generate(prompt_ids=IDS, max_new_tokens=6, temperature=t, seed=seed).generated_ids == greedy
    assert SamplingConfig(temperature=t).is_greedy and not SamplingConfig(temperature=MIN_TEMPERATURE).is_greedy


@settings(max_examples=30, deadline=None)
@given(penalty=st.one_of(st.floats(min_value=0, max_value=MIN_PENALTY, exclude_max=True),
                         st.floats(min_value=MAX_PENALTY, exclude_min=True, allow_infinity=True), st.just(-1.0)))
def test_a_repetition_penalty_outside_its_range_is_refused_by_api_and_server_alike(model, penalty):
    with pytest.raises(ParScaleError, match=r"repetition_penalty must be"):
        model.generate(prompt_ids=IDS, max_new_tokens=2, repetition_penalty=penalty)
    names = ModelNames(name="m", streams=model.streams, default=model.P)
    with pytest.raises(APIError, match=r"repetition_penalty must be"):
        parse_completion({"model": "m", "prompt": IDS, "repetition_penalty": penalty}, names, model,
                         max_prompts=4, created=0)


@pytest.mark.parametrize("body", [{"temperature": True}, {"top_k": True}, {"seed": True}, {"max_tokens": True},
                                  {"temperature": "1"}, {"stop": 5}, {"top_p": "0.5"}], ids=repr)
def test_the_server_refuses_the_same_types_as_the_api(model, body):
    names = ModelNames(name="m", streams=model.streams, default=model.P)
    with pytest.raises(APIError) as e:
        parse_completion({"model": "m", "prompt": IDS, **body}, names, model, max_prompts=4, created=0)
    assert e.value.param == next(iter(body))


def test_the_server_treats_a_tiny_temperature_as_the_api_does(model):
    names = ModelNames(name="m", streams=model.streams, default=model.P)
    req = parse_completion({"model": "m", "prompt": IDS, "temperature": 1e-38}, names, model, max_prompts=4, created=0)
    assert req.specs[0].sampling.is_greedy


def test_the_cli_takes_a_tiny_temperature_as_greedy_and_refuses_a_tiny_penalty(model, tiny_exports):
    export = str(tiny_exports[4][1])
    greedy = model.generate(prompt_ids=IDS, max_new_tokens=6).generated_ids
    r = run_cli("generate", export, "--prompt-ids", "5,17,300", "--max-new-tokens", "6", "--temperature", "1e-38",
                "--seed", "3", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["generated_ids"] == greedy and not r.stderr, r.stderr
    r = run_cli("generate", export, "--prompt-ids", "5,17,300", "--repetition-penalty", "1e-38")
    assert r.returncode == 1 and "repetition_penalty must be in [0.01, 100.0]" in r.stderr


def test_a_batch_that_cannot_fit_is_refused_before_allocation(model, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda: 64 << 20)  # 64 MiB free
    with monkeypatch.context() as patch:
        patch.setattr(np, "zeros", lambda *a, **k: pytest.fail("the cache was allocated"))
        with pytest.raises(ParScaleError, match=r"need .* GiB for the KV cache, but 0\.1 GiB of memory are available"):
            model.generate([IDS] * 512, max_new_tokens=400)
    with pytest.raises(ParScaleError, match="KV cache"):
        bench(model.path, prompt_len=100, gen=400, batch=512, threads=1)
    model.generate([IDS] * 2, max_new_tokens=2)  # what fits still runs


def test_an_absurd_batch_is_refused_at_once_in_a_real_process(tiny_exports):
    r = run_cli("bench", str(tiny_exports[4][1]), "--batch", "100000000", "--prompt-len", "4", "--gen", "2")
    assert r.returncode == 1 and "KV cache" in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_bench_with_one_new_token_reports_no_decode_time(tiny_exports):
    export = str(tiny_exports[4][1])
    assert bench(export, prompt_len=4, gen=1, threads=1).decode_ms_per_token is None
    r = run_cli("bench", export, "--prompt-len", "4", "--gen", "1", "--threads", "1", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["decode_ms_per_token"] is None, r.stderr
    r = run_cli("bench", export, "--prompt-len", "4", "--gen", "1", "--threads", "1")
    assert r.returncode == 0 and "n/a (one new token" in r.stdout and "0.00 ms" not in r.stdout, r.stderr


def test_generation_options_are_one_record_for_the_three_calls(model):
    """`options=GenerationOptions(...)` gives what the same keywords give, keywords override it, an unknown
    keyword is a TypeError naming the options, and help() shows every option with its default."""
    import inspect

    from parscale.runtime import GenerationOptions

    opts = GenerationOptions(max_new_tokens=5, temperature=0.9, top_k=20, seed=7)
    by_keywords = model.generate(prompt_ids=IDS, max_new_tokens=5, temperature=0.9, top_k=20, seed=7)
    assert model.generate(prompt_ids=IDS, options=opts).generated_ids == by_keywords.generated_ids
    events = list(model.stream_tokens(prompt_ids=IDS, options=opts))
    assert [e.token_id for e in events] == by_keywords.generated_ids
    assert len(model.generate(prompt_ids=IDS, options=opts, max_new_tokens=2).generated_ids) == 2
    assert opts.max_new_tokens == 5  # a call's keywords never change the record it was given
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'max_tokens'.*max_new_tokens"):
        model.generate(prompt_ids=IDS, max_tokens=3)
    with pytest.raises(ParScaleError, match="options must be a GenerationOptions"):
        model.generate(prompt_ids=IDS, options={"max_new_tokens": 3})
    for method in (Model.generate, Model.stream, Model.stream_tokens):
        params = inspect.signature(method).parameters
        assert [params[f].default for f in ("max_new_tokens", "temperature", "P")] == [64, 0.0, None], method
        assert "kwargs" not in params
