"""The runtime's batch loop (parscale.runtime.batch): rows that join a running batch, leave it early,
grow its cache or are cancelled get exactly what each gets alone from `Model.generate`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from parscale.runtime import GenerationResult, Model
from parscale.runtime.batch import DRAIN, JOIN, PAD_FREE, WAIT, DecodeBatch, Row, RowSpec
from parscale.runtime.engine import Engine
from parscale.runtime.sampling import SamplingConfig

PROMPTS = [[5, 17, 300, 42, 7, 99, 3, 8, 9], [11, 12, 400], [1, 2, 3, 4, 5, 6], [200, 201]]


@pytest.fixture(scope="module")
def models(tiny_exports: dict[int, tuple[Path, Path]]) -> dict[int, Model]:
    return {P: Model.load(export, provider="cpu") for P, (_, export) in tiny_exports.items()}


def row(m: Model, prompt: list[int], n: int, tag: object = None, *, stop: tuple[str, ...] = (),
        ignore_eos: bool = True, **sampling: object) -> Row:
    spec = RowSpec(prompt=prompt, max_new_tokens=n, sampling=SamplingConfig(**sampling), stop=stop,  # type: ignore[arg-type]
                   ignore_eos=ignore_eos)
    return Row(spec, vocab_size=m.vocab_size, eos_ids=m.eos_ids, tokenizer=m.tokenizer, tag=tag)


def alone(m: Model, r: Row) -> GenerationResult:
    s = r.spec
    return m.generate(prompt_ids=s.prompt, max_new_tokens=s.max_new_tokens, temperature=s.sampling.temperature,
                      top_k=s.sampling.top_k, top_p=s.sampling.top_p, seed=s.sampling.seed,
                      repetition_penalty=s.sampling.repetition_penalty, stop=list(s.stop) or None,
                      ignore_eos=s.ignore_eos)


def drive(batch: DecodeBatch, schedule: dict[int, list[Row]]) -> dict[object, list[int]]:
    """Admit each step's rows (they must fit), then step, until every row has finished."""
    tokens: dict[object, list[int]] = {}
    step = 0
    while step <= max(schedule) or batch.live:
        joining = schedule.get(step, [])
        for i, r in enumerate(joining):
            assert batch.fits(r.spec, joining=[j.spec for j in joining[:i]]) == JOIN, (step, r.tag)
        for e in [*batch.admit(joining), *batch.step()]:
            tokens.setdefault(e.row.tag, []).append(e.token)
        step += 1
    return tokens


def engine(m: Model, shifts: bool) -> Engine:
    """The Engine a Model makes (it moves cached rows: rows join prefilled alone), or one that cannot
    (no rotary base: rows join prefilled left-padded to the batch's length)."""
    e = m.engine(m.info) if shifts else Engine(m.session, m.info, m.provider)
    assert e.shifts == shifts
    return e


@pytest.mark.parametrize("shifts", [True, False], ids=["moved", "padded"])
@pytest.mark.parametrize("P", [1, 4])
def test_rows_joining_and_leaving_get_what_they_get_alone(models, P, shifts):  # noqa: N803
    m = models[P]
    batch = DecodeBatch(engine(m, shifts), slots=4, context_length=m.context_length)
    rows = {
        "first": row(m, PROMPTS[0], 12, "first"),
        "short": row(m, PROMPTS[1], 3, "short"),  # leaves early from slot 1: the last row moves into it
        "sampled": row(m, PROMPTS[2], 10, "sampled", temperature=1.1, top_p=0.9, seed=5),
        "late": row(m, PROMPTS[3], 14, "late", repetition_penalty=1.3),  # joins later and needs a longer cache
    }
    got = drive(batch, {0: [rows["first"], rows["short"]], 2: [rows["sampled"]], 5: [rows["late"]]})
    for name, r in rows.items():
        want = alone(m, r)
        assert got[name] == want.generated_ids == r.result().generated_ids, name
        assert r.result().finish_reason == "length"
    assert batch.capacity == 0 and batch.engine.cache == []  # an empty batch released its cache


def test_cancelled_row_leaves_and_the_others_go_on(models):
    m = models[4]
    batch = DecodeBatch(Engine(m.session, m.info, m.provider), slots=3)
    a, b, c = (row(m, p, 10, i) for i, p in enumerate(PROMPTS[:3]))
    batch.admit([a, b, c])
    batch.step()
    b.cancelled = True
    while batch.live:
        batch.step()
    assert len(b.generated) == 2 and b.reason is None
    for r in (a, c):
        assert r.generated == alone(m, r).generated_ids


def test_stop_strings_and_eos_end_rows_separately(models):
    m = models[1]
    full = m.generate("hello", max_new_tokens=30, ignore_eos=True).text
    stop = full[8:11]
    batch = DecodeBatch(Engine(m.session, m.info, m.provider), slots=2)
    with_stop = row(m, m.encode("hello"), 30, "stop", stop=(stop,))
    plain = row(m, PROMPTS[0], 6, "plain")
    drive(batch, {0: [with_stop, plain]})
    want = m.generate("hello", max_new_tokens=30, ignore_eos=True, stop=stop)
    assert with_stop.result().text == want.text and want.finish_reason == with_stop.reason == "stop"
    assert plain.result().generated_ids == alone(m, plain).generated_ids


