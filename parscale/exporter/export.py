"""`parscale export`: checkpoint folder -> validated ONNX export folder, written atomically."""

from __future__ import annotations

import contextlib
import enum
import itertools
import json
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from parscale import __version__, contract
from parscale.atomic import AtomicFolder, check_destination, foreign_in_export
from parscale.config import ParScaleConfig
from parscale.errors import ParScaleError
from parscale.exporter import budget, folder
from parscale.exporter.calibrate import LayerwiseHessians, calibration_tokens, text_windows
from parscale.exporter.extras import write_extras
from parscale.exporter.graphfile import (
    EXTERNAL_DATA_THRESHOLD,
    load_external,
    rewrite_structure,
    save_graph,
    set_metadata,
)
from parscale.exporter.quantize import QuantReport, QuantScheme, quantize_graph
from parscale.exporter.trace import trace_to_folder
from parscale.exporter.validate import ValidationReport, check_graph, reference_run
from parscale.fidelity import Fidelity, compare_sessions, cpu_session, random_tokens, text_tokens
from parscale.manifest import FORMAT, FORMAT_VERSION, MANIFEST, MODEL_FILE, describe_files
from parscale.modeling.checkpoint import load_model, release, source_checksum
from parscale.runtime.memory import limit_malloc_retention


class Dtype(str, enum.Enum):
    """Floating-point type of the graph's weights, activations and KV cache."""

    fp32 = "fp32"
    fp16 = "fp16"

    @property
    def torch(self) -> torch.dtype:
        return {"fp32": torch.float32, "fp16": torch.float16}[self.value]


MIN_OPSET = 18  # the oldest opset torch.onnx's exporter writes

TOLERANCE = {Dtype.fp32: 1e-3, Dtype.fp16: 5e-2}


@dataclass
class ExportResult:
    """What `export` wrote and measured."""

    out: Path
    manifest: dict[str, Any]
    validation: ValidationReport | None
    seconds: dict[str, float] = field(default_factory=dict)
    quantization: QuantReport | None = None
    fidelity: Fidelity | None = None  # a quantized export against its float graph

    @property
    def total_bytes(self) -> int:
        return sum(f["bytes"] for f in self.manifest["files"].values())


