"""The `parscale` command: thin typer wrappers over the library; all printing happens here."""

from __future__ import annotations

import os
import re
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from parscale.config import Streams
from parscale.errors import ParScaleError

if TYPE_CHECKING:
    from parscale.manifest import Manifest

app = typer.Typer(
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Export ParScale language models to ONNX and run them on small devices.",
)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

DEFAULT_MODEL = Path(__file__).parent / "assets" / "default"
ModelArg = Annotated[
    Optional[Path],  # noqa: UP045 - typer needs Optional at runtime on 3.10
    typer.Argument(help="Checkpoint folder (config.json + safetensors). Default: the embedded model."),
]


def main() -> None:
    """Console-script entry: every error becomes one line on stderr and exit code 1.

    A ParScaleError is a problem the user can fix and is printed as it is. Anything else is a
    failure inside the library: one line with its type (and stage, for exports), the traceback
    only with --verbose.
    """
    verbose = any(a in ("--verbose", "-v") for a in sys.argv[1:])
    if sys.stdout is None:  # started with stdout closed (`>&-`): Python leaves sys.stdout None
        err.print("[bold red]error:[/] standard output is closed: redirect it instead (> FILE, or > /dev/null)")
        sys.exit(1)
    try:
        app()
    except BrokenPipeError:  # the reader left (`| head`): stop quietly, as coreutils do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        sys.exit(1)
    except KeyboardInterrupt as e:
        from parscale.locking import Terminated

        err.print("terminated" if isinstance(e, Terminated) else "interrupted")
        sys.exit(143 if isinstance(e, Terminated) else 130)
    except ParScaleError as e:
        cause = e.__cause__
        if verbose and cause is not None:
            err.print("".join(traceback.format_exception(cause)), markup=False, end="")
        hint = "; run with --verbose for the traceback" if cause is not None and not verbose else ""
        err.print(f"[bold red]error:[/] {escape(str(e))}{hint}")
        sys.exit(1)
    except Exception as e:
        if verbose:
            err.print(traceback.format_exc(), markup=False, end="")
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        hint = "" if verbose else "; run with --verbose for the traceback"
        err.print(f"[bold red]error:[/] {type(e).__name__}" + escape(f": {detail}" if detail else "") + hint)
        sys.exit(1)


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
    from parscale.modeling.random_init import init_checkpoint

    path = init_checkpoint(out_dir, P=P, preset=preset, prefix=prefix, seed=seed, dtype=dtype,
                           shards=shards, force=force)
    size = sum(p.stat().st_size for p in path.iterdir())
    out.print(f"wrote {path} ({preset}, P={P}, {dtype}, {_mb(size)})")


