"""Every command says which P it ran: compare takes --P (one, or one per side) and reports both; eval
reports the P it scored, never null."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from runtime_helpers import run_cli

from parscale.cli import DEFAULT_MODEL
from parscale.errors import ParScaleError
from parscale.evaluate import eval_checkpoint, eval_export
from parscale.fidelity import compare_exports
from parscale.train.corpus import write_held_out

SMALL = dict(window=16, max_windows=1, decode_steps=2)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return write_held_out(tmp_path_factory.mktemp("text") / "held_out.txt")


def test_compare_runs_and_reports_the_p_of_each_side(default_int8_export):
    multi = default_int8_export  # serves P = 1, 2, 4, 8
    both = compare_exports(multi, multi, P=2, **SMALL)
    assert (both.P_a, both.P_b, both.top1_agreement, both.mean_kl) == (2, 2, 1.0, 0.0)
    pair = compare_exports(multi, multi, P=(2, 4), **SMALL)
    assert (pair.P_a, pair.P_b) == (2, 4) and pair.mean_kl > 0  # the streams really differ
    default = compare_exports(multi, multi, **SMALL)
    assert (default.P_a, default.P_b) == (8, 8)  # each its default, named rather than silent
    assert default.to_dict()["P_a"] == 8


@settings(max_examples=25, deadline=None)
@given(P=st.one_of(st.integers(-3, 20).filter(lambda p: p not in (1, 2, 4, 8)), st.booleans(), st.floats(0, 9),
                   st.text(max_size=2), st.lists(st.sampled_from([1, 2, 4, 8]), min_size=3, max_size=4)))
def test_compare_refuses_a_p_an_export_does_not_serve(default_int8_export, P):  # noqa: N803
    with pytest.raises(ParScaleError, match=r"serves P = 1, 2, 4, 8|one value for both exports"):
        compare_exports(default_int8_export, default_int8_export, P=P, **SMALL)


def test_compare_cli_takes_p_and_reports_it_in_text_and_json(default_int8_export):
    e = str(default_int8_export)
    options = ["--window", "16", "--windows", "1", "--decode-steps", "2"]
    r = run_cli("compare", e, e, "--P", "2,4", "--json", *options)
    assert r.returncode == 0, r.stderr
    assert {k: json.loads(r.stdout)[k] for k in ("P_a", "P_b")} == {"P_a": 2, "P_b": 4}
    r = run_cli("compare", e, e, "--P", "1", *options)
    assert r.returncode == 0 and f"{e} at P=1 vs {e} at P=1" in r.stdout, r.stderr
    for bad in ("3", "1,2,4", "x"):
        r = run_cli("compare", e, e, "--P", bad, *options)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and "P" in r.stderr, r.stderr


def test_generate_names_the_p_of_a_multi_p_export(default_int8_export):
    r = run_cli("generate", str(default_int8_export), "--prompt-ids", "1,2", "--max-new-tokens", "2", "--P", "2")
    assert r.returncode == 0 and "2 tokens at P=2, finish" in r.stderr, r.stderr
    r = run_cli("generate", str(default_int8_export), "--prompt-ids", "1,2", "--max-new-tokens", "2")
    assert r.returncode == 0 and "2 tokens at P=8, finish" in r.stderr, r.stderr


def test_eval_reports_the_p_it_scored(default_int8_export, text):
    options = dict(window=32, stride=32, max_tokens=64)
    assert eval_export(default_int8_export, text, **options).P == 8  # the default, stated
    assert eval_export(default_int8_export, text, P=2, **options).P == 2
    assert eval_checkpoint(DEFAULT_MODEL, text, **options).P == 4  # the embedded checkpoint's own P
    r = run_cli("eval", str(default_int8_export), "--json", "--window", "32", "--stride", "32", "--max-tokens", "64")
    assert r.returncode == 0 and json.loads(r.stdout)["P"] == 8, r.stderr
