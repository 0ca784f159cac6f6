"""benchmarks.serve's scheduler bound, without measuring: the clients' requests go through the server's
`Batcher` in-process and come back whole and correct (the greedy continuation of their prompts)."""

from __future__ import annotations

from pathlib import Path

from benchmarks import serve as bench
from benchmarks.common import prompt_ids
from parscale.runtime import Model
from parscale.serve.verify import check_greedy


def test_scheduler_bound_answers_every_request_correctly(default_int8_export: Path) -> None:
    model = Model.load(default_int8_export, threads=1)
    prompts = [prompt_ids(model.vocab_size, 12, seed=i) for i in range(4)]
    r = bench.scheduler_bound(model, 1, clients=2, requests=2, prompts=prompts, gen=6, max_batch=4)
    assert r["tokens"] == 2 * 2 * 6 and r["wall_s"] > 0 and r["ttft_p50_s"] > 0
    assert sorted(x["prompt"] for x in r["responses"]) == [0, 1, 2, 3]
    for x in r["responses"]:
        assert len(x["tokens"]) == 6
        assert check_greedy(model, prompts[x["prompt"]], x["tokens"], 1).ok, x


def test_no_bound_cases_measure_nothing(tmp_path: Path) -> None:
    """--bound-gen '' (or no client count of 4 or fewer) skips the bound: nothing is loaded or run."""
    assert bench.bounds(tmp_path / "absent", 2, [1, 4], 4, [[1, 2]], [], 16, 3) == []
    assert bench.bounds(tmp_path / "absent", 2, [], 4, [[1, 2]], [64], 16, 3) == []
