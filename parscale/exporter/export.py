"""`parscale export`: checkpoint folder -> validated ONNX export folder, written atomically."""

from __future__ import annotations

import enum
import itertools
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch

from parscale import __version__, contract
from parscale.atomic import AtomicFolder, check_destination, foreign_in_export
from parscale.config import ParScaleConfig
from parscale.errors import ParScaleError
from parscale.exporter import folder
from parscale.exporter.calibrate import input_hessians, sample_with_hessians, text_windows
from parscale.exporter.checkpoint import load_model, source_checksum
from parscale.exporter.extras import write_extras
from parscale.exporter.quantize import QuantReport, QuantScheme, quantize_graph
from parscale.exporter.trace import trace_to_onnx
from parscale.exporter.validate import ValidationReport, compare, cpu_session
from parscale.fidelity import Fidelity, compare_sessions, random_tokens, text_tokens
from parscale.manifest import FORMAT, FORMAT_VERSION, MANIFEST, MODEL_FILE, describe_files

EXTERNAL_DATA = MODEL_FILE + ".data"
# Above this many weight bytes the weights go to EXTERNAL_DATA: protobuf cannot hold 2 GB, and
# ONNX Runtime maps external data instead of copying it out of a parsed protobuf.
EXTERNAL_DATA_THRESHOLD = 64 << 20


class Dtype(str, enum.Enum):
    """Floating-point type of the graph's weights, activations and KV cache."""

    fp32 = "fp32"
    fp16 = "fp16"

    @property
    def torch(self) -> torch.dtype:
        return {"fp32": torch.float32, "fp16": torch.float16}[self.value]


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
    log: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export a checkpoint folder to `out`; nothing is left at `out` if any step fails.

    `quantize`: weight-only quantization (see `parscale.exporter.quantize`). Validation then checks
    the float graph against PyTorch as usual, and measures the quantized graph against the float
    graph (top-1 agreement, KL; perplexity too on `eval_text`, a UTF-8 file, else random tokens).
    GPTQ (the int4 default) calibrates on `calibration_text`, else on text sampled from the model.
    `ort_format`: also write model.ort and required_operators.config (ONNX Runtime Mobile).
    Every export also gets transformers_js_config.json and a model card, README.md (extras.py).
    """
    model_dir, out = Path(model_dir), Path(out)
    log = log or (lambda _msg: None)
    # Refused early (before loading anything), and again under the lock when the folder is swapped in.
    check_destination(out, force=force, is_replaceable=foreign_in_export, protect=(model_dir,))
    dtype = Dtype(dtype)
    seconds: dict[str, float] = {}

    def stage(name: str) -> None:
        seconds[name] = time.perf_counter()
        log(name)

    stage("reading checkpoint")
    cfg = ParScaleConfig.load(model_dir) if model_dir.is_dir() else None
    if cfg is not None and P is not None and P != cfg.P:
        raise ParScaleError(
            f"--P {P} does not match the checkpoint, which was trained with parscale_n={cfg.P}; "
            f"pass --P {cfg.P} (or omit --P)"
        )
    cfg, model = load_model(model_dir, dtype.torch)
    checksum = source_checksum(model_dir)

    destination = AtomicFolder(out, force=force, is_replaceable=foreign_in_export, protect=(model_dir,), log=log)
    tmp = destination.open()  # .NAME.partial-<pid>-<random> beside OUT, under a lock on OUT
    # A quantized export is validated through its float graph, written here and never kept.
    float_dir = tmp.with_name(tmp.name + "-float") if quantize is not None and validate else tmp
    qreport, fidelity = None, None
    float32_module: list = []  # loaded at most once, and only when the export is not float32 itself

    def float32_reference():  # type: ignore[no-untyped-def]
        if dtype is Dtype.fp32:
            return model
        if not float32_module:
            float32_module.append(load_model(model_dir, torch.float32)[1])
        return float32_module[0]

    try:
        stage("tracing to ONNX")
        proto = trace_to_onnx(model, dtype=dtype.torch, opset=opset)

        manifest = _manifest(cfg, dtype, opset, checksum, model_dir)
        if float_dir != tmp:
            stage("writing the float model (validation only)")
            float_dir.mkdir()
            _write_model(proto, float_dir, manifest)
        if quantize is not None:
            hessians, calibration = None, None
            if quantize.method == "gptq":
                stage("calibrating (GPTQ input statistics)")
                hessians, calibration = _calibrate(float32_reference(), model_dir, cfg, calibration_text)
            stage("quantizing")
            qreport = quantize_graph(proto, quantize, cfg.num_hidden_layers, hessians)
            qreport.calibration = calibration
            del hessians
            manifest["quantization"] = qreport.to_dict()
        stage("writing model")
        _write_model(proto, tmp, manifest)
        del proto
        folder.copy_source_files(model_dir, tmp)
        eos = folder.eos_ids(model_dir, cfg)
        genai = folder.genai_config(cfg, eos, context_length=cfg.max_position_embeddings)
        (tmp / "genai_config.json").write_text(json.dumps(genai, indent=2) + "\n")

        report = None
        if validate:
            stage("validating on CPU against PyTorch")
            # The float32 module is the reference, whatever the export's dtype.
            reference = float32_reference()
            report = compare(cpu_session(float_dir / MODEL_FILE), reference, tolerance=TOLERANCE[dtype])
            manifest["validation"] = {
                "max_abs_logit_diff": report.max_abs_diff, "greedy_match": report.greedy_match,
                "decode_steps": report.steps, "tolerance": report.tolerance,
            }
            if not report.ok:
                raise ParScaleError(
                    f"validation failed: max |logit difference| {report.max_abs_diff:.3g} "
                    f"(tolerance {report.tolerance:g}), greedy tokens match: {report.greedy_match}"
                )
            if quantize is not None:
                del reference, model  # the float sessions below need the memory more
                float32_module.clear()
                stage("measuring fidelity against the float graph")
                fidelity = _fidelity(float_dir, tmp, model_dir, cfg.vocab_size, eval_text)
                manifest["validation"]["fidelity"] = fidelity.to_dict()
        # Files for other runtimes and the model card: last, so the card can describe everything.
        write_extras(tmp, cfg, eos, manifest, out.name, ort_format=ort_format, stage=stage)
        for path in tmp.iterdir():
            path.chmod(0o644)  # some writers create private files; an export is ordinary data
        manifest["files"] = describe_files(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        destination.commit()
    finally:
        destination.close()
        shutil.rmtree(float_dir, ignore_errors=True)
    stage("done")
    names = list(seconds)
    durations = {a: seconds[b] - seconds[a] for a, b in itertools.pairwise(names)}
    return ExportResult(out=out, manifest=manifest, validation=report, seconds=durations,
                        quantization=qreport, fidelity=fidelity)


def _calibrate(
    model: Any, model_dir: Path, cfg: ParScaleConfig, text: str | Path | None,
) -> tuple[dict[str, Any], str]:
    """GPTQ's input statistics, and where they came from: windows of a text file, or model samples."""
    if text is not None:
        tokens = text_windows(model_dir, text)
        return input_hessians(model, tokens), f"text {Path(text).name}: {tokens.shape[0]} x {tokens.shape[1]} tokens"
    start = cfg.bos_token_id if cfg.bos_token_id is not None else (cfg.eos_ids() or [0])[0]
    tokens, hessians = sample_with_hessians(model, start_id=start)
    return hessians, f"sampled from the float model: {tokens.shape[0]} x {tokens.shape[1]} tokens (seed 0)"


