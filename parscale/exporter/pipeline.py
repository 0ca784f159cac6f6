"""`parscale export`: checkpoint folder -> validated ONNX export folder, written atomically."""

from __future__ import annotations

import contextlib
import enum
import itertools
import json
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from parscale import __version__, contract
from parscale.atomic import atomic_folder, check_destination, foreign_in_export
from parscale.config import ParScaleConfig, Streams
from parscale.errors import ParScaleError
from parscale.exporter import budget
from parscale.exporter.browser import browser_support
from parscale.exporter.export_checks import validate_graphs, validation_record
from parscale.exporter.files.genai import write_genai_configs
from parscale.exporter.files.runtimes_and_card import write_runtime_files_and_card
from parscale.exporter.files.sources import check_sources, copy_source_files
from parscale.exporter.graph.decoder import build_decoder, check_supported
from parscale.exporter.graphfile import (
    EXTERNAL_DATA_THRESHOLD,
    graph_metadata,
    load_external,
    rewrite_structure,
    save_graph,
    set_metadata,
)
from parscale.exporter.quant.calibrate import LayerwiseHessians, calibration_tokens, text_windows
from parscale.exporter.quant.policy import NBITS_KERNEL, QuantReport, QuantScheme
from parscale.exporter.quant.rewrite import quantize_graph
from parscale.exporter.torch_reference import ValidationReport, reference_run
from parscale.fidelity import Fidelity, text_tokens
from parscale.manifest import (
    FORMAT_VERSION,
    MANIFEST,
    MODEL_FILE,
    Manifest,
    ModelInfo,
    describe_files,
)
from parscale.modeling.checkpoint import release
from parscale.modeling.heads import Stream, load_streams, resolve_streams, streams_checksum
from parscale.modeling.model import ParScaleForCausalLM
from parscale.runtime.memory import limit_malloc_retention
from parscale.text import load_eos_ids


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
    """What `export` wrote and measured; `validation` and `fidelity` are those of the manifest's P (the
    largest), `validations` and `fidelities` hold every P of a multi-P export."""

    out: Path
    manifest: Manifest
    validations: dict[int, ValidationReport] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    quantization: QuantReport | None = None
    fidelities: dict[int, Fidelity] = field(default_factory=dict)  # a quantized export against its float graph

    @property
    def total_bytes(self) -> int:
        return self.manifest.total_bytes

    @property
    def validation(self) -> ValidationReport | None:
        return self.validations.get(self.manifest.model.P)

    @property
    def fidelity(self) -> Fidelity | None:
        return self.fidelities.get(self.manifest.model.P)