@app.command()
def export(
    model: Annotated[Optional[list[Path]], typer.Argument(  # noqa: UP045
        metavar="[MODEL]...", show_default=False,
        help="Checkpoint folder (config.json + safetensors); several folders with one frozen backbone make a "
             "multi-P export. Default: the embedded model.",
    )] = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="Export folder to create.")] = Path("export"),
    P: Annotated[Optional[str], typer.Option("--P", help=(  # noqa: N803, UP045
        "Streams: the checkpoint's parscale_n (default) or a P of its head sets; several (1,2,4,8) make one "
        "multi-P export."))] = None,
    dtype: Annotated[str, typer.Option(help="fp32 (default) or fp16 (GPU targets).")] = "fp32",
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 18,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty output folder.")] = False,
    no_validate: Annotated[bool, typer.Option("--no-validate", help="Skip the CPU check against PyTorch.")] = False,
    int8: Annotated[bool, typer.Option("--int8", help="Weight-only 8-bit quantization.")] = False,
    int4: Annotated[bool, typer.Option("--int4", help="Weight-only 4-bit quantization.")] = False,
    block_size: Annotated[Optional[int], typer.Option(help="Quantization block size (default per bit width).")] = None,  # noqa: UP045
    symmetric: Annotated[Optional[bool], typer.Option(  # noqa: UP045
        "--symmetric/--asymmetric", help="Without or with zero points (default per bit width).", show_default=False,
    )] = None,
    accuracy_level: Annotated[Optional[int], typer.Option(help="MatMulNBits accuracy_level 0-4.")] = None,  # noqa: UP045
    method: Annotated[Optional[str], typer.Option(help="gptq or rtn (round-to-nearest; fast).")] = None,  # noqa: UP045
    kernel: Annotated[Optional[str], typer.Option(help=(  # noqa: UP045
        "The gate/up projections' kernel: MatMulNBits (block-wise weights) or, with --int8, "
        "MatMulIntegerToFloat (int8 weights per output channel, activations per row; the int8 default on "
        "fp32)."))] = None,
    calibration_text: Annotated[Optional[Path], typer.Option(help="Text for GPTQ (default: model samples).")] = None,  # noqa: UP045
    eval_text: Annotated[Optional[Path], typer.Option(help="Text for the quantized export's check.")] = None,  # noqa: UP045
    ort_format: Annotated[bool, typer.Option(
        "--ort-format", help="Also write model.ort + required_operators.config (ONNX Runtime Mobile).",
    )] = False,
    force_memory: Annotated[bool, typer.Option(
        "--force-memory", help="Run even if the estimated peak memory exceeds what is available.",
    )] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="More detail, and tracebacks of failures.")] = False,
) -> None:
    """Export a ParScale checkpoint to ONNX with KV-cache inputs/outputs, validated on CPU."""
    import tempfile

    from parscale.exporter.pipeline import Dtype
    from parscale.exporter.pipeline import export as run_export
    from parscale.exporter.quant.policy import default_scheme

    if dtype not in Dtype.__members__:
        raise ParScaleError(f"--dtype must be one of {', '.join(Dtype.__members__)}, got {dtype!r}")
    if int8 and int4:
        raise ParScaleError("pass at most one of --int8 and --int4")
    scheme = None
    if int8 or int4:
        scheme = default_scheme(8 if int8 else 4, block_size=block_size, symmetric=symmetric,
                                accuracy_level=accuracy_level, method=method, kernel=kernel, dtype=dtype)
    elif any(o is not None for o in (block_size, symmetric, accuracy_level, method, kernel, calibration_text,
                                     eval_text)):
        raise ParScaleError("quantization options (--block-size, --symmetric/--asymmetric, --accuracy-level, "
                            "--method, --kernel, --calibration-text, --eval-text) need --int8 or --int4")
    with tempfile.TemporaryDirectory() as tmp:
        if scheme is not None and eval_text is None and not model and not no_validate:
            # The embedded model's fidelity is judged on its held-out text, as `parscale eval` does.
            from parscale.train.corpus import write_held_out

            eval_text = write_held_out(Path(tmp) / "held_out.txt")
        streams = Streams.parse(P) if P is not None else None
        result = run_export(model or [DEFAULT_MODEL], output, P=streams, dtype=Dtype(dtype), opset=opset, force=force,
                            validate=not no_validate, quantize=scheme, eval_text=eval_text,
                            calibration_text=calibration_text, ort_format=ort_format,
                            check_memory=not force_memory, log=_stage_printer(verbose))
    m = result.manifest
    out.print(f"exported {result.out}: P={','.join(map(str, m.streams))}, {m.dtype}, {_mb(result.total_bytes)}")
    if verbose:
        for name, info in m.files.items():
            out.print(f"  {name:28s} {_mb(info.bytes):>12s}")
        for name, secs in result.seconds.items():
            out.print(f"  {name:28s} {secs:10.1f} s")
    multi = len(result.validations) > 1
    for p, v in result.validations.items():
        out.print(f"validation{f' P={p}' if multi else ''}: max |logit diff| {v.max_abs_diff:.2e} (prefill "
                  f"{v.prefill_diff:.2e}, {v.steps} decode steps {v.decode_diff:.2e}), greedy match {v.greedy_match}")
    if result.quantization:
        _print_quantization(m.quantization)
    for p, f in result.fidelities.items():
        _print_fidelity(f, f"quantized vs float graph{f', P={p}' if multi else ''}")
    out.print(f"peak RSS {_peak_rss_mb():,.0f} MB")


