"""Checkpoints in the published Hugging Face layout: read into a `ParScaleForCausalLM`, and written.

Weights come from safetensors only (one file, or shards listed by `model.safetensors.index.json`);
every tensor is checked against the shapes of the module the config builds before anything is built.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from parscale.atomic import AtomicFolder, atomic_folder, foreign_in_checkpoint
from parscale.config import ParScaleConfig, check_folder
from parscale.errors import ParScaleError
from parscale.manifest import feed_file
from parscale.modeling.model import ParScaleForCausalLM

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt")
# Tensors some checkpoints carry that hold nothing the graph needs.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def expected_shapes(cfg: ParScaleConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name the checkpoint must hold, with its shape: those of the module `cfg` builds."""
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = ParScaleForCausalLM(cfg)
    return {n: tuple(t.shape) for n, t in sanitize(cfg, model.state_dict()).items()}


def sanitize(cfg: ParScaleConfig, weights: dict[str, Any]) -> dict[str, Any]:
    """The tensors of a checkpoint (or a module's state dict) that the module loads.

    Drops what some checkpoints carry and the graph never needs (rotary inv_freq buffers) and, for
    tied embeddings, the LM head, which is the embedding table.
    """
    return {n: t for n, t in weights.items()
            if not n.endswith(IGNORED_SUFFIXES) and not (n == "lm_head.weight" and cfg.tie_word_embeddings)}


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
    extra = [n for n in sanitize(cfg, found) if n not in expected]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise ParScaleError(f"checkpoint has unexpected tensor {extra[0]}{more}: not a ParScale/Qwen2 layout?")


def load_model(
    model_dir: str | Path, dtype: torch.dtype = torch.float32
) -> tuple[ParScaleConfig, ParScaleForCausalLM]:
    """Load and check a checkpoint folder; returns its config and the module in `dtype`, eval mode."""
    model_dir = Path(model_dir)
    cfg = ParScaleConfig.load(check_folder(model_dir, "model folder"))
    files = weight_files(model_dir)
    tensors = read_weights(files, list(files), dtype)
    check_shapes(cfg, {n: tuple(t.shape) for n, t in tensors.items()})
    return cfg, module_from_state(cfg, tensors)


def read_weights(files: dict[str, Path], names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors `names` (name -> file in `files`), each read, checked and converted to `dtype` one at a
    time: the checkpoint's own copy of the whole model never exists in memory."""
    wanted = set(names)
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted({files[n] for n in wanted}):
        here = [name for name in _keys(path) if name in wanted and files[name] == path]  # safe_open checks the layout
        for name, t in _read_tensors(path, here):
            tensors[name] = _checked(name, t).to(dtype, copy=True)  # a copy `release` can free
    return tensors


def module_from_state(cfg: ParScaleConfig, tensors: dict[str, torch.Tensor]) -> ParScaleForCausalLM:
    """The module of `cfg` holding `tensors` (shapes already checked) without copying them, eval mode."""
    with torch.device("meta"):
        model = ParScaleForCausalLM(cfg)
    state = sanitize(cfg, tensors)
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, assign=True, strict=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


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

    The module cannot run afterwards. The graph writer reads the weights through numpy views, and
    modules of several P share one backbone, so dropping one module alone does not give the
    memory back.
    """
    for t in [*module.parameters(), *module.buffers()]:
        storage = t.detach().untyped_storage()
        # A storage borrowed from numpy cannot be resized; it goes with its owner.
        if storage.resizable():
            storage.resize_(0)


def source_checksum(model_dir: str | Path) -> str:
    """sha256 over config.json and the weight files (names and bytes), to tie an export to its source."""
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    paths = [model_dir / "config.json", *sorted(set(weight_files(model_dir).values()))]
    for path in paths:
        digest.update(path.name.encode())
        feed_file(digest, path)
    return digest.hexdigest()


def save_checkpoint(
    model: ParScaleForCausalLM, config: dict[str, Any], out: Path, *, shards: int = 1,
    extra_files: dict[str, Path] | None = None,
) -> None:
    """Write config.json, generation_config.json and safetensors (optionally sharded) into `out`."""
    dtype = DTYPES[config.get("torch_dtype", "float32")]
    state = {n: t.detach().to(dtype).contiguous() for n, t in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {"bos_token_id": config.get("bos_token_id"), "eos_token_id": config.get("eos_token_id")}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    names = list(state)
    if shards <= 1:
        save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    else:
        per = -(-len(names) // shards)
        weight_map = {}
        for k in range(shards):
            fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: state[n] for n in names[k * per:(k + 1) * per]}
            save_file(part, out / fname, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, fname))
        index = {"metadata": {"total_size": sum(t.nbytes for t in state.values())},
                 "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    for name, src in (extra_files or {}).items():
        shutil.copyfile(src, out / name)
    for path in out.iterdir():
        path.chmod(0o644)  # safetensors writes private files; a checkpoint is ordinary data


def checkpoint_folder(out: Path, force: bool) -> AtomicFolder:
    """The atomic writer for checkpoint folders: `--force` replaces only an earlier checkpoint."""
    return atomic_folder(out, force=force, is_replaceable=foreign_in_checkpoint, what="a parscale checkpoint")