def export(
    model_dir: str | Path,
    out: str | Path,
    *,
    P: int | None = None,  # noqa: N803
    dtype: Dtype = Dtype.fp32,
    opset: int = 18,
    force: bool = False,
    validate: bool = True,
    quantize: QuantScheme | None = None,
    eval_text: str | Path | None = None,
    calibration_text: str | Path | None = None,
    ort_format: bool = False,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    check_memory: bool = True,
    log: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export a checkpoint folder to `out`; nothing is left at `out` if any step fails.

    `quantize`: weight-only quantization (see `parscale.exporter.quantize`). Validation then checks
    the float graph against PyTorch as usual, and measures the quantized graph against the float
    graph (top-1 agreement, KL; perplexity too on `eval_text`, a UTF-8 file, else random tokens).
    GPTQ (the int4 default) calibrates on `calibration_text`, else on text sampled from the model.
    `ort_format`: also write model.ort and required_operators.config (ONNX Runtime Mobile).
    `external_data_threshold`: weight bytes above which the weights go to `model.onnx.data`.
    `check_memory`: refuse, before any work, a job whose estimated peak memory exceeds what the
    machine has available (`parscale.exporter.budget`).
    Every export also gets transformers_js_config.json and a model card, README.md (extras.py).

    The stages run so that at most one copy of the weights is in memory at a time: the module is
    traced straight to disk, quantized tensor by tensor from there (GPTQ statistics one layer at
    a time), and compared with ONNX Runtime only after it is gone (its logits are kept instead).
    An unexpected error is raised as `StageError`, naming the stage it happened in.
    """
    model_dir, out = Path(model_dir), Path(out)
    log = log or (lambda _msg: None)
    # Refused early (before loading anything), and again under the lock when the folder is swapped in.
    check_destination(out, force=force, is_replaceable=foreign_in_export, protect=(model_dir,))
    dtype = Dtype(dtype)
    limit_malloc_retention()  # freed weights go back to the system instead of staying in the heap
    seconds: dict[str, float] = {}

    def stage(name: str) -> None:
        seconds[name] = time.perf_counter()
        log(name)

    stage("reading checkpoint")
    if not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise ParScaleError(f"--opset must be between {MIN_OPSET} and {onnx.defs.onnx_opset_version()}, got {opset}")
    cfg = ParScaleConfig.load(model_dir) if model_dir.is_dir() else None
    if cfg is not None and P is not None and P != cfg.P:
        raise ParScaleError(
            f"--P {P} does not match the checkpoint, which was trained with parscale_n={cfg.P}; "
            f"pass --P {cfg.P} (or omit --P)"
        )
    if cfg is None:
        raise ParScaleError(f"model folder {model_dir} does not exist")
    eos = folder.eos_ids(model_dir, cfg)  # a malformed generation_config.json fails now, not after tracing
    # Text files are read and tokenized now too (a few ms): a missing file or tokenizer is not
    # found minutes later, after tracing.
    if eval_text is not None:
        text_tokens(model_dir, eval_text)
    if calibration_text is not None:
        text_windows(model_dir, calibration_text)
    plan = budget.plan(cfg, dtype=dtype.value, quantize=quantize, validate=validate)
    if ort_format and plan.output_bytes > budget.ORT_FORMAT_LIMIT:
        raise ParScaleError(
            f"--ort-format: this export's graph would hold {plan.output_bytes / 1e9:.2f} GB of weights, and an ORT "
            f"format file cannot exceed {budget.ORT_FORMAT_LIMIT / 2**30:.0f} GiB (a flatbuffer limit); "
            "quantize (--int4) or drop --ort-format"
        )
    if check_memory:
        budget.check(plan)
    checksum = source_checksum(model_dir)

    destination = AtomicFolder(out, force=force, is_replaceable=foreign_in_export, protect=(model_dir,), log=log)
    tmp = destination.open()  # .NAME.partial-<pid>-<random> beside OUT, under a lock on OUT
    # A quantized export is made from its float graph, written inside the partial folder and never kept.
    float_dir = tmp / ".float" if quantize is not None else tmp
    qreport, fidelity, report = None, None, None
    try:
        with _stage_errors(seconds):
            manifest = _manifest(cfg, dtype, opset, checksum, model_dir)
            gptq = quantize is not None and quantize.method == "gptq"
            if gptq:  # first: sampling loads the checkpoint on its own (in bfloat16 where it is stored so)
                stage("calibrating (GPTQ calibration tokens)")
                tokens, qcalibration = calibration_tokens(model_dir, calibration_text)
            stage("loading weights")
            _, model = load_model(model_dir, dtype.torch)
            stage("tracing to ONNX")
            float_dir.mkdir(exist_ok=True)
            trace_to_folder(model, float_dir, dtype=dtype.torch, opset=opset,
                            external_threshold=external_data_threshold)
            if dtype is not Dtype.fp32:
                release(model)
                model = None
                if validate or gptq:  # the float32 module is the reference and calibrates GPTQ
                    stage("loading float32 weights")
                    _, model = load_model(model_dir, torch.float32)
            reference = None
            if validate:
                stage("running the PyTorch reference")
                reference = reference_run(model)
            if not gptq and model is not None:
                release(model)  # round-to-nearest reads the weights from the traced graph
                model = None
            if quantize is not None:
                hessians = None
                if gptq:
                    hessians = LayerwiseHessians(model, tokens, consume=True)
                stage("quantizing")
                proto = onnx.load(str(float_dir / MODEL_FILE), load_external_data=False)
                qreport = quantize_graph(proto, quantize, cfg.num_hidden_layers, hessians, base_dir=float_dir,
                                         progress=lambda msg: log("  " + msg))
                qreport.calibration = qcalibration if gptq else None
                manifest["quantization"] = qreport.to_dict()
                del hessians
            if model is not None:
                release(model)  # the module's memory goes back before ONNX Runtime needs its own
            model = None
            stage("writing model")
            meta = {k: v for k, v in manifest.items() if k not in ("files", "validation")}
            if quantize is not None:
                load_external(proto, float_dir)  # the float tensors left (norms, biases, prefixes, mixing)
                set_metadata(proto, meta)
                save_graph(proto, tmp, external_threshold=external_data_threshold)
                del proto
            else:
                rewrite_structure(tmp, meta)
            folder.copy_source_files(model_dir, tmp)
            genai = folder.genai_config(cfg, eos, context_length=cfg.max_position_embeddings)
            (tmp / "genai_config.json").write_text(json.dumps(genai, indent=2) + "\n")

            if reference is not None:
                stage("validating on CPU against PyTorch")
                float_session = [cpu_session(float_dir / MODEL_FILE, prepack=False)]
                report = check_graph(float_session[0], reference, tolerance=TOLERANCE[dtype])
                manifest["validation"] = {
                    "max_abs_logit_diff": report.max_abs_diff, "greedy_match": report.greedy_match,
                    "decode_steps": report.steps, "tolerance": report.tolerance,
                }
                if not report.ok:
                    raise ParScaleError(_validation_failure(report))
                if quantize is not None:
                    stage("measuring fidelity against the float graph")
                    fidelity = _fidelity(float_session.pop, tmp, model_dir, cfg.vocab_size, eval_text)
                    manifest["validation"]["fidelity"] = fidelity.to_dict()
                float_session.clear()
            if float_dir != tmp:
                shutil.rmtree(float_dir)  # before the extras: they and the manifest describe the folder
            # Files for other runtimes and the model card: last, so the card can describe everything.
            stage("writing files for other runtimes and the model card")
            write_extras(tmp, cfg, eos, manifest, out.name, ort_format=ort_format, stage=stage)
            for path in tmp.iterdir():
                path.chmod(0o644)  # some writers create private files; an export is ordinary data
            manifest["files"] = describe_files(tmp)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        destination.commit()
    finally:
        destination.close()
    stage("done")
    names = list(seconds)
    durations = {a: seconds[b] - seconds[a] for a, b in itertools.pairwise(names)}
    return ExportResult(out=out, manifest=manifest, validation=report, seconds=durations,
                        quantization=qreport, fidelity=fidelity)


class StageError(ParScaleError):
    """An unexpected error inside an export stage; `__cause__` is the original exception."""

    def __init__(self, stage: str, cause: BaseException) -> None:
        detail = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        super().__init__(f"{stage}: {type(cause).__name__}" + (f": {detail}" if detail else ""))
        self.stage = stage


@contextlib.contextmanager
def _stage_errors(seconds: dict[str, float]) -> Iterator[None]:
    """Re-raise anything but a ParScaleError as a StageError naming the stage that was running."""
    try:
        yield
    except (ParScaleError, KeyboardInterrupt):
        raise
    except MemoryError as e:
        raise StageError(next(reversed(seconds)), MemoryError("out of memory")) from e
    except Exception as e:
        raise StageError(next(reversed(seconds)), e) from e


def _validation_failure(report: ValidationReport) -> str:
    if not np.isfinite(report.max_abs_diff):
        return ("validation failed: the graph's logits are not finite (NaN or Inf) where PyTorch's are "
                "compared; the export is not usable")
    return (f"validation failed: max |logit difference| {report.max_abs_diff:.3g} "
            f"(tolerance {report.tolerance:g}), greedy tokens match: {report.greedy_match}")


# Text windows (x 128 tokens) scored after a quantized export; `parscale compare --windows 0` does a whole text.
EVAL_WINDOWS = 64


def _fidelity(
    open_float: Callable[[], Any], quant_dir: Path, model_dir: Path, vocab: int, text: str | Path | None,
) -> Fidelity:
    """The quantized graph against the float one, on a text file's tokens or on random tokens."""
    if text is not None:
        tokens, source = text_tokens(model_dir, text), f"text {Path(text).name}"
    else:
        tokens, source = random_tokens(vocab, 4 * 128, seed=0), "random tokens (seed 0)"
    return compare_sessions(
        open_float, lambda: cpu_session(quant_dir / MODEL_FILE), tokens,
        window=128, max_windows=EVAL_WINDOWS if text is not None else 4, source=source, text=text is not None,
        batch=1,  # one window at a time: a (4, 128, 151936) batch of logits alone is 311 MB
    )


def _manifest(cfg: ParScaleConfig, dtype: Dtype, opset: int, checksum: str, model_dir: Path) -> dict:
    n = cfg.num_hidden_layers
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tool": {"name": "parscale", "version": __version__},
        "model": {
            "model_type": cfg.model_type, "P": cfg.P, "prefix_tokens": cfg.n_prefix,
            "num_hidden_layers": n, "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads, "cache_heads": cfg.cache_heads,
            "head_dim": cfg.head_dim, "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
            "max_position_embeddings": cfg.max_position_embeddings,
            "tie_word_embeddings": cfg.tie_word_embeddings,
        },
        "dtype": dtype.value,
        "opset": opset,
        "quantization": None,
        "io": {"inputs": contract.input_names(n), "outputs": contract.output_names(n),
               "axes": contract.axes(n)},
        "source": {"name": model_dir.resolve().name, "sha256": checksum},
    }