def _print_quantization(q: dict) -> None:  # type: ignore[type-arg]
    s, bpw = q["scheme"], q["bits_per_weight"]
    kernel = "MatMulNBits" if s["kernel"] == "MatMulNBits" else f"gate/up {s['kernel']}, the rest MatMulNBits"
    out.print(f"quantization: int{s['bits']} {s['method']}, {kernel} (embeddings int{s['embedding_bits']}), block "
              f"{s['block_size']}, {'symmetric' if s['symmetric'] else 'asymmetric'}, accuracy_level "
              f"{s['accuracy_level']}; "
              f"{bpw['quantized']:.3f} bits/weight over {q['quantized_tensors']} quantized tensors, "
              f"{bpw['model']:.3f} over the whole model; tied table shared: {q['shared_embedding']}"
              + (f"; calibration: {q['calibration']}" if q.get("calibration") else ""))


def _print_fidelity(f, what: str) -> None:  # type: ignore[no-untyped-def]
    ppl = f" perplexity {f.perplexity_a:.3f} -> {f.perplexity_b:.3f};" if f.perplexity_a is not None else ""
    out.print(f"fidelity ({what}, {f.source}, {f.positions} positions, {f.decode_steps} of each "
              f"{f.window} decoded with the cache): top-1 agreement {100 * f.top1_agreement:.2f}%, "
              f"mean KL {f.mean_kl:.2e} (max {f.max_kl:.2e});{ppl}".rstrip(";"))
    if f.perplexity_a is None:
        out.print("  (random tokens are out of distribution for a trained model: pass a text file for "
                  "representative figures)")


MAX_RANDOM_WINDOWS = 1024


@app.command()
def compare(
    a: Annotated[Path, typer.Argument(metavar="A", help="Reference export folder (e.g. the fp32 export).")],
    b: Annotated[Path, typer.Argument(metavar="B", help="Export folder to measure against A.")],
    text: Annotated[Optional[Path], typer.Option(help="UTF-8 text to score (default: random tokens).")] = None,  # noqa: UP045
    window: WindowOpt = 128,
    windows: Annotated[int, typer.Option(help="Windows at most (0 = the whole text).")] = 8,
    decode_steps: Annotated[int, typer.Option(help="Last tokens of each window fed through the KV cache.")] = 8,
    threads: ThreadsOpt = None,
    as_json: JsonOpt = False,
    P: Annotated[Optional[str], typer.Option("--P", help=(  # noqa: N803, UP045
        "Streams: one P for both exports (e.g. 4), or one for each (A,B, e.g. 4,1); default: each its own "
        "default (its largest)."))] = None,
    no_verify: NoVerifyOpt = False,
) -> None:
    """Top-1 agreement, KL(A || B) and perplexity of two exports on identical token windows."""
    import json

    from parscale.args import check_int, check_threads
    from parscale.fidelity import compare_exports

    if P is not None and (not IDS.fullmatch(P) or P.count(",") > 1):
        raise ParScaleError(f"--P takes one P for both exports or two (A,B) such as 4 or 4,1; got {P!r}")
    check_int(window, "--window", minimum=1)  # its bound by the context: compare_exports, which knows it
    # Random tokens are made in memory, window x windows of them: bounded; a text bounds itself.
    check_int(windows, "--windows", minimum=0, maximum=None if text else MAX_RANDOM_WINDOWS,
              why=" without --text (pass a text file to score more)")
    check_int(decode_steps, "--decode-steps", minimum=0, maximum=window - 1, why=" (the window minus one)")
    if text is None and windows == 0:
        windows = 8  # "the whole text" without a text: the default number of random windows
    f = compare_exports(a, b, text=text, window=window, max_windows=windows or None, decode_steps=decode_steps,
                        threads=check_threads(threads), P=None if P is None else [int(t) for t in P.split(",")],
                        verify=not no_verify)
    if as_json:
        print(json.dumps({"a": str(a), "b": str(b), **f.to_dict()}))
    else:
        _print_fidelity(f, f"{b} at P={f.P_b} vs {a} at P={f.P_a}")


