"""Read a checkpoint in the published Hugging Face layout into a `ParScaleForCausalLM`.

Weights come from safetensors only (one file, or shards listed by `model.safetensors.index.json`);
every tensor is checked against the shapes the config implies before anything is built.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from parscale.config import ParScaleConfig
from parscale.errors import ParScaleError
from parscale.exporter.model import ParScaleForCausalLM

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt")
# Tensors some checkpoints carry that hold nothing the graph needs.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def expected_shapes(cfg: ParScaleConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name the checkpoint must hold, with its shape."""
    h, i, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    H, Hkv, P = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.P
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for n in range(cfg.num_hidden_layers):
        pre = f"model.layers.{n}."
        shapes.update({
            pre + "self_attn.q_proj.weight": (H * D, h), pre + "self_attn.q_proj.bias": (H * D,),
            pre + "self_attn.k_proj.weight": (Hkv * D, h), pre + "self_attn.k_proj.bias": (Hkv * D,),
            pre + "self_attn.v_proj.weight": (Hkv * D, h), pre + "self_attn.v_proj.bias": (Hkv * D,),
            pre + "self_attn.o_proj.weight": (h, H * D),
            pre + "mlp.gate_proj.weight": (i, h), pre + "mlp.up_proj.weight": (i, h),
            pre + "mlp.down_proj.weight": (h, i),
            pre + "input_layernorm.weight": (h,), pre + "post_attention_layernorm.weight": (h,),
        })
        if cfg.n_prefix:
            shapes[pre + "self_attn.prefix_k"] = (P, Hkv, cfg.n_prefix, D)
            shapes[pre + "self_attn.prefix_v"] = (P, Hkv, cfg.n_prefix, D)
    shapes["model.norm.weight"] = (h,)
    if P > 1:
        shapes.update({
            "model.aggregate_layer.0.weight": (h, P * h), "model.aggregate_layer.0.bias": (h,),
            "model.aggregate_layer.2.weight": (P, h), "model.aggregate_layer.2.bias": (P,),
        })
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


