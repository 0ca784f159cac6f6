"""How much memory an export will need, estimated from the config before any work starts.

`export` holds at most one copy of the weights at a time (see its docstring), so its peak is one
of: the float32 module while the graph is written from it (plus one converted weight), and while
it is the reference and calibrates GPTQ (with one layer's statistics and the GPTQ factor on top); an ONNX
Runtime session of the float graph while it is validated. The factors below were measured on
this project's exports (README: "Exporting large models"; `benchmarks/export_memory.py` measures
them again) and rounded up.
"""

from __future__ import annotations

from dataclasses import dataclass

from parscale.config import ParScaleConfig
from parscale.errors import ParScaleError
from parscale.runtime.memory import available_bytes  # one reading of MemAvailable (tests patch it here)

GiB = 1 << 30
# Python, torch, onnx and ONNX Runtime themselves, before any weights.
BASE_BYTES = 1 * GiB
# An ONNX Runtime CPU session over float weights, per weight byte: the mapped weights plus the
# constant-folded transpose of a tied embedding table.
ORT_FLOAT_FACTOR = 1.15
# A flatbuffer (ORT format) cannot exceed 2 GiB; leave room for the graph itself.
ORT_FORMAT_LIMIT = 2 * GiB - (64 << 20)
_BYTES = {"fp32": 4, "fp16": 2}


@dataclass(frozen=True)
class Plan:
    """Estimated sizes of one export job, in bytes."""

    params: int
    fp32_bytes: int  # the model's weights in float32
    graph_bytes: int  # the float graph's weights (in the export dtype)
    output_bytes: int  # the exported graph's weights (quantized, if it is)
    peak_bytes: int  # estimated peak resident memory of the export
    largest: str  # the stage expected to need the most
    options: str  # what the estimate assumed, for messages


def param_count(cfg: ParScaleConfig) -> int:
    """Parameters of the module (a tied LM head counts once)."""
    from parscale.modeling.checkpoint import expected_shapes

    total = 0
    for shape in expected_shapes(cfg).values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def plan(cfg: ParScaleConfig, *, dtype: str, quantize: object | None, validate: bool) -> Plan:
    """The estimate for exporting `cfg` with these options."""
    params = param_count(cfg)
    fp32 = 4 * params
    graph = _BYTES[dtype] * params
    h, i, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    largest_weight = 4 * max(vocab * h, 2 * i * h)  # the LM head, or a packed gate/up projection
    peaks = {"writing the graph": fp32 + largest_weight}
    gptq = quantize is not None and getattr(quantize, "method", None) == "gptq"
    if validate or gptq:
        peaks["reference"] = fp32
    if gptq:
        # One layer's statistics and the float64 factorisation of the largest one, or the LM head's
        # padded weight, error and code arrays while it is quantized.
        stats = 4 * (i * i + 2 * h * h) + 3 * 8 * i * i
        head = 3 * 4 * vocab * h
        peaks["calibrating and quantizing"] = fp32 + max(stats, head)
    if validate:
        peaks["validating"] = int(ORT_FLOAT_FACTOR * graph)
    output = graph
    if quantize is not None:
        # Codes, plus a scale (export dtype) and a zero point per block.
        bits, block = quantize.bits, quantize.block_size  # type: ignore[attr-defined]
        output = int(params * (bits / 8 + (_BYTES[dtype] + bits / 8) / block))
    largest = max(peaks, key=lambda k: peaks[k])
    what = f"{dtype}" + (f", int{quantize.bits} {quantize.method}" if quantize is not None else "")  # type: ignore[attr-defined]
    what += ", validation on" if validate else ", validation off"
    return Plan(params=params, fp32_bytes=fp32, graph_bytes=graph, output_bytes=output,
                peak_bytes=BASE_BYTES + peaks[largest],
                largest=largest, options=what)


def check(p: Plan) -> None:
    """Refuse a job that will not fit, saying what would make it fit."""
    free = available_bytes()
    if free is None or p.peak_bytes <= free:
        return
    hints = []
    if "validation on" in p.options:
        hints.append("--no-validate (skips the ONNX Runtime check, the largest stage after the weights)")
    if "gptq" in p.options:
        hints.append("--method rtn (no calibration pass)")
    hints.append("a machine with more memory")
    raise ParScaleError(
        f"this export needs about {p.peak_bytes / GiB:.1f} GiB of memory ({p.params / 1e9:.2f}B parameters, "
        f"{p.options}; largest stage: {p.largest}) but {free / GiB:.1f} GiB are available; try "
        + ", or ".join(hints) + "; pass --force-memory to try anyway"
    )