@app.command()
def train(
    out_dir: Annotated[Path, typer.Argument(metavar="OUT", help="Checkpoint folder to write (replaced).")],
    seed: Annotated[int, typer.Option(help="Random seed (initialisation and data order).")] = 0,
    steps1: Annotated[int, typer.Option(help="Stage-1 steps: the P=1 backbone.")] = 800,
    steps2: Annotated[int, typer.Option(help="Stage-2 steps: prefixes and aggregation, backbone frozen.")] = 300,
    threads: Annotated[int, typer.Option(help="torch intra-op threads.")] = 2,
    backbone_out: Annotated[Optional[Path], typer.Option(help="Also write the stage-1 P=1 backbone here.")] = None,  # noqa: UP045
) -> None:
    """Train the embedded default model: the two-stage ParScale recipe on the Python standard library."""
    from parscale.train.recipe import train_default

    report = train_default(out_dir, seed=seed, steps1=steps1, steps2=steps2, threads=threads,
                           backbone_out=backbone_out, log=_stage_printer(False))
    out.print(f"held-out loss (nats/token, {report.held_out_tokens} tokens): P=1 backbone "
              f"{report.held_out_loss_p1:.4f}, P={report.recipe['P']} {report.held_out_loss_pn:.4f}; "
              f"{report.checkpoint_bytes / 1e6:.1f} MB in {report.total_seconds:.0f} s -> {out_dir}")


@app.command("train-heads")
def train_heads(
    model: Annotated[Path, typer.Argument(metavar="CKPT", help="Checkpoint folder whose backbone stays frozen.")],
    P: Annotated[str, typer.Option("--P", help="Stream counts to add, e.g. 2,8.")],  # noqa: N803
    steps: Annotated[Optional[int], typer.Option(help="Stage-2 steps (default: the recipe's).")] = None,  # noqa: UP045
    threads: Annotated[int, typer.Option(help="torch intra-op threads.")] = 2,
    force: Annotated[bool, typer.Option("--force", help="Retrain and replace existing head sets of these P.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Tracebacks of failures.")] = False,
) -> None:
    """Add stage-2 head sets (prefixes + aggregation) for more P to a checkpoint, its backbone frozen."""
    from parscale.train.recipe import train_heads as run

    results = run(model, Streams.parse(P), steps=steps, threads=threads, log=_stage_printer(verbose), force=force)
    for p, r in results.items():
        out.print(f"P={p}: held-out loss {r['held_out_loss']:.4f} nats/token (from {r['held_out_loss_init']:.4f}); "
                  f"{r['file']} {_mb(r['bytes'])} in {r['stage2']['seconds']:.0f} s")


