"""Quantization policy: which tensors of an export become which ONNX Runtime nodes.

Quantized: every decoder projection (packed q/k/v, o, packed gate/up, down), the LM head and the
embedding table. The `kernel` decides the packed gate/up projection (`INTEGER_TARGETS`):

- `MatMulNBits` (the int4 default, and every other projection): block-wise weights, activations
  quantized per block of 32 inside the kernel, which re-reads each weight block for every pair of
  rows (at batch 1 the P streams are the rows);
- `MatMulIntegerToFloat` (the int8 default, CPU only): int8 weights per output channel through ONNX
  Runtime's integer GEMM, which reads each weight once for up to 6 rows, with the activations
  quantized per row by four nodes in front (Abs, ReduceMax, Div, QuantizeLinear).

The LM head and the embedding are block-wise whatever the kernel (one tied table serves both);
README "Quantization" has the measurements behind every choice.

Kept in floating point: ParScale's own parameters (prefix keys/values, the aggregation MLP), which
decide how the streams mix (0.9% of the weights of a 0.5B P=4 model, 7.7% of the small embedded
model); norms and biases.

With tied embeddings one quantized table serves both nodes: MatMulNBits reads it as
(vocab, k_blocks, blob) and the Gather reads it reshaped to (vocab, k_blocks * blob), quantized
along the hidden axis. The reshape's target shape is computed at run time on purpose: a constant
shape lets ONNX Runtime fold the Reshape at session load into a second copy of the table.

The numbers live in `math`, the graph rewrite in `rewrite`; this module only decides.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from parscale.errors import ParScaleError
from parscale.exporter.graph.builder import MS_DOMAIN

NBITS_KERNEL, INTEGER_KERNEL = "MatMulNBits", "MatMulIntegerToFloat"
KERNELS = (NBITS_KERNEL, INTEGER_KERNEL)
# The projections the integer kernel takes: the packed gate/up (named by its first half), 69% of a layer's
# weights. q/k/v and o would add 12% more at three times the activation-quantization nodes, which cost
# more time than their weights save at P=1, and fidelity; down_proj's input, SiLU(gate) * up, has rows
# whose largest value is 10-24x their RMS on the embedded model, where one int8 scale per row loses
# most of the fidelity (README: quantization has the measurements).
INTEGER_TARGETS = (".mlp.gate_proj",)


@dataclass(frozen=True)
class QuantScheme:
    """How weights are quantized. Defaults were chosen by measurement (see the README's table)."""

    bits: int  # 4 or 8: projections and LM head
    block_size: int = 32  # values per scale along the input (K / hidden) axis
    symmetric: bool = False  # True: no zero points (implicit 2**(bits-1))
    accuracy_level: int = 0  # MatMulNBits: 0 unset (float A), 1 fp32, 2 fp16, 3 bf16, 4 int8 A
    embedding_bits: int | None = None  # None: same as `bits` (needed to share a tied table)
    method: str = "rtn"  # "gptq": GPTQ on calibration statistics; "rtn": round-to-nearest
    kernel: str = "MatMulNBits"  # the projections' kernel: one of KERNELS

    def __post_init__(self) -> None:
        if self.method not in ("gptq", "rtn"):
            raise ParScaleError(f"quantization method must be gptq or rtn, got {self.method!r}")
        if self.kernel not in KERNELS:
            raise ParScaleError(f"quantization kernel must be one of {', '.join(KERNELS)}, got {self.kernel!r}")
        if self.kernel != NBITS_KERNEL and (self.bits != 8 or self.method != "rtn"):
            raise ParScaleError(f"the {self.kernel} kernel takes int8 weights quantized per output channel by "
                                "round-to-nearest: use it with --int8 (and --method rtn, the int8 default)")
        if self.bits not in (4, 8):
            raise ParScaleError(f"quantization bits must be 4 or 8, got {self.bits}")
        if self.embedding_bits not in (None, 4, 8):
            raise ParScaleError(f"embedding bits must be 4 or 8, got {self.embedding_bits}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ParScaleError(f"block_size must be a power of two >= 16, got {self.block_size}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ParScaleError(f"accuracy_level must be 0..4, got {self.accuracy_level}")

    @property
    def embed_bits(self) -> int:
        return self.embedding_bits or self.bits

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["embedding_bits"] = self.embed_bits
        return d


# Per bit width, the defaults measured best on the trained embedded model (README: quantization).
DEFAULTS: dict[int, dict[str, Any]] = {
    8: {"block_size": 32, "symmetric": False, "accuracy_level": 4, "method": "rtn", "kernel": INTEGER_KERNEL},
    4: {"block_size": 32, "symmetric": False, "accuracy_level": 4, "method": "gptq", "kernel": NBITS_KERNEL},
}


def default_scheme(
    bits: int, *, block_size: int | None = None, symmetric: bool | None = None, accuracy_level: int | None = None,
    method: str | None = None, kernel: str | None = None, dtype: str = "fp32",
) -> QuantScheme:
    """The scheme for `bits` with the measured defaults, overridden where an argument is given.

    An fp16 graph (`dtype`) is for GPUs, where the integer-GEMM kernels do not run: its default
    kernel is MatMulNBits."""
    if bits not in DEFAULTS:
        raise ParScaleError(f"quantization bits must be 4 or 8, got {bits}")
    if kernel is None and dtype != "fp32":
        kernel = NBITS_KERNEL
    given = {"block_size": block_size, "symmetric": symmetric, "accuracy_level": accuracy_level, "method": method,
             "kernel": kernel}
    return QuantScheme(bits=bits, **{**DEFAULTS[bits], **{k: v for k, v in given.items() if v is not None}})


@dataclass
class QuantReport:
    """What was quantized: per-tensor storage, and bits per weight for those tensors and the model."""

    scheme: QuantScheme
    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> shape, bytes, kind
    shared_embedding: bool = False
    calibration: str | None = None  # where GPTQ's statistics came from
    float_weights: int = 0  # elements of the initializers left in floating point
    float_bytes: int = 0

    @property
    def quantized_weights(self) -> int:
        return sum(t["weights"] for t in self.tensors.values())

    @property
    def quantized_bytes(self) -> int:
        return sum(t["bytes"] for t in self.tensors.values())

    @property
    def bits_per_weight(self) -> float:
        """Stored bits of the quantized tensors (codes, scales, zero points) per weight they replace."""
        return 8 * self.quantized_bytes / max(self.quantized_weights, 1)

    @property
    def model_bits_per_weight(self) -> float:
        """All weight bytes of the graph (quantized and float) per weight of the model."""
        return 8 * (self.quantized_bytes + self.float_bytes) / max(self.quantized_weights + self.float_weights, 1)

    def to_dict(self) -> dict[str, Any]:
        integer = self.scheme.kernel == INTEGER_KERNEL
        return {
            "method": ("int8: gate/up projections per output channel with int8 activations per row "
                       f"({INTEGER_KERNEL}), the other projections, LM head and embedding block-wise") if integer
            else f"int{self.scheme.bits} weight-only, block-wise",
            "ops": [f"{MS_DOMAIN}.{op}" for op in ([INTEGER_KERNEL] if integer else []) +
                    [NBITS_KERNEL, "GatherBlockQuantized"]],
            "scheme": self.scheme.to_dict(),
            "bits_per_weight": {"quantized": round(self.bits_per_weight, 4),
                                "model": round(self.model_bits_per_weight, 4)},
            "quantized_tensors": len(self.tensors),
            "quantized_weights": self.quantized_weights,
            "float_weights": self.float_weights,
            "shared_embedding": self.shared_embedding,
            "calibration": self.calibration,
            "kept_float": "prefix keys/values, aggregation MLP, norms, biases",
        }
