"""The `parscale` command: thin typer wrappers over the library; all printing happens here."""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from parscale.errors import ParScaleError

app = typer.Typer(
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Export ParScale language models to ONNX and run them on small devices.",
)
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

DEFAULT_MODEL = Path(__file__).parent / "assets" / "default"
ModelArg = Annotated[
    Optional[Path],  # noqa: UP045 - typer needs Optional at runtime on 3.10
    typer.Argument(help="Checkpoint folder (config.json + safetensors). Default: the embedded model."),
]


def main() -> None:
    """Console-script entry: library errors become one line on stderr and exit code 1."""
    try:
        app()
    except ParScaleError as e:
        err.print(f"[bold red]error:[/] {e}", soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


def _stage_printer(verbose: bool):  # type: ignore[no-untyped-def]
    start = time.perf_counter()

    def log(msg: str) -> None:
        out.print(f"[dim]{time.perf_counter() - start:7.1f}s[/] {msg}")

    return log


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


@app.command()
def init(
    out_dir: Annotated[Path, typer.Argument(metavar="OUT", help="Folder to create.")],
    P: Annotated[int, typer.Option("--P", help="Number of parallel streams (parscale_n).")] = 4,  # noqa: N803
    preset: Annotated[str, typer.Option(help="Backbone: tiny, qwen2.5-0.5b, qwen2.5-1.5b, qwen2.5-3b.")] = "tiny",
    prefix: Annotated[int, typer.Option(help="Prefix tokens per stream (parscale_n_tokens).")] = 48,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    dtype: Annotated[str, typer.Option(help="Stored dtype: bfloat16, float16 or float32.")] = "bfloat16",
    shards: Annotated[int, typer.Option(help="Number of safetensors shards.")] = 1,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty OUT.")] = False,
) -> None:
    """Write a random checkpoint in the published ParScale layout (for demos, tests, benchmarks)."""
    from parscale.exporter.init import init_checkpoint

    path = init_checkpoint(out_dir, P=P, preset=preset, prefix=prefix, seed=seed, dtype=dtype,
                           shards=shards, force=force)
    size = sum(p.stat().st_size for p in path.iterdir())
    out.print(f"wrote {path} ({preset}, P={P}, {dtype}, {_mb(size)})")


@app.command()
def export(
    model: ModelArg = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="Export folder to create.")] = Path("export"),
    P: Annotated[Optional[int], typer.Option("--P", help="Streams; must equal the checkpoint's parscale_n.")] = None,  # noqa: N803, UP045
    dtype: Annotated[str, typer.Option(help="fp32 (default) or fp16 (GPU targets).")] = "fp32",
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 18,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty output folder.")] = False,
    no_validate: Annotated[bool, typer.Option("--no-validate", help="Skip the CPU check against PyTorch.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="More detail.")] = False,
) -> None:
    """Export a ParScale checkpoint to ONNX with KV-cache inputs/outputs, validated on CPU."""
    from parscale.exporter.export import Dtype
    from parscale.exporter.export import export as run_export

    if dtype not in Dtype.__members__:
        raise ParScaleError(f"--dtype must be one of {', '.join(Dtype.__members__)}, got {dtype!r}")
    result = run_export(model or DEFAULT_MODEL, output, P=P, dtype=Dtype(dtype), opset=opset, force=force,
                        validate=not no_validate, log=_stage_printer(verbose))
    m = result.manifest
    out.print(f"exported {result.out}: P={m['model']['P']}, {m['dtype']}, {_mb(result.total_bytes)}")
    if verbose:
        for name, info in m["files"].items():
            out.print(f"  {name:28s} {_mb(info['bytes']):>12s}")
        for name, secs in result.seconds.items():
            out.print(f"  {name:28s} {secs:10.1f} s")
    if result.validation:
        v = result.validation
        out.print(f"validation: max |logit diff| {v.max_abs_diff:.2e} (prefill {v.prefill_diff:.2e}, "
                  f"{v.steps} decode steps {v.decode_diff:.2e}), greedy match {v.greedy_match}")
    out.print(f"peak RSS {_peak_rss_mb():,.0f} MB")


if __name__ == "__main__":
    main()