@app.command("eval")
def evaluate(
    model: ModelArg = None,
    text: Annotated[Optional[Path], typer.Option(help="UTF-8 text file (default: the held-out stdlib files).")] = None,  # noqa: UP045
    window: WindowOpt = 256,
    stride: Annotated[int, typer.Option(help="Window stride; tokens are scored once.")] = 256,
    max_tokens: Annotated[Optional[int], typer.Option(help="Score at most this many tokens.")] = None,  # noqa: UP045
    P: Annotated[Optional[int], typer.Option("--P", help=(  # noqa: N803, UP045
        "Streams: a checkpoint's head set, or a P of a multi-P export (default: the checkpoint's own P, "
        "the export's largest)."))] = None,
    as_json: JsonOpt = False,
    no_verify: NoVerifyOpt = False,
) -> None:
    """Perplexity per token and bits per byte of a text, for a checkpoint or an export folder."""
    import json
    import tempfile

    from parscale.args import check_int
    from parscale.evaluate import eval_checkpoint, eval_export
    from parscale.manifest import MANIFEST

    model = model or DEFAULT_MODEL
    check_int(window, "--window", minimum=1)
    check_int(stride, "--stride", minimum=1, maximum=window, why=" (the window)")
    if max_tokens is not None:
        check_int(max_tokens, "--max-tokens", minimum=1)
    is_export = (model / MANIFEST).is_file()
    with tempfile.TemporaryDirectory() as tmp:
        if text is None:
            from parscale.train.corpus import write_held_out

            text = write_held_out(Path(tmp) / "held_out.txt")
        if is_export:
            result = eval_export(model, text, window=window, stride=stride, max_tokens=max_tokens, P=P,
                                 verify=not no_verify)
        else:
            result = eval_checkpoint(model, text, window=window, stride=stride, max_tokens=max_tokens, P=P)
    if as_json:
        print(json.dumps({"model": str(model), **result.to_dict()}))
    else:
        out.print(f"{model} (P={result.P}): {result.tokens} tokens, {result.bytes} bytes: perplexity "
                  f"{result.ppl_per_token:.3f} per token (NLL {result.nll_per_token:.4f} nats), "
                  f"{result.bits_per_byte:.4f} bits/byte")


# ----------------------------------------------------------------------------- runtime commands
# Runtime modules are imported inside the commands: the CLI must start without torch installed.

RuntimeModelArg = Annotated[Path, typer.Argument(metavar="MODEL", help="Export folder (from `parscale export`).")]
ProviderOpt = Annotated[str, typer.Option(help="Execution provider: auto, cpu or cuda.")]
SpinOpt = Annotated[Optional[bool], typer.Option(  # noqa: UP045
    "--spin/--no-spin", show_default=False,
    help="Idle ONNX Runtime workers spin (faster on a quiet machine) or sleep (kinder to a busy one); "
         "default: the measured choice (README: Runtime).")]


# Decimal ids separated by commas, spaces allowed around the commas only: "1 2 3" is not "123".
IDS = re.compile(r"\s*\d+(?:\s*,\s*\d+)*\s*", re.ASCII)


def _parse_ids(text: str) -> list[int]:
    if not IDS.fullmatch(text):
        raise ParScaleError(f"--prompt-ids must be comma-separated non-negative integers such as 1,2,3; got {text!r}")
    return [int(t) for t in text.split(",")]


JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]
ThreadsOpt = Annotated[Optional[int], typer.Option(help="Intra-op threads (default: physical cores).")]  # noqa: UP045
WindowOpt = Annotated[int, typer.Option(help="Tokens per window.")]
NoVerifyOpt = Annotated[bool, typer.Option(
    "--no-verify", help="Skip the sha256 and NaN/Inf checks of the export (sizes are still checked).",
)]


def _load_checks(model: Path, verify: bool) -> Manifest:
    """Read and check an export folder as Model.load does, without a session; returns its manifest."""
    from parscale.runtime.export_folder import ExportFolder

    return ExportFolder.check(model, verify=verify)


