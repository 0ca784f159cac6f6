"""`parscale serve`: the official openai client (and raw HTTP) against a live server on loopback, on a
multi-P int8 export of the embedded default model. Answers are checked against `Model.generate`
(what `parscale generate` runs) for the same prompt alone."""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from runtime_helpers import run_cli
from serve_helpers import Server, http, serving

from parscale.runtime import Model
from parscale.serve.verify import check_greedy

openai = pytest.importorskip("openai", reason="the openai client is in the dev extra (pip install -e '.[dev]')")
pytest.importorskip("uvicorn", reason="parscale serve needs the serve extra (pip install -e '.[serve]')")

NAME = "default"
PROMPTS = ["def fibonacci(n):", "import os\n", "class Stack:\n    def __init__(self", "for i in range(",
           "    return ", "# Copyright"]


@pytest.fixture(scope="module")
def model(default_int8_export: Path) -> Model:
    return Model.load(default_int8_export, threads=1)


@pytest.fixture(scope="module")
def server(default_int8_export: Path):
    with serving(default_int8_export, "--name", NAME, "--max-batch", "8") as s:
        yield s
        assert s.stop() == 0, s.stderr.read_text()[-3000:]


def alone(model: Model, prompt: str | list[int], n: int, P: int, **options):  # noqa: N803
    return model.generate(prompt, max_new_tokens=n, P=P, ignore_eos=True, **options)


def test_models_lists_the_export_once_for_each_p(server: Server, model: Model):
    ids = [m.id for m in server.client().models.list().data]
    assert ids == [NAME, *(f"{NAME}:p{P}" for P in model.streams)] == [NAME, "default:p1", "default:p2",
                                                                       "default:p4", "default:p8"]
    status, _, health = http(server.url + "/health")
    assert status == 200 and health["status"] == "ok" and health["streams"] == [1, 2, 4, 8]


def test_greedy_completions_equal_generate_at_each_p(server: Server, model: Model):
    client = server.client()
    for P in model.streams:
        want = alone(model, PROMPTS[0], 24, P)
        r = client.completions.create(model=f"{NAME}:p{P}", prompt=PROMPTS[0], max_tokens=24, temperature=0,
                                      extra_body={"return_token_ids": True, "ignore_eos": True})
        choice = r.choices[0]
        assert choice.model_extra["token_ids"] == want.generated_ids, P
        assert choice.text == want.text and choice.finish_reason == "length"
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(model.encode(PROMPTS[0])), 24)
        assert r.model == f"{NAME}:p{P}"
    # The plain name runs the default (largest) P; parscale_p picks another.
    plain = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert plain.choices[0].text == alone(model, PROMPTS[1], 12, 8).text
    by_field = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=12, temperature=0,
                                         extra_body={"ignore_eos": True, "parscale_p": 2})
    assert by_field.choices[0].text == alone(model, PROMPTS[1], 12, 2).text


def test_completions_equal_the_parscale_generate_command(server: Server, default_int8_export: Path):
    r = run_cli("generate", str(default_int8_export), "--P", "2", "--prompt", PROMPTS[2], "--max-new-tokens", "16",
                "--json")
    assert r.returncode == 0, r.stderr
    want = json.loads(r.stdout)
    got = server.client().completions.create(model=f"{NAME}:p2", prompt=PROMPTS[2], max_tokens=16, temperature=0,
                                             extra_body={"return_token_ids": True})
    assert got.choices[0].model_extra["token_ids"] == want["generated_ids"]
    assert got.choices[0].text == want["text"]
    assert got.choices[0].finish_reason == ("length" if want["finish_reason"] == "length" else "stop")


def test_seeded_sampling_equals_generate(server: Server, model: Model):
    r = server.client().completions.create(model=f"{NAME}:p4", prompt=PROMPTS[3], max_tokens=20, temperature=0.8,
                                           top_p=0.95, seed=7, extra_body={"ignore_eos": True, "top_k": 50,
                                                                          "return_token_ids": True})
    want = alone(model, PROMPTS[3], 20, 4, temperature=0.8, top_p=0.95, top_k=50, seed=7)
    assert r.choices[0].model_extra["token_ids"] == want.generated_ids