def test_fits_says_join_wait_or_drain_when_rows_join_padded(models):
    m = models[4]
    batch = DecodeBatch(engine(m, False), slots=2, context_length=m.context_length)
    first = row(m, PROMPTS[2], 200)
    assert batch.fits(first.spec) == JOIN  # an empty batch takes anyone
    batch.admit([first])
    assert batch.length == len(PROMPTS[2])
    assert batch.fits(RowSpec(prompt=PROMPTS[0], max_new_tokens=4)) == WAIT  # longer than the batch, for now
    assert batch.fits(RowSpec(prompt=PROMPTS[3], max_new_tokens=4)) == JOIN
    assert batch.fits(RowSpec(prompt=PROMPTS[3], max_new_tokens=4), joining=[first.spec]) == WAIT  # no slot left
    too_long = m.context_length - batch.length + 1
    assert batch.fits(RowSpec(prompt=PROMPTS[3], max_new_tokens=too_long)) == DRAIN  # past the context
    for _ in range(PAD_FREE + 10):
        batch.step()
    assert batch.live == [first]
    # Padding beyond PAD_FREE and 4x the steps left (first has ~125 left): still worth joining.
    assert batch.fits(RowSpec(prompt=[1], max_new_tokens=4)) == JOIN
    first.spec = RowSpec(prompt=first.spec.prompt, max_new_tokens=len(first.generated) + 2)  # 2 steps left
    assert batch.fits(RowSpec(prompt=[1], max_new_tokens=4)) == DRAIN  # cheaper to wait for the end
    batch.close()


class WholeCacheEngine(Engine):
    """An Engine that binds its cache whole, as on CUDA (where slots cannot be bound, moved or grown)."""

    rearranges = False  # type: ignore[assignment]

    def use(self, start: int, stop: int) -> None:
        assert (start, stop) == (0, self.slots)
        super().use(start, stop)

    def move(self, src: int, dst: int, tokens: int) -> None:
        raise AssertionError("a whole cache is never rearranged")


def test_a_cache_bound_whole_starts_rows_together_and_keeps_finished_ones(models):
    m = models[4]
    batch = DecodeBatch(WholeCacheEngine(m.session, m.info, m.provider), slots=3)
    short, long = row(m, PROMPTS[1], 2, "short"), row(m, PROMPTS[0], 8, "long")
    batch.admit([short, long])
    assert batch.fits(RowSpec(prompt=[1], max_new_tokens=2)) == DRAIN  # no joining into a running batch
    batch.step()
    assert short.reason == "length" and len(batch.rows) == 2  # finished, still fed until the batch ends
    while batch.live:
        batch.step()
    assert batch.capacity == 0
    for r in (short, long):
        assert r.generated == alone(m, r).generated_ids
    assert batch.fits(RowSpec(prompt=[1], max_new_tokens=2)) == JOIN  # the next batch starts afresh


@pytest.mark.parametrize("P", [1, 4])
def test_a_cache_moved_behind_padding_is_the_padded_prefills(models, P):  # noqa: N803
    """Engine.shift: a prompt prefilled alone and moved `pad` columns later (keys turned by RoPE(pad),
    prefix rows included) holds the cache of the same prompt prefilled behind `pad` padding tokens."""
    m = models[P]
    e = m.engine(m.info)
    prompt, pad = PROMPTS[0], 5
    n, r = len(prompt), m.info.prefix_rows
    e.reserve(2, n + pad)
    e.use(0, 1)
    e.step(np.array([prompt]), np.ones((1, n), np.int64), np.arange(n)[None])
    e.shift(0, 1, pad, n)
    e.use(1, 2)
    mask = np.array([[0] * pad + [1] * n])
    e.step(np.array([[0] * pad + prompt]), mask, np.clip(mask.cumsum(1) - 1, 0, None))
    rows = np.r_[0:r, r + pad:r + pad + n]  # prefix and token rows (padding columns hold other values)
    for name, a in zip(e.past_names, e._host_cache, strict=True):
        moved, padded = a[0][:, rows], a[1][:, rows]
        assert np.abs(moved - padded).max() <= 1e-5 * np.abs(padded).max(), name
    e.release()


def test_with_moved_rows_any_prompt_joins_and_padding_stays_bounded(models):
    m = models[4]
    batch = DecodeBatch(engine(m, True), slots=3, context_length=m.context_length)
    short_first = row(m, PROMPTS[3], 6, "a")  # 2 tokens: the batch is short when the long prompt arrives
    batch.admit([short_first])
    batch.step()
    longer = row(m, PROMPTS[0], 12, "b")  # 9 tokens, longer than the batch: joins at once, the batch moves right
    assert batch.fits(longer.spec) == JOIN
    batch.admit([longer])
    assert batch.length == len(PROMPTS[0])
    long_prompt = row(m, list(range(3, 3 + PAD_FREE + 20)), 2, "c")  # leaves soon, the batch PAD_FREE+ long
    batch.admit([long_prompt])
    while long_prompt.reason is None or short_first.reason is None:
        batch.step()
    late = row(m, [7], 5, "d")  # one token, behind a batch of PAD_FREE+ columns
    assert batch.fits(late.spec) == JOIN
    before = batch.length
    batch.admit([late])
    # "a" and "c" have left: the padding every row shared is dropped, the batch as long as its longest row.
    assert batch.length == len(PROMPTS[0]) + len(longer.generated) - 1 < before - PAD_FREE
    while batch.live:
        batch.step()
    for r in (short_first, longer, long_prompt, late):
        assert r.generated == alone(m, r).generated_ids, r.tag
    too_long = RowSpec(prompt=[1], max_new_tokens=m.context_length)
    batch.admit([row(m, PROMPTS[1], 50)])
    assert batch.fits(too_long) == DRAIN  # past the context
    assert batch.fits(RowSpec(prompt=[1], max_new_tokens=2), joining=[too_long] * 2) == WAIT  # no slot left
    batch.close()