@app.command()
def generate(
    model: RuntimeModelArg,
    prompt: Annotated[Optional[str], typer.Option(help="Prompt text.")] = None,  # noqa: UP045
    prompt_ids: Annotated[Optional[str], typer.Option("--prompt-ids", help="Prompt as token ids: 1,2,3.")] = None,  # noqa: UP045
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 64,
    greedy: Annotated[bool, typer.Option("--greedy", help="Always take the most likely token (default).")] = False,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 (or below 1e-3) = greedy.")] = 0.0,
    top_k: Annotated[int, typer.Option(help="Sample from the k most likely tokens (0 = all).")] = 0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass (1 = off).")] = 1.0,
    repetition_penalty: Annotated[float, typer.Option(help="> 1 discourages repeats (1 = off; 0.01 to 100).")] = 1.0,
    seed: Annotated[Optional[int], typer.Option(help="Random seed for sampling.")] = None,  # noqa: UP045
    stop: Annotated[Optional[list[str]], typer.Option(help="Stop string (repeatable).")] = None,  # noqa: UP045
    provider: ProviderOpt = "auto",
    threads: ThreadsOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of streaming.")] = False,
    P: Annotated[Optional[int], typer.Option(  # noqa: N803, UP045
        "--P", help="Streams, for a multi-P export (default: its largest).")] = None,
    spin: SpinOpt = None,
    no_verify: NoVerifyOpt = False,
) -> None:
    """Generate text from an export, streaming it to the terminal."""
    import json

    from parscale.args import check_seed, check_threads
    from parscale.runtime import Model

    if (prompt is None) == (prompt_ids is None):
        raise ParScaleError("pass exactly one of --prompt and --prompt-ids")
    ids = _parse_ids(prompt_ids) if prompt_ids is not None else None
    check_seed(seed)
    m = Model.load(model, provider=provider, threads=check_threads(threads), verify=not no_verify, spin=spin)
    m.check_streams(P)
    options = dict(max_new_tokens=max_new_tokens, greedy=greedy, temperature=temperature, top_k=top_k,
                   top_p=top_p, repetition_penalty=repetition_penalty, seed=seed, stop=stop or None, P=P)
    if as_json or m.tokenizer is None:
        r = m.generate(prompt, prompt_ids=ids, **options)
        if as_json:
            print(json.dumps({**r.as_dict(), "model": str(model), "P": P or m.P, "provider": m.provider}))
        else:
            print(",".join(map(str, r.generated_ids)))
    else:
        for event in m.stream_tokens(prompt, prompt_ids=ids, **options):
            if event.text:
                sys.stdout.write(event.text)
                sys.stdout.flush()
            if event.result is not None:
                r = event.result
        sys.stdout.write("\n")
    if not as_json:
        t = r.timings
        at = f" at P={P or m.P}" if len(m.streams) > 1 else ""  # a multi-P export: say which P ran
        err.print(f"[dim]{len(r.generated_ids)} tokens{at}, finish: {r.finish_reason}; first token "
                  f"{1000 * t.time_to_first_token_s:.0f} ms, prefill {t.prefill_tokens_per_s:,.1f} tok/s, "
                  f"decode {_ms(t.decode_ms_per_token, 1)}[/]")


@app.command()
def bench(
    model: RuntimeModelArg,
    prompt_len: Annotated[int, typer.Option(help="Prompt tokens (random ids).")] = 128,
    gen: Annotated[int, typer.Option(help="Tokens to generate.")] = 64,
    threads: ThreadsOpt = None,
    provider: ProviderOpt = "auto",
    batch: Annotated[int, typer.Option(help="Prompts generated together (decode ms/token is then one step).")] = 1,
    P: Annotated[Optional[str], typer.Option("--P", help=(  # noqa: N803, UP045
        "Streams to measure, in ascending order, from one process: e.g. 1,2,4,8 for a multi-P export "
        "(default: its largest)."
    ))] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (a list of them with --P).")] = False,
    spin: SpinOpt = None,
    no_verify: NoVerifyOpt = False,
) -> None:
    """Measure prefill tok/s, decode ms/token, time to first token and peak RSS (greedy; batch 1 by default)."""
    import json

    from parscale.runtime.bench import bench_streams

    results = bench_streams(model, Streams.parse(P) if P is not None else None, prompt_len=prompt_len, gen=gen,
                            threads=threads, provider=provider, verify=not no_verify, batch=batch, spin=spin)
    if as_json:
        print(json.dumps(results[0].as_dict() if P is None else [r.as_dict() for r in results]))
        return
    r = results[0]
    out.print(f"{r.model}: {r.dtype}, quantization {r.quantization}, {r.provider}, "
              f"threads {r.threads or 'default'}, batch {r.batch}, prompt {r.prompt_len}, {r.gen} new tokens; "
              f"load {r.load_s:.2f} s")
    for r in results:
        out.print(f"P={r.P}")
        out.print(f"  time to first token  {1000 * r.time_to_first_token_s:10.1f} ms")
        out.print(f"  prefill              {r.prefill_tokens_per_s:10.1f} tok/s")
        out.print(f"  decode               {_ms(r.decode_ms_per_token, 2, 10)}")
        out.print(f"  peak RSS generating  {r.generate_peak_rss_mb:10.1f} MB (process peak {r.peak_rss_mb:,.1f} MB)")
        out.print(f"  files + KV cache     {r.files_mb + r.kv_cache_mb:10.1f} MB (ratio {r.rss_ratio:.2f})")


