"""ONNX Runtime Mobile: the ORT flatbuffer model and the operator list for a reduced runtime build.

`parscale export --ort-format` calls `write_ort_format` on the folder being built. It runs ONNX
Runtime's own converter (`onnxruntime.tools.convert_onnx_models_to_ort`, what
`python -m onnxruntime.tools.convert_onnx_models_to_ort model.onnx` does) and keeps:

- `model.ort`: the graph in ORT format, optimized at conversion time ("Fixed" style), which a
  minimal (`--minimal_build`) ONNX Runtime loads without the ONNX protobuf parser;
- `required_operators.config`: the operators (domain, opset, names) that graph uses, for
  ONNX Runtime's `build.py --include_ops_by_config required_operators.config`, so the app ships a
  runtime with only those kernels.

Full ONNX Runtime builds (the `onnxruntime` wheel included) also load `model.ort`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from parscale.errors import ParScaleError
from parscale.manifest import MODEL_FILE

ORT_MODEL = "model.ort"
ORT_OPERATORS = "required_operators.config"


def write_ort_format(folder: Path) -> list[str]:
    """Convert `folder/model.onnx` into `folder/model.ort` plus `folder/required_operators.config`.

    Returns the names written. The converter works in a private temporary folder: it names its
    outputs after the optimization level (an environment variable may change it) and writes
    absolute paths into the config's header, neither of which belongs in an export.
    """
    try:
        from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort
    except ImportError as e:  # a minimal or GPU-only onnxruntime install may lack its tools
        raise ParScaleError(f"--ort-format needs onnxruntime's conversion tools ({e})") from None

    with tempfile.TemporaryDirectory(prefix=".ort-", dir=folder.parent) as scratch:
        out = Path(scratch)
        log = io.StringIO()
        try:
            # The converter prints and logs its progress (with our temporary paths), and ONNX Runtime
            # warns that num_logits_to_keep is an overridable initializer, which is on purpose
            # (contract.py); our CLI reports stages itself.
            with contextlib.redirect_stdout(log), _quiet():
                convert_onnx_models_to_ort(
                    folder / MODEL_FILE, output_dir=out, optimization_styles=[OptimizationStyle.Fixed],
                )
        except Exception as e:  # the converter raises whatever ONNX Runtime raised
            detail = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise ParScaleError(f"ONNX Runtime could not convert {MODEL_FILE} to ORT format: {detail}") from None
        models, configs = sorted(out.glob("*.ort")), sorted(out.glob("*.config"))
        if len(models) != 1 or len(configs) != 1:
            raise ParScaleError(f"ORT conversion wrote unexpected files: {sorted(p.name for p in out.iterdir())}")
        shutil.move(models[0], folder / ORT_MODEL)
        (folder / ORT_OPERATORS).write_text(_portable_config(configs[0].read_text()))
    return [ORT_MODEL, ORT_OPERATORS]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ONNX Runtime's default logger at errors only, and the converter's Python logger at warnings."""
    import onnxruntime as ort

    logger = logging.getLogger("ort_format_model.utils")
    level = logger.level
    ort.set_default_logger_severity(3)
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        ort.set_default_logger_severity(2)  # ONNX Runtime's default (warnings); it has no getter
        logger.setLevel(level)


def _portable_config(text: str) -> str:
    """The operator config without the converter's absolute paths (the file must be reproducible)."""
    lines = []
    for line in text.splitlines():
        if line.startswith("# - "):  # "# - /tmp/.../model.ort": where the converter wrote it
            line = f"# - {ORT_MODEL}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def operators(folder: Path) -> dict[str, list[str]]:
    """The operators listed in an export's `required_operators.config`, as {"domain;opset": [ops]}."""
    ops: dict[str, list[str]] = {}
    for line in (folder / ORT_OPERATORS).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            domain, opset, names = line.split(";", 2)
            ops[f"{domain};{opset}"] = names.split(",")
    return ops