def export(
    model_dir: str | Path | Sequence[str | Path],
    out: str | Path,
    *,
    P: Streams | int | Sequence[int] | None = None,  # noqa: N803
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

    `P`: the stream counts to export (a `Streams`, or what `Streams.parse` takes; default: the
    checkpoint's parscale_n), from the checkpoint or its head sets (`parscale.modeling.heads`);
    several P (or several checkpoint folders with one frozen backbone, each at its own P) make a
    multi-P export: one graph serving every P, whose backbone is stored, quantized and loaded once
    (graph/decoder.py). Each P is validated against its own PyTorch module.

    `quantize`: weight-only quantization (see `parscale.exporter.quant.policy`). Validation then checks
    the float graph against PyTorch as usual, and measures the quantized graph against the float
    graph (top-1 agreement, KL; perplexity too on `eval_text`, a UTF-8 file, else random tokens).
    GPTQ (the int4 default) calibrates on `calibration_text`, else on text sampled from the model.
    `ort_format`: also write model.ort and required_operators.config (ONNX Runtime Mobile).
    `external_data_threshold`: weight bytes above which the weights go to `model.onnx.data`.
    `check_memory`: refuse, before any work, a job whose estimated peak memory exceeds what the
    machine has available (`parscale.exporter.budget`).
    Every export also gets transformers_js_config.json and a model card, README.md (files/runtimes_and_card.py).

    The stages run so that at most one copy of the weights is in memory at a time: the graph is
    written from the module straight to disk (`decoder.py`), quantized tensor by tensor from there
    (GPTQ statistics one layer at a time), and compared with ONNX Runtime only after it is gone
    (its logits are kept instead).
    An unexpected error is raised as `StageError`, naming the stage it happened in.
    """
    dirs = [Path(model_dir)] if isinstance(model_dir, (str, Path)) else [Path(d) for d in model_dir]
    if not dirs:
        raise ParScaleError("no checkpoint folder given")
    model_dir, out = dirs[0], Path(out)
    job = _Job(model_dir=model_dir, dtype=Dtype(dtype), opset=opset, validate=validate, quantize=quantize,
               eval_text=eval_text, calibration_text=calibration_text, ort_format=ort_format,
               external_data_threshold=external_data_threshold, log=log or (lambda _msg: None))
    # Refused early (before loading anything), and again under the lock when the folder is swapped in.
    check_destination(out, force=force, is_replaceable=foreign_in_export, protect=tuple(dirs))
    limit_malloc_retention()  # freed weights go back to the system instead of staying in the heap
    job.stage("reading checkpoint")
    cfg, eos, streams = _preflight(job, dirs, P, check_memory)
    manifest = _manifest(cfg, job.dtype, opset, streams_checksum(streams), model_dir, [s.P for s in streams])
    results = _Results()
    # tmp: .NAME.partial-<pid>-<random> beside OUT, under a lock on OUT; swapped in on success.
    with (atomic_folder(out, force=force, is_replaceable=foreign_in_export, protect=tuple(dirs), log=job.log) as tmp,
          _stage_errors(job.seconds)):
        # A quantized export is made from its float graph, written inside the partial folder and never kept.
        float_dir = tmp / ".float" if quantize is not None else tmp
        tokens = _calibration_tokens(job)
        models = _build(job, float_dir, graph_metadata(manifest.to_dict()), streams)
        references = []
        if validate:
            job.stage("running the PyTorch reference" + (f"s (P = {_listed(models)})" if len(models) > 1 else ""))
            references = [reference_run(m) for m in models.values()]
        proto = None
        model = models.get(cfg.P)  # the largest P: GPTQ calibrates on its streams
        if quantize is not None:
            proto, results.quantization = _quantize(job, model, tokens, float_dir, cfg.num_hidden_layers)
            manifest = manifest.replace(quantization=results.quantization.to_dict())
        _release(models)  # the modules' memory goes back before ONNX Runtime needs its own
        del model, models  # the last references: weights the graph's writer pinned go with the modules
        job.stage("writing model")
        _write_graph(job, tmp, float_dir, proto, manifest)
        del proto
        copy_source_files(model_dir, tmp, parscale_n=cfg.P)
        write_genai_configs(tmp, cfg, eos, [s.P for s in streams])
        if references:
            results.validations, results.fidelities = validate_graphs(
                references, float_dir, tmp if quantize is not None else None, tolerance=TOLERANCE[job.dtype],
                model_dir=model_dir, vocab=cfg.vocab_size, eval_text=job.eval_text, stage=job.stage)
            manifest = manifest.replace(validation=validation_record(results.validations, results.fidelities))
        if float_dir != tmp:
            shutil.rmtree(float_dir)  # before the last files: they and the manifest describe the folder
        # Files for other runtimes and the model card: last, so the card can describe everything.
        job.stage("writing files for other runtimes and the model card")
        write_runtime_files_and_card(tmp, cfg, eos, manifest, out.name, ort_format=ort_format, stage=job.stage,
                                     web=len(streams) == 1)
        for path in tmp.iterdir():
            path.chmod(0o644)  # some writers create private files; an export is ordinary data
        manifest = manifest.replace(files=describe_files(tmp), web=browser_support(tmp))
        (tmp / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    job.stage("done")
    names = list(job.seconds)
    durations = {a: job.seconds[b] - job.seconds[a] for a, b in itertools.pairwise(names)}
    return ExportResult(out=out, manifest=manifest, validations=results.validations, seconds=durations,
                        quantization=results.quantization, fidelities=results.fidelities)


@dataclass
class _Job:
    """The options of one export, and the clock of its stages."""

    model_dir: Path
    dtype: Dtype
    opset: int
    validate: bool
    quantize: QuantScheme | None
    eval_text: str | Path | None
    calibration_text: str | Path | None
    ort_format: bool
    external_data_threshold: int
    log: Callable[[str], None]
    seconds: dict[str, float] = field(default_factory=dict)  # stage name -> start time

    @property
    def gptq(self) -> bool:
        return self.quantize is not None and self.quantize.method == "gptq"

    def stage(self, name: str) -> None:
        self.seconds[name] = time.perf_counter()
        self.log(name)


@dataclass
class _Results:
    """What the stages measured, gathered for the ExportResult."""

    validations: dict[int, ValidationReport] = field(default_factory=dict)
    quantization: QuantReport | None = None
    fidelities: dict[int, Fidelity] = field(default_factory=dict)


def _preflight(
    job: _Job, dirs: list[Path], P: Streams | int | Sequence[int] | None, check_memory: bool,  # noqa: N803
) -> tuple[ParScaleConfig, list[int], list[Stream]]:
    """Everything that can be refused before any work: options, configs, streams, EOS, text files, size,
    memory. Returns the config at the largest P exported, the EOS ids and the streams."""
    model_dir = job.model_dir
    if not MIN_OPSET <= job.opset <= onnx.defs.onnx_opset_version():
        raise ParScaleError(f"opset must be between {MIN_OPSET} and {onnx.defs.onnx_opset_version()}, "
                            f"got {job.opset}")
    streams = resolve_streams(dirs, None if P is None else Streams.parse(P))
    # config.json of the first folder, as resolve_streams read it, at the largest P exported
    cfg = next(s.own_config() for s in streams if s.folder == model_dir).at(streams[-1].P)
    check_supported(cfg.head_dim)
    if job.quantize is not None and job.quantize.kernel != NBITS_KERNEL and job.dtype != Dtype.fp32:
        raise ParScaleError(f"the {job.quantize.kernel} kernel runs in float32 graphs (a CPU kernel): export with "
                            f"--dtype fp32, or use --kernel {NBITS_KERNEL} for fp16")
    if len(streams) > 1 and job.ort_format:
        raise ParScaleError("ort_format (--ort-format) is for single-P exports: export each P for ONNX Runtime Mobile")
    check_sources(dirs, cfg)
    eos = load_eos_ids(model_dir, config=cfg)  # a malformed generation_config.json fails now, not after the graph
    # Text files are read and tokenized now too (a few ms): a missing file or tokenizer is not
    # found minutes later, after the graph is written.
    if job.eval_text is not None:
        text_tokens(model_dir, job.eval_text)
    if job.calibration_text is not None:
        text_windows(model_dir, job.calibration_text)
    plan = budget.plan(cfg, dtype=job.dtype.value, quantize=job.quantize, validate=job.validate)
    if job.ort_format and plan.output_bytes > budget.ORT_FORMAT_LIMIT:
        raise ParScaleError(
            f"ort_format: this export's graph would hold {plan.output_bytes / 1e9:.2f} GB of weights, and an ORT "
            f"format file cannot exceed {budget.ORT_FORMAT_LIMIT / 2**30:.0f} GiB (a flatbuffer limit); "
            "quantize it (int4) or export without ort_format (--ort-format)"
        )
    if check_memory:
        budget.check(plan)
    return cfg, eos, streams


def _calibration_tokens(job: _Job) -> tuple[np.ndarray, str] | None:
    """GPTQ's calibration tokens, first: sampling loads the checkpoint on its own (in bfloat16 where
    it is stored so), before the float32 copy exists."""
    if not job.gptq:
        return None
    job.stage("calibrating (GPTQ calibration tokens)")
    return calibration_tokens(job.model_dir, job.calibration_text)


def _build(job: _Job, float_dir: Path, metadata: dict[str, str], streams: list[Stream]) -> dict[int, Any]:
    """Write the graph to `float_dir`; returns the float32 module of each P when the reference or GPTQ
    needs them ({} otherwise).

    The modules are loaded in float32 once, sharing one backbone: the graph's weights are converted
    tensor by tensor as they are written, and the same modules are the references it is validated against.
    """
    job.stage("loading weights")
    models = {p: m for p, (_, m) in load_streams(streams, torch.float32).items()}
    job.stage("writing the ONNX graph")
    float_dir.mkdir(exist_ok=True)
    build_decoder(models, float_dir, dtype=job.dtype.torch,
                  opset=job.opset, external_threshold=job.external_data_threshold, metadata=metadata)
    if not (job.validate or job.gptq):  # the float32 modules are the references and calibrate GPTQ
        _release(models)
        return {}
    return models


def _release(models: dict[int, Any]) -> None:
    """`release` every module (a function, so that no loop variable keeps one alive in the caller)."""
    for m in models.values():
        release(m)


def _quantize(
    job: _Job, model: ParScaleForCausalLM | None, tokens: tuple[np.ndarray, str] | None, float_dir: Path,
    num_layers: int,
) -> tuple[onnx.ModelProto, QuantReport]:
    """Quantize the float graph's weights tensor by tensor; GPTQ frees the module layer by layer."""
    assert job.quantize is not None
    hessians = None
    if job.gptq:
        assert model is not None and tokens is not None
        hessians = LayerwiseHessians(model, tokens[0], consume=True)
    elif model is not None:
        release(model)  # round-to-nearest reads the weights from the float graph
    job.stage("quantizing")
    proto = onnx.load(str(float_dir / MODEL_FILE), load_external_data=False)
    report = quantize_graph(proto, job.quantize, num_layers, hessians, base_dir=float_dir,
                            progress=lambda msg: job.log("  " + msg))
    report.calibration = tokens[1] if tokens is not None else None
    if model is not None:
        release(model)  # the LM head and embeddings GPTQ did not consume
    return proto, report


def _write_graph(job: _Job, tmp: Path, float_dir: Path, proto: onnx.ModelProto | None, manifest: Manifest) -> None:
    """The export's model.onnx (and data): the quantized proto, or the float graph in place."""
    meta = manifest.to_dict()  # no files or validation yet: they describe the finished folder
    if proto is not None:
        load_external(proto, float_dir)  # the float tensors left (norms, biases, prefixes, mixing)
        set_metadata(proto, meta)
        save_graph(proto, tmp, external_threshold=job.external_data_threshold)
    else:
        rewrite_structure(tmp, meta)


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


def _manifest(
    cfg: ParScaleConfig, dtype: Dtype, opset: int, checksum: str, model_dir: Path, Ps: list[int],  # noqa: N803
) -> Manifest:
    """The manifest of an export of `Ps` (`cfg`: the config at the largest of them)."""
    n, multi = cfg.num_hidden_layers, len(Ps) > 1
    cache = contract.cache_info(cfg.n_prefix, *((Ps, cfg.num_key_value_heads) if multi else ()))
    return Manifest(
        model=ModelInfo.from_config(cfg), dtype=dtype.value, opset=opset,
        io={"inputs": contract.input_names(n), "outputs": contract.output_names(n),
            "axes": contract.axes(n, cache_heads=contract.CACHE_HEADS if multi else None),
            contract.CACHE_INFO: cache},
        source={"name": model_dir.resolve().name, "sha256": checksum},
        tool={"name": "parscale", "version": __version__},
        format_version=FORMAT_VERSION,
    )


def _listed(models: dict[int, Any]) -> str:
    return ", ".join(map(str, sorted(models)))