def test_streaming_returns_the_same_text(server: Server, model: Model):
    client = server.client()
    want = alone(model, PROMPTS[2], 32, 4)
    chunks = list(client.completions.create(model=f"{NAME}:p4", prompt=PROMPTS[2], max_tokens=32, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == want.text and len(chunks) > 3
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 32


def test_several_prompts_and_stop_strings(server: Server, model: Model):
    full = alone(model, PROMPTS[0], 30, 8).text
    stop = full[10:14]
    r = server.client().completions.create(model=NAME, prompt=PROMPTS[:3], max_tokens=30, temperature=0, stop=[stop],
                                           extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2]
    for prompt, choice in zip(PROMPTS[:3], r.choices, strict=True):
        want = alone(model, prompt, 30, 8, stop=stop)
        assert choice.text == want.text
        assert choice.finish_reason == ("stop" if want.finish_reason == "stop" else "length")
    assert r.choices[0].finish_reason == "stop" and stop not in r.choices[0].text


def test_chat_is_refused_cleanly_without_a_template(server: Server):
    with pytest.raises(openai.BadRequestError) as info:
        server.client().chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 400
    assert info.value.code == "chat_template_missing" and "chat template" in info.value.message


ERRORS = [
    # (body, status, param, words in the message)
    (b"{not json", 400, None, "not valid JSON"),
    (b"[1, 2]", 400, None, "JSON object"),
    ({"model": "other", "prompt": "x"}, 404, "model", "does not exist"),
    ({"model": f"{NAME}:p3", "prompt": "x"}, 404, "model", "serves P = 1, 2, 4, 8"),
    ({"model": NAME, "prompt": "x", "parscale_p": 3}, 400, "parscale_p", "serves P"),
    ({"model": f"{NAME}:p2", "prompt": "x", "parscale_p": 4}, 400, "parscale_p", "one or the other"),
    ({"model": NAME, "prompt": "x", "max_tokens": 5000}, 400, "max_tokens", "context length of 1024"),
    ({"model": NAME, "prompt": "x", "max_tokens": -3}, 400, "max_tokens", ">= 1"),
    ({"model": NAME, "prompt": "x", "max_tokens": 2.5}, 400, "max_tokens", "integer"),
    ({"model": NAME, "prompt": "x", "temperature": -1}, 400, "temperature", "[0, 2]"),
    ({"model": NAME, "prompt": "x", "top_p": 0}, 400, "top_p", "(0, 1]"),
    ({"model": NAME, "prompt": "x", "seed": -1}, 400, "seed", ">= 0"),
    ({"model": NAME, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
    ({"model": NAME, "prompt": "x", "stream": "yes"}, 400, "stream", "true or false"),
    ({"model": NAME, "prompt": "x", "n": 2}, 400, "n", "not supported"),
    ({"model": NAME, "prompt": "x", "frobnicate": 1}, 400, "frobnicate", "unrecognized"),
    ({"model": NAME, "prompt": ""}, 400, "prompt", "empty"),
    ({"model": NAME, "prompt": [1, 99999]}, 400, "prompt", "outside the vocabulary"),
    ({"model": NAME}, 400, "prompt", "required"),
    ({"model": NAME, "prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options", "stream"),
]


@pytest.mark.parametrize(("body", "status", "param", "words"), ERRORS, ids=[str(i) for i in range(len(ERRORS))])
def test_bad_input_is_an_openai_style_4xx(server: Server, body, status, param, words):
    got, _, answer = http(server.url + "/v1/completions", body, headers={"Content-Type": "application/json"})
    assert got == status, answer
    error = answer["error"]
    assert words in error["message"] and error["param"] == param and error["type"]


def test_bad_routes_methods_and_sizes(server: Server):
    status, _, answer = http(server.url + "/v1/nothing-here")
    assert status == 404 and "routes" in answer["error"]["message"]
    status, _, answer = http(server.url + "/v1/completions")  # GET
    assert status == 405 and "GET" in answer["error"]["message"]
    big = json.dumps({"model": NAME, "prompt": "x" * (1 << 20)})
    status, _, answer = http(server.url + "/v1/completions", big)
    assert status == 413 and answer["error"]["code"] == "request_too_large"
    status, _, answer = http(server.url + "/v1/chat/completions", {"model": NAME, "messages": "hi"})
    assert status == 400  # no template: refused before the messages are looked at
    with pytest.raises(openai.NotFoundError):
        server.client().models.retrieve("nope")


@pytest.mark.slow
def test_sixteen_concurrent_clients_with_mixed_p_get_their_own_answers(server: Server, model: Model):
    """16 clients at once, P = 1, 2, 4, 8, different lengths, half of them streaming: each gets its own
    prompt's greedy continuation. Most rows equal generate's alone; a row left-padded in a batch may
    take the other side of a near-tie on this int8 export (parscale.serve.verify), so every token is
    checked to be the greedy one within the export's measured noise."""
    client = server.client()
    jobs = [dict(P=model.streams[i % 4], prompt=PROMPTS[i % len(PROMPTS)], n=8 + 3 * (i % 6), stream=i % 2 == 1)
            for i in range(16)]
    _, _, before = http(server.url + "/health")
    start = threading.Barrier(16)

    def ask(job: dict) -> tuple[list[int], str]:
        start.wait(timeout=60)
        r = client.completions.create(model=f"{NAME}:p{job['P']}", prompt=job["prompt"], max_tokens=job["n"],
                                      stream=job["stream"], temperature=0,
                                      extra_body={"ignore_eos": True, "return_token_ids": True})
        if not job["stream"]:
            return r.choices[0].model_extra["token_ids"], r.choices[0].text
        ids, text = [], ""
        for c in r:
            ids += c.choices[0].model_extra.get("token_ids") or []
            text += c.choices[0].text
        return ids, text

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, jobs))
    exact = 0
    for job, (ids, text) in zip(jobs, answers, strict=True):
        want = alone(model, job["prompt"], job["n"], job["P"])
        assert len(ids) == job["n"] and text == model.decode(ids), job
        exact += ids == want.generated_ids
        checked = check_greedy(model, model.encode(job["prompt"]), ids, job["P"])
        assert checked.ok, (job, ids, want.generated_ids, checked)
    assert exact >= 12  # near-ties are rare: most rows are bit-for-bit generate's
    _, _, after = http(server.url + "/health")
    steps = after["stats"]["steps"] - before["stats"]["steps"]
    tokens = after["stats"]["tokens"] - before["stats"]["tokens"]
    assert tokens == sum(job["n"] for job in jobs)
    assert steps < tokens / 2  # requests were decoded together, several rows a step


@pytest.mark.slow
def test_full_queue_is_503_and_a_disconnect_frees_the_slot(default_int8_export: Path):
    with serving(default_int8_export, "--name", NAME, "--max-batch", "1", "--max-queue", "1") as s:
        client = s.client()
        long = dict(model=f"{NAME}:p8", prompt=PROMPTS[0], max_tokens=1000, temperature=0,
                    extra_body={"ignore_eos": True})
        stream = client.completions.create(stream=True, **long)
        next(iter(stream))  # running: it holds the only slot
        waiting = ThreadPoolExecutor(1).submit(client.completions.create, **(long | {"max_tokens": 5}))
        for _ in range(200):
            if http(s.url + "/health")[2]["waiting"] == 1:
                break
            time.sleep(0.05)
        status, headers, answer = http(s.url + "/v1/completions", {"model": NAME, "prompt": "x"})
        assert status == 503 and headers["retry-after"] == "1" and answer["error"]["code"] == "queue_full"
        stream.close()  # the client goes away mid-stream
        assert waiting.result(timeout=60).usage.completion_tokens == 5
        stats = http(s.url + "/health")[2]["stats"]
        assert stats["cancelled"] == 1 and stats["refused_queue_full"] == 1
        assert stats["tokens"] < 1000  # the first request did not run to its end


@pytest.mark.slow
def test_sigterm_ends_streams_cleanly_and_exits(default_int8_export: Path):
    with serving(default_int8_export, "--name", NAME, "--shutdown-timeout", "0.5") as s:
        r = s.client().completions.create(model=f"{NAME}:p8", prompt=PROMPTS[0], max_tokens=1000, temperature=0,
                                          stream=True, extra_body={"ignore_eos": True})
        it = iter(r)
        next(it)
        s.proc.send_signal(signal.SIGTERM)
        with pytest.raises(openai.APIError, match="shutting down"):
            for _ in it:
                pass
        assert s.proc.wait(timeout=60) == 0
        log = s.stderr.read_text()
        assert "Traceback" not in log, log
        with pytest.raises(OSError):
            http(s.url + "/health", timeout=5)


@pytest.mark.slow
def test_chat_through_the_exports_template_and_the_api_key(default_int8_export: Path, model: Model, tmp_path):
    from parscale.manifest import MANIFEST, Manifest, describe_files

    folder = tmp_path / "with-template"
    shutil.copytree(default_int8_export, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}{% if m.role not in ['system', 'user', 'assistant'] %}"
                               "{{ raise_exception('no ' + m.role + ' messages') }}{% endif %}"
                               "<{{ m.role }}>{{ m.content }}{{ eos_token }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    manifest = Manifest.read(folder)
    (folder / MANIFEST).write_text(json.dumps(manifest.replace(files=describe_files(folder)).to_dict(), indent=2))
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def add(a, b):"}]
    rendered = "<system>You write Python.<|endoftext|>\n<user>def add(a, b):<|endoftext|>\n<assistant>"
    want = model.generate(prompt_ids=model.tokenizer.encode(rendered, add_special_tokens=False), max_new_tokens=16,
                          P=4, ignore_eos=True)
    with serving(folder, "--name", NAME, "--api-key", "sesame") as s:
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").models.list()
        assert http(s.url + "/health")[0] == 200  # open without a key
        client = s.client(api_key="sesame")
        r = client.chat.completions.create(model=f"{NAME}:p4", messages=messages, max_tokens=16, temperature=0,
                                           extra_body={"ignore_eos": True})
        assert r.choices[0].message.content == want.text and r.choices[0].message.role == "assistant"
        assert r.usage.prompt_tokens == len(model.tokenizer.encode(rendered, add_special_tokens=False))
        pieces = client.chat.completions.create(model=f"{NAME}:p4", messages=messages, max_tokens=16, temperature=0,
                                                stream=True, extra_body={"ignore_eos": True})
        assert "".join(c.choices[0].delta.content or "" for c in pieces) == want.text
        with pytest.raises(openai.BadRequestError, match="no tool messages"):
            client.chat.completions.create(model=NAME, messages=[{"role": "tool", "content": "x"}])


def test_chat_templates_run_in_a_sandbox():
    from parscale.serve.chat import ChatTemplate
    from parscale.serve.protocol import APIError

    escape = ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}", {}, "test")
    with pytest.raises(APIError, match="SecurityError"):
        escape.render([{"role": "user", "content": "hi"}])
    mutate = ChatTemplate("{% set _ = messages.append(1) %}{{ messages | length }}", {}, "test")
    with pytest.raises(APIError):
        mutate.render([{"role": "user", "content": "hi"}])
    for bad in ([], [{"role": "wizard", "content": "x"}], [{"role": "user", "content": [{"type": "image_url"}]}]):
        with pytest.raises(APIError) as info:
            ChatTemplate("{{ messages }}", {}, "test").render(bad)
        assert info.value.status == 400


def test_serve_refuses_bad_options_and_a_busy_port(default_int8_export: Path, server: Server):
    r = run_cli("serve", str(default_int8_export), "--port", "70000")
    assert r.returncode == 1 and "--port must be <= 65535" in r.stderr
    port = server.url.rsplit(":", 1)[1]
    r = run_cli("serve", str(default_int8_export), "--port", port, "--threads", "1")
    assert r.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in r.stderr, r.stderr
    r = run_cli("serve", str(default_int8_export), "--port", "0", "--chat-template", "/nonexistent.jinja")
    assert r.returncode == 1 and "cannot read the chat template" in r.stderr, r.stderr


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                    max_leaves=6)
FIELDS = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "stream",
          "stream_options", "n", "parscale_p", "repetition_penalty", "ignore_eos", "logprobs", "echo"]
VALUES = {"model": st.sampled_from([NAME, f"{NAME}:p1", f"{NAME}:p3", "x"]) | JSON,
          "prompt": st.sampled_from(["def f", [1, 2, 3], ["a", "b"]]) | JSON,
          "max_tokens": st.integers(-5, 2000) | JSON}


@pytest.mark.slow
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_no_body_makes_a_server_error(server: Server, data):
    """Generated bodies (known fields with any JSON, sometimes plausible values): never a 5xx, always
    OpenAI's error body when refused."""
    keys = data.draw(st.lists(st.sampled_from(FIELDS), unique=True, max_size=6))
    body = {k: data.draw(VALUES.get(k, JSON)) for k in keys}
    if isinstance(body.get("max_tokens"), int) and not isinstance(body["max_tokens"], bool):
        body["max_tokens"] = min(body["max_tokens"], 24)  # keep the valid ones short
    route = data.draw(st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
    status, _, answer = http(server.url + route, body)
    assert status < 500, (body, answer)
    if status == 200 and isinstance(answer, str):  # a stream: it ends with [DONE], errors included
        assert answer.endswith("data: [DONE]\n\n") and '"error"' not in answer, answer[-500:]
    elif status != 200:
        assert set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["message"]