def _ms(value: float | None, digits: int, width: int = 0) -> str:
    """A decode time per token, or "n/a" when no decode step ran (one new token)."""
    if value is None:
        return f"{'n/a':>{width}} (one new token: no decode step to time)"
    return f"{value:{width}.{digits}f} ms/token"


@app.command()
def serve(
    model: RuntimeModelArg,
    host: Annotated[str, typer.Option(help="Address to listen on (default loopback; 0.0.0.0: all).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free one).")] = 8000,
    threads: ThreadsOpt = None,
    max_batch: Annotated[int, typer.Option(help="Requests decoded together at most (per P).")] = 8,
    max_queue: Annotated[int, typer.Option(help="Requests waiting at most; more are answered 503.")] = 64,
    api_key: Annotated[Optional[str], typer.Option(  # noqa: UP045
        envvar="PARSCALE_API_KEY", help="Require 'Authorization: Bearer KEY' (or set PARSCALE_API_KEY).")] = None,
    name: Annotated[Optional[str], typer.Option(help="Model name clients use (default: the folder's name).")] = None,  # noqa: UP045
    chat_template: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="Jinja2 chat template file (default: the export's tokenizer_config.json chat_template).")] = None,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body accepted (413 beyond).")] = 1 << 20,
    shutdown_timeout: Annotated[float, typer.Option(
        help="On SIGTERM/Ctrl-C, seconds running requests may finish before they are cancelled.")] = 10.0,
    provider: ProviderOpt = "auto",
    ray: Annotated[bool, typer.Option("--ray", help="Deploy on Ray Serve (needs ray[serve]) instead.")] = False,
    replicas: Annotated[int, typer.Option(help="With --ray: replicas, each holding the model.")] = 2,
    ray_address: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="With --ray: a running cluster's address (default: start a local one).")] = None,
    no_verify: NoVerifyOpt = False,
) -> None:
    """Serve an export over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models)."""
    from parscale.args import check_float, check_int, check_threads

    check_int(port, "--port", minimum=0, maximum=65535)
    check_int(max_batch, "--max-batch", minimum=1, maximum=256)
    check_int(max_queue, "--max-queue", minimum=1)
    check_int(max_body_bytes, "--max-body-bytes", minimum=1024)
    check_int(replicas, "--replicas", minimum=1)
    check_float(shutdown_timeout, "--shutdown-timeout", minimum=0, maximum=3600)
    if api_key is not None and not api_key:
        raise ParScaleError("--api-key is empty: give a key, or leave the option out")
    if ray:
        if provider not in ("auto", "cpu"):
            raise ParScaleError(f"--ray runs its replicas on the CPU; --provider {provider} is not supported with it")
        _load_checks(model, not no_verify)  # a clear error before a cluster starts (replicas load it again)
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        err.print(f"[yellow]warning:[/] listening on {host} without --api-key: anyone who can reach it may use it")
    options = dict(max_batch=max_batch, max_queue=max_queue, api_key=api_key, name=name, chat_template=chat_template,
                   max_body_bytes=max_body_bytes, verify=not no_verify)

    def ready(url: str, app: object = None) -> None:
        names = getattr(getattr(app, "state", None), "names", None)
        models = f" as {', '.join(names.ids())}" if names is not None else ""
        out.print(f"serving {model}{models} on {url}/v1 (Ctrl-C to stop)", markup=False)

    try:
        if ray:
            from parscale.serve.ray_app import run as run_ray
        else:
            from parscale.serve.app import serve as run_server
    except ImportError as e:
        extra = "serve-ray" if ray else "serve"
        raise ParScaleError(f"parscale serve needs the {extra} extra ({e.name} is missing): "
                            f"pip install 'parscale[{extra}]'") from None
    if ray:
        run_ray(model, host=host, port=port, replicas=replicas, threads=check_threads(threads) or 1,
                address=ray_address, shutdown_timeout=shutdown_timeout, on_ready=ready, **options)
    else:
        run_server(model, host=host, port=port, threads=check_threads(threads), provider=provider,
                   shutdown_timeout=shutdown_timeout, on_ready=ready, **options)


