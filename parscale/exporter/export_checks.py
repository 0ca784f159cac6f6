"""The export's checks of its graph: each P's float graph against its PyTorch module, then the quantized
graph against the float one (fidelity), and the manifest's record of both."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from parscale.driver import open_session
from parscale.errors import ParScaleError
from parscale.exporter.torch_reference import Reference, ValidationReport, check_graph
from parscale.fidelity import Fidelity, compare_sessions, fidelity_tokens
from parscale.manifest import MODEL_FILE


def validate_graphs(
    references: list[Reference], float_dir: Path, quant_dir: Path | None, *, tolerance: float, model_dir: Path,
    vocab: int, eval_text: str | Path | None, stage: Callable[[str], None],
) -> tuple[dict[int, ValidationReport], dict[int, Fidelity]]:
    """The float graph against each P's PyTorch reference; then the quantized graph in `quant_dir` (None:
    not quantized) against the float one. Raises ParScaleError when a P fails its tolerance."""
    stage("validating on CPU against PyTorch")
    float_session = _Handover(open_session(float_dir / MODEL_FILE, prepack=False))
    reports = {}
    multi = len(references) > 1
    for ref in references:
        reports[ref.P] = check_graph(float_session.peek(), ref, tolerance=tolerance)
        if not reports[ref.P].ok:
            raise ParScaleError(_validation_failure(reports[ref.P], ref.P if multi else None))
    fidelities = {}
    if quant_dir is not None:
        stage("measuring fidelity against the float graph")
        for k, ref in enumerate(references):  # the float session is handed over once, then reopened per P
            open_float = float_session.take if k == 0 else (lambda: open_session(float_dir / MODEL_FILE, prepack=False))
            fidelities[ref.P] = _fidelity(open_float, quant_dir, model_dir, vocab, eval_text, ref.P if multi else None)
    return reports, fidelities


class _Handover:
    """Holds a session until `take` hands it over, keeping no reference, so that its memory goes
    as soon as the taker drops it (the fidelity run frees the float graph before the quantized
    one is loaded)."""

    def __init__(self, session: Any) -> None:
        self._session = session

    def peek(self) -> Any:
        return self._session

    def take(self) -> Any:
        session, self._session = self._session, None
        return session


def validation_record(reports: dict[int, ValidationReport], fidelities: dict[int, Fidelity]) -> dict[str, Any]:
    """The manifest's validation: the largest P's figures, and for a multi-P export each P's under "by_P"."""
    def record(P: int) -> dict[str, Any]:  # noqa: N803
        report, fidelity = reports[P], fidelities.get(P)
        r: dict[str, Any] = {
            "max_abs_logit_diff": report.max_abs_diff, "greedy_match": report.greedy_match,
            "decode_steps": report.steps, "tolerance": report.tolerance,
        }
        if fidelity is not None:
            r["fidelity"] = fidelity.to_dict()
        return r

    top = record(max(reports))
    if len(reports) > 1:
        top["by_P"] = {str(P): record(P) for P in sorted(reports)}
    return top


def _validation_failure(report: ValidationReport, P: int | None) -> str:  # noqa: N803
    at = f" at P={P}" if P is not None else ""
    if not np.isfinite(report.max_abs_diff):
        return (f"validation failed{at}: the graph's logits are not finite (NaN or Inf) where PyTorch's are "
                "compared; the export is not usable")
    return (f"validation failed{at}: max |logit difference| {report.max_abs_diff:.3g} "
            f"(tolerance {report.tolerance:g}), greedy tokens match: {report.greedy_match}")


# Text windows (x 128 tokens) scored after a quantized export; `parscale compare --windows 0` does a whole text.
EVAL_WINDOWS = 64


def _fidelity(
    open_float: Callable[[], Any], quant_dir: Path, model_dir: Path, vocab: int, text: str | Path | None,
    P: int | None,  # noqa: N803
) -> Fidelity:
    """The quantized graph against the float one, on a text file's tokens or on random tokens."""
    tokens, source = fidelity_tokens(model_dir, text, vocab, 4 * 128 + 1)  # + 1: the last window's last target
    return compare_sessions(
        open_float, lambda: open_session(quant_dir / MODEL_FILE), tokens,
        window=128, max_windows=EVAL_WINDOWS if text is not None else 4, source=source, text=text is not None,
        batch=1,  # one window at a time: a (4, 128, 151936) batch of logits alone is 311 MB
        P=P,
    )
