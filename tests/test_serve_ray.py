"""`parscale serve` on Ray Serve: a local cluster started here (node address 127.0.0.1, HTTP on loopback,
token authentication), two replicas of the server each holding the model, eight concurrent requests
through the official openai client, and a shutdown that leaves no Ray process behind."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from serve_helpers import http

from parscale.runtime import Model
from parscale.serve.verify import check_greedy

ray = pytest.importorskip("ray", reason="Ray Serve needs the serve-ray extra (pip install -e '.[serve-ray]')")
openai = pytest.importorskip("openai", reason="the openai client is in the dev extra (pip install -e '.[dev]')")

PROMPTS = ["def fibonacci(n):", "import os\n", "class Stack:\n    def __init__(self", "for i in range("]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.is_file() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")  # a zombie is gone


@pytest.mark.slow
def test_two_replicas_answer_and_shut_down_cleanly(default_int8_export: Path, monkeypatch):
    from ray import serve

    from parscale.serve.ray_app import APP_NAME, deployment

    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    # Ray turns token authentication on and writes the token into ~/.ray: a home of the test's own. It also
    # sets RAY_AUTH_MODE in this process's environment, which monkeypatch takes out again afterwards.
    monkeypatch.setenv("HOME", temp)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    port = _free_port()
    model = Model.load(default_int8_export, threads=1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
             _temp_dir=temp)
    pids = [p.process.pid for ps in ray._private.worker._global_node.all_processes.values() for p in ps]
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(deployment(default_int8_export, replicas=2, threads=1, num_cpus=0.5, name="default"),
                  name=APP_NAME, route_prefix="/")
        replicas = serve.status().applications[APP_NAME].deployments["parscale"].replica_states
        assert replicas.get("RUNNING") == 2, replicas
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        jobs = [(PROMPTS[i % 4], [1, 2, 4, 8][i % 4], 10 + i) for i in range(8)]

        def ask(job: tuple[str, int, int]) -> list[int]:
            prompt, P, n = job
            r = client.completions.create(model=f"default:p{P}", prompt=prompt, max_tokens=n, temperature=0,
                                          extra_body={"ignore_eos": True, "return_token_ids": True})
            assert r.choices[0].text == model.decode(r.choices[0].model_extra["token_ids"])
            return r.choices[0].model_extra["token_ids"]

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, jobs))
        exact = 0
        for (prompt, P, n), ids in zip(jobs, answers, strict=True):
            want = model.generate(prompt, max_new_tokens=n, P=P, ignore_eos=True).generated_ids
            exact += ids == want
            assert len(ids) == n and check_greedy(model, model.encode(prompt), ids, P).ok
        assert exact >= 6
        status, _, body = http(f"http://127.0.0.1:{port}/v1/completions", {"model": "default:p3", "prompt": "x"})
        assert status == 404 and body["error"]["code"] == "model_not_found"  # the same app, errors included
    finally:
        serve.shutdown()
        ray.shutdown()
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        shutil.rmtree(temp, ignore_errors=True)
    assert not [pid for pid in pids if _alive(pid)], "Ray processes outlived ray.shutdown()"
    with pytest.raises(OSError):
        http(f"http://127.0.0.1:{port}/health", timeout=5)