@app.command()
def inspect(model: RuntimeModelArg, no_verify: NoVerifyOpt = False) -> None:
    """Print an export's manifest: P, dtype, quantization, sizes and graph inputs/outputs."""
    m = _load_checks(model, not no_verify)
    info = m.model
    out.print(f"{model}: parscale export (format {m.format_version}, tool {m.tool.get('version', '?')})")
    streams = f" (default; serves P = {', '.join(map(str, m.streams))})" if len(m.streams) > 1 else ""
    out.print(f"  P={info.P}{streams}  prefix tokens {info.prefix_tokens}  dtype {m.dtype}  "
              f"quantization {m.quantization}  opset {m.opset}")
    for key in ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads",
                "num_key_value_heads", "cache_heads", "head_dim", "vocab_size", "max_position_embeddings",
                "tie_word_embeddings"):
        out.print(f"  {key:24s} {getattr(info, key)}")
    out.print(f"  files ({_mb(m.total_bytes)}):")
    for name, f in m.files.items():
        out.print(f"    {name:28s} {_mb(f.bytes):>12s}")
    axes = m.io.get("axes", {})
    io = m.io
    for kind in ("inputs", "outputs"):
        names = io.get(kind, [])
        shown = [n for n in names if all(i == "0" for i in re.findall(r"\.(\d+)\.", n))]  # layer 0 stands for all
        out.print(f"  {kind}: {len(names)}")
        for n in shown:
            out.print(f"    {n:32s} {axes.get(n)}")
        if len(shown) < len(names):
            out.print(f"    ... and the other layers' {kind[:-1]}s alike")
    if isinstance(m.web, dict):
        problems = "; ".join(m.web.get("problems") or [])
        out.print("  browser (`parscale web`): " + ("runs" if m.web.get("runs") else f"cannot run: {problems}"))
        for warning in m.web.get("warnings") or []:
            out.print(f"    warning: {warning}")
    v = m.validation
    if v is not None and isinstance(v.get("max_abs_logit_diff"), (int, float)):
        out.print(f"  validation: max |logit diff| {v['max_abs_logit_diff']:.2e}, "
                  f"greedy match {v.get('greedy_match')}")



@app.command()
def web(
    model: RuntimeModelArg,
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (0 picks a free one).")] = 8080,
    web_dir: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        "--web-dir", help="The page's folder (default: web/ of this source checkout, after `make web`).")] = None,
    log: Annotated[bool, typer.Option("--log", help="Print one line per request.")] = False,
) -> None:
    """Serve the in-browser page and an export on 127.0.0.1: onnxruntime-web runs it (WebGPU, else WASM)."""
    from parscale.browser import web_server

    printer = (lambda line: err.print(line, markup=False)) if log else None
    server = web_server(model, port=port, web_dir=web_dir, log=printer)
    out.print(f"serving {model} at {server.url} (Ctrl-C to stop)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        out.print("stopped")
    finally:
        server.close()

if __name__ == "__main__":
    main()
