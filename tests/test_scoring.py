"""One scorer: windows, NLL and KL, and `parscale eval` and `parscale compare` agreeing on one text."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from runtime_helpers import TEXTS

from parscale.errors import ParScaleError
from parscale.evaluate import eval_export
from parscale.fidelity import compare_exports
from parscale.scoring import full_windows, kl_divergence, log_softmax, plan_windows, spread, token_nll
from parscale.text import EOS_TEXT, document_ids, folder_tokenizer


def test_plan_windows_scores_every_token_once() -> None:
    for n, window, stride in [(2, 4, 4), (10, 4, 4), (11, 4, 2), (100, 16, 5), (17, 16, 16)]:
        scored: list[int] = []
        for w in plan_windows(n, window, stride):
            assert 1 <= w.length <= window and 0 <= w.skip < w.length
            scored += range(w.start + 1 + w.skip, w.start + w.length + 1)
        assert scored == list(range(1, n))


def test_full_windows_are_the_non_overlapping_windows_of_one_length() -> None:
    assert [(w.start, w.length) for w in full_windows(20, 6)] == [(0, 6), (6, 6), (12, 6)]  # 18..19: a tail
    assert [w.start for w in full_windows(20, 6, max_windows=2)] == [0, 6]
    assert len(full_windows(19, 6)) == 3 and len(full_windows(18, 6)) == 2  # the last target must exist
    with pytest.raises(ParScaleError, match="fewer than one window"):
        full_windows(6, 6)
    assert [w.start for w in spread(plan_windows(101, 10, 10), 3)] == [0, 40, 90]  # 4.5 rounds to even


def test_nll_and_kl_match_their_definitions() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 11)).astype(np.float32)
    targets = rng.integers(0, 11, size=(3, 5))
    p = np.exp(logits.astype(np.float64))
    p /= p.sum(-1, keepdims=True)
    expected = -np.log(np.take_along_axis(p, targets[..., None], -1)[..., 0])
    np.testing.assert_allclose(token_nll(logits, targets), expected)
    q = np.roll(p, 1, axis=-1)
    np.testing.assert_allclose(kl_divergence(np.log(p), np.log(q)), (p * np.log(p / q)).sum(-1))
    np.testing.assert_allclose(np.exp(log_softmax(logits)), p, rtol=1e-12)
    assert np.all(kl_divergence(log_softmax(logits), log_softmax(logits)) == 0)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("".join(TEXTS) * 3, encoding="utf-8")
    return path


def test_document_ids_start_with_one_document_boundary(tiny_exports, text_file: Path) -> None:
    _, out = tiny_exports[4]
    ids = document_ids(out, text_file.read_text())
    tok = folder_tokenizer(out)
    assert ids[0] == tok.token_id(EOS_TEXT) and EOS_TEXT not in tok.decode(ids[1:].tolist())
    assert tok.decode(ids[1:].tolist()) == text_file.read_text()


def test_eval_and_compare_agree_on_one_export_and_text(tiny_exports, text_file: Path) -> None:
    """`parscale eval` (stride = window) and `parscale compare`'s perplexity score the same tokens."""
    _, out = tiny_exports[4]
    window, windows = 32, 4
    e = eval_export(out, text_file, window=window, stride=window, max_tokens=window * windows)
    f = compare_exports(out, out, text=text_file, window=window, max_windows=windows)
    assert e.tokens == f.positions == window * windows
    assert f.perplexity_a == pytest.approx(e.ppl_per_token, rel=1e-5)  # compare decodes 8 of each 32 via the cache
    assert f.perplexity_b == f.perplexity_a and f.top1_agreement == 1.0 and f.mean_kl == 0.0
