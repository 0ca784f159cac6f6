"""The commands that make and measure models: init, export, compare, train, train-heads, eval."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from parscale.cli.options import (
    DEFAULT_MODEL,
    IDS,
    JsonOpt,
    ModelArg,
    NoVerifyOpt,
    ThreadsOpt,
    WindowOpt,
    megabytes,
    out,
    peak_rss_mb,
    stage_printer,
)
from parscale.config import Streams
from parscale.errors import ParScaleError


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
    out.print(f"wrote {path} ({preset}, P={P}, {dtype}, {megabytes(size)})")


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
                            check_memory=not force_memory, log=stage_printer(verbose))
    m = result.manifest
    out.print(f"exported {result.out}: P={','.join(map(str, m.streams))}, {m.dtype}, {megabytes(result.total_bytes)}")
    if verbose:
        for name, info in m.files.items():
            out.print(f"  {name:28s} {megabytes(info.bytes):>12s}")
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
    out.print(f"peak RSS {peak_rss_mb():,.0f} MB")


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
                           backbone_out=backbone_out, log=stage_printer(False))
    out.print(f"held-out loss (nats/token, {report.held_out_tokens} tokens): P=1 backbone "
              f"{report.held_out_loss_p1:.4f}, P={report.recipe['P']} {report.held_out_loss_pn:.4f}; "
              f"{report.checkpoint_bytes / 1e6:.1f} MB in {report.total_seconds:.0f} s -> {out_dir}")


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

    results = run(model, Streams.parse(P), steps=steps, threads=threads, log=stage_printer(verbose), force=force)
    for p, r in results.items():
        out.print(f"P={p}: held-out loss {r['held_out_loss']:.4f} nats/token (from {r['held_out_loss_init']:.4f}); "
                  f"{r['file']} {megabytes(r['bytes'])} in {r['stage2']['seconds']:.0f} s")


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