def weight_files(model_dir: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file holding it."""
    if (model_dir / INDEX).is_file():
        try:
            weight_map = json.loads((model_dir / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ParScaleError(f"{model_dir / INDEX} is malformed ({e})") from None
        files = {}
        for name, fname in weight_map.items():
            path = model_dir / fname
            if not path.is_file():
                raise ParScaleError(f"shard {fname} listed in {INDEX} is missing from {model_dir}")
            files[name] = path
        return files
    if (model_dir / SINGLE).is_file():
        return {name: model_dir / SINGLE for name in _keys(model_dir / SINGLE)}
    if any((model_dir / n).exists() for n in PICKLE_NAMES):
        raise ParScaleError(
            f"{model_dir} holds only pickle weights (pytorch_model.bin): parscale reads safetensors "
            "only; convert them with safetensors first"
        )
    raise ParScaleError(f"no weight files in {model_dir}: expected {SINGLE} or {INDEX} with shards")


def _keys(path: Path) -> list[str]:
    try:
        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise ParScaleError(f"cannot read {path.name}: {e} (truncated or not a safetensors file?)") from None


def check_shapes(cfg: ParScaleConfig, found: dict[str, tuple[int, ...]]) -> None:
    """Compare the tensors found with those the config implies; name the first problem."""
    expected = expected_shapes(cfg)
    for name, shape in expected.items():
        if name not in found:
            raise ParScaleError(f"checkpoint is missing tensor {name} (shape {list(shape)})")
        got = found[name]
        if got == shape:
            continue
        if name.endswith(("prefix_k", "prefix_v")) and len(got) == 4 and got[2] != shape[2]:
            raise ParScaleError(
                f"{name} holds {got[2]} prefix entries but config.json says parscale_n_tokens="
                f"{cfg.parscale_n_tokens}"
            )
        if name.endswith(("prefix_k", "prefix_v")) and len(got) == 4 and got[0] != shape[0]:
            raise ParScaleError(f"{name} holds {got[0]} streams but config.json says parscale_n={cfg.P}")
        raise ParScaleError(f"tensor {name} has shape {list(got)}, expected {list(shape)}")
    extra = [
        n for n in found
        if n not in expected and not n.endswith(IGNORED_SUFFIXES)
        and not (n == "lm_head.weight" and cfg.tie_word_embeddings)
    ]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise ParScaleError(f"checkpoint has unexpected tensor {extra[0]}{more}: not a ParScale/Qwen2 layout?")


def load_model(
    model_dir: str | Path, dtype: torch.dtype = torch.float32
) -> tuple[ParScaleConfig, ParScaleForCausalLM]:
    """Load and check a checkpoint folder; returns its config and the module in `dtype`, eval mode."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ParScaleError(f"model folder {model_dir} does not exist")
    cfg = ParScaleConfig.load(model_dir)
    files = weight_files(model_dir)
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(set(files.values())):
        wanted = [name for name in _keys(path) if files.get(name) == path]  # safe_open checks the file's layout
        for name, t in _read_tensors(path, wanted):
            # One at a time: the checkpoint's own copy of the whole model never exists in memory.
            tensors[name] = _checked(name, t).to(dtype, copy=True)  # a copy `release` can free
    check_shapes(cfg, {n: tuple(t.shape) for n, t in tensors.items()})

    with torch.device("meta"):
        model = ParScaleForCausalLM(cfg)
    expected = expected_shapes(cfg)
    state = {n: t for n, t in tensors.items() if n in expected}
    del tensors
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, assign=True, strict=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return cfg, model.eval()


def stored_dtype(model_dir: str | Path) -> torch.dtype:
    """The floating-point dtype holding most of a checkpoint's weight bytes (read from the headers)."""
    files = weight_files(Path(model_dir))
    by_dtype: dict[str, int] = {}
    for path in sorted(set(files.values())):
        for name, info in _header(path)[0].items():
            if files.get(name) == path and info["dtype"] in ("F64", "F32", "F16", "BF16"):
                start, end = info["data_offsets"]
                by_dtype[info["dtype"]] = by_dtype.get(info["dtype"], 0) + end - start
    return _DTYPES[max(by_dtype, key=by_dtype.__getitem__)] if by_dtype else torch.float32


def _header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header (tensor name -> dtype, shape, offsets) and where its data starts."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
    except (OSError, ValueError) as e:
        raise ParScaleError(f"cannot read {path.name}: {e} (truncated or not a safetensors file?)") from None
    header.pop("__metadata__", None)
    return header, 8 + size


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _read_tensors(path: Path, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of a safetensors file read with plain reads, one at a time.

    safetensors' own reader maps the file, and every page read that way counts as resident memory
    until the file is closed (6 GB more at the peak of loading a 3B checkpoint).
    """
    header, base = _header(path)
    try:
        with open(path, "rb") as f:
            for name in names:
                info = header[name]
                start, end = info["data_offsets"]
                f.seek(base + start)
                buf = torch.empty(end - start, dtype=torch.uint8)  # torch owns it: `release` can free it
                if f.readinto(memoryview(buf.numpy())) != end - start:
                    raise ValueError(f"{name} is cut short")
                yield name, buf.view(_DTYPES[info["dtype"]]).reshape(info["shape"])
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise ParScaleError(f"cannot read {path.name}: {e} (truncated or not a safetensors file?)") from None


def _checked(name: str, t: torch.Tensor) -> torch.Tensor:
    """Refuse NaN or Inf weights: they would export and then generate garbage (or token 0 forever)."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ParScaleError(f"checkpoint tensor {name} holds {bad} NaN or infinite values: the checkpoint is damaged")
    return t


def release(module: torch.nn.Module) -> None:
    """Free the memory of a module's weights now, whatever else still refers to the tensors.

    The module cannot run afterwards. Tracing leaves references to the weights in places we do not
    own (onnxscript's rewrite rules keep the last graph they matched), so dropping the module
    alone does not give its memory back.
    """
    for t in [*module.parameters(), *module.buffers()]:
        storage = t.detach().untyped_storage()
        # Constant folding reads small tensors (norms, biases, prefixes) through numpy, which pins
        # their memory; they are a few MB at 3B. Weights reach the graph as copies and are freed.
        if storage.resizable():
            storage.resize_(0)


def source_checksum(model_dir: str | Path) -> str:
    """sha256 over config.json and the weight files (names and bytes), to tie an export to its source."""
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    paths = [model_dir / "config.json", *sorted(set(weight_files(model_dir).values()))]
    for path in paths:
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()