# Text windows (x 128 tokens) scored after a quantized export; `parscale compare --windows 0` does a whole text.
EVAL_WINDOWS = 64


def _fidelity(float_dir: Path, quant_dir: Path, model_dir: Path, vocab: int, text: str | Path | None) -> Fidelity:
    """The quantized graph against the float one, on a text file's tokens or on random tokens."""
    if text is not None:
        tokens, source = text_tokens(model_dir, text), f"text {Path(text).name}"
    else:
        tokens, source = random_tokens(vocab, 4 * 128, seed=0), "random tokens (seed 0)"
    return compare_sessions(
        cpu_session(float_dir / MODEL_FILE), cpu_session(quant_dir / MODEL_FILE), tokens,
        window=128, max_windows=EVAL_WINDOWS if text is not None else 4, source=source, text=text is not None,
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


def _write_model(proto: onnx.ModelProto, out: Path, manifest: dict[str, Any]) -> None:
    """Save with the manifest (less file list) as metadata; large weights as external data."""
    meta = {k: v for k, v in manifest.items() if k not in ("files", "validation")}
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, {"parscale": json.dumps(meta)})
    weight_bytes = sum(t.ByteSize() for t in proto.graph.initializer)
    external = weight_bytes > EXTERNAL_DATA_THRESHOLD
    onnx.save_model(
        proto, out / MODEL_FILE, save_as_external_data=external, all_tensors_to_one_file=True,
        location=EXTERNAL_DATA, size_threshold=1024,
    )
