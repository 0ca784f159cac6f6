"""What the `parscale` commands share: the consoles, the option types, small parsers and printers."""

from __future__ import annotations

import re
import resource
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console

from parscale.errors import ParScaleError

if TYPE_CHECKING:
    from parscale.manifest import Manifest

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "assets" / "default"
ModelArg = Annotated[
    Optional[Path],  # noqa: UP045 - typer needs Optional at runtime on 3.10
    typer.Argument(help="Checkpoint folder (config.json + safetensors). Default: the embedded model."),
]
RuntimeModelArg = Annotated[Path, typer.Argument(metavar="MODEL", help="Export folder (from `parscale export`).")]
ProviderOpt = Annotated[str, typer.Option(help="Execution provider: auto, cpu or cuda.")]
SpinOpt = Annotated[Optional[bool], typer.Option(  # noqa: UP045
    "--spin/--no-spin", show_default=False,
    help="Idle ONNX Runtime workers spin (faster on a quiet machine) or sleep (kinder to a busy one); "
         "default: the measured choice (README: Runtime).")]


# Decimal ids separated by commas, spaces allowed around the commas only: "1 2 3" is not "123".
IDS = re.compile(r"\s*\d+(?:\s*,\s*\d+)*\s*", re.ASCII)


def parse_ids(text: str) -> list[int]:
    """--prompt-ids' value as token ids; anything but comma-separated decimals is a ParScaleError."""
    if not IDS.fullmatch(text):
        raise ParScaleError(f"--prompt-ids must be comma-separated non-negative integers such as 1,2,3; got {text!r}")
    return [int(t) for t in text.split(",")]


JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]
ThreadsOpt = Annotated[Optional[int], typer.Option(help="Intra-op threads (default: physical cores).")]  # noqa: UP045
WindowOpt = Annotated[int, typer.Option(help="Tokens per window.")]
NoVerifyOpt = Annotated[bool, typer.Option(
    "--no-verify", help="Skip the sha256 and NaN/Inf checks of the export (sizes are still checked).",
)]


def load_checks(model: Path, verify: bool) -> Manifest:
    """Read and check an export folder as Model.load does, without a session; returns its manifest."""
    from parscale.runtime.export_folder import ExportFolder

    return ExportFolder.check(model, verify=verify)


def stage_printer(verbose: bool):  # type: ignore[no-untyped-def]
    """A logger for long work: each message printed as a stage line with the seconds since the start."""
    start = time.perf_counter()

    def log(msg: str) -> None:
        out.print(f"[dim]{time.perf_counter() - start:7.1f}s[/] {msg}")

    return log


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def megabytes(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def ms_per_token(value: float | None, digits: int, width: int = 0) -> str:
    """A decode time per token, or "n/a" when no decode step ran (one new token)."""
    if value is None:
        return f"{'n/a':>{width}} (one new token: no decode step to time)"
    return f"{value:{width}.{digits}f} ms/token"
