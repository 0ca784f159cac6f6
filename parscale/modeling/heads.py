"""Head sets: several P over one frozen backbone.

ParScale's two-stage recipe trains, for each P, only what parallel scaling adds (every layer's prefix
keys/values and the aggregation MLP) on a frozen backbone, so the models it makes share the backbone
bit for bit. A checkpoint folder holds its own P in `model.safetensors` (config.json's parscale_n)
and may hold more head sets beside it, one file each: `heads-p{P}.safetensors`, with only those
tensors. P=1 is the backbone alone and needs no file.

`load_streams` loads several P (from one folder's head sets, or from several checkpoint folders whose
backbones it checks are identical) with the backbone's tensors in memory once, shared by the modules.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from parscale.config import ParScaleConfig, Streams, check_folder
from parscale.errors import ParScaleError
from parscale.manifest import feed_file, file_digest
from parscale.modeling.checkpoint import (
    _header,
    _keys,
    _read_tensors,
    check_shapes,
    module_from_state,
    read_weights,
    source_checksum,
    weight_files,
)
from parscale.modeling.model import ParScaleForCausalLM

HEADS_FILE = "heads-p{}.safetensors"
BACKBONE_KEY = "parscale_backbone"  # a head file's metadata: the fingerprint of the backbone it was trained on
_HEADS_NAME = re.compile(r"heads-p(\d+)\.safetensors")
PARSCALE_ONLY = ("self_attn.prefix_k", "self_attn.prefix_v", "model.aggregate_layer.")


def is_head_tensor(name: str) -> bool:
    """True for the tensors parallel scaling adds (prefixes, aggregation), False for the backbone."""
    return name.endswith(PARSCALE_ONLY[:2]) or name.startswith(PARSCALE_ONLY[2])


def head_sets(folder: str | Path, config: ParScaleConfig | None = None) -> list[int]:
    """Every P a checkpoint folder can load: 1 (the backbone), its own parscale_n, and its head files.

    `config`: the folder's config.json when the caller has read it already."""
    folder = Path(folder)
    found = {1, (config or ParScaleConfig.load(folder)).P}
    for path in folder.glob("heads-p*.safetensors"):
        m = _HEADS_NAME.fullmatch(path.name)
        if m and int(m.group(1)) > 1:
            found.add(int(m.group(1)))
    return sorted(found)


def _sources(folder: Path, cfg: ParScaleConfig, P: int) -> dict[str, Path]:  # noqa: N803
    """Tensor name -> file, for the model of `folder` at P streams."""
    files = weight_files(folder)
    if P == cfg.P:
        return files
    have = head_sets(folder, cfg)
    if P not in have:
        raise ParScaleError(f"{folder} has no head set for P={P}: it holds P = {', '.join(map(str, have))}; "
                            f"train one with `parscale train-heads {folder} --P {P}`")
    sources = {n: p for n, p in files.items() if not is_head_tensor(n)}
    if P > 1:
        path = folder / HEADS_FILE.format(P)
        sources |= dict.fromkeys(check_head_file(folder, P), path)
    return sources


def backbone_fingerprint(folder: str | Path) -> str:
    """sha256 over a checkpoint's backbone tensors as stored (name, dtype, shape, bytes; sorted by name):
    what a head set is bound to. Prefixes and aggregation (`is_head_tensor`) are left out."""
    files = weight_files(Path(folder))
    stamp = tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(set(files.values())))
    return _fingerprint(stamp, tuple(sorted((n, str(p)) for n, p in files.items() if not is_head_tensor(n))))


@functools.lru_cache(maxsize=8)
def _fingerprint(stamp: tuple, names: tuple[tuple[str, str], ...]) -> str:  # stamp: the files' mtime and size
    digest = hashlib.sha256()
    headers: dict[str, tuple[dict, int]] = {}
    for name, file in names:
        if file not in headers:
            headers[file] = _header(Path(file))
        header, base = headers[file]
        info = header[name]
        start, end = info["data_offsets"]
        digest.update(f"{name} {info['dtype']} {info['shape']}\n".encode())
        if feed_file(digest, file, base + start, end - start) != end - start:
            raise ParScaleError(f"cannot read {Path(file).name}: tensor {name} is cut short")
    return digest.hexdigest()


def check_head_file(folder: Path, P: int) -> list[str]:  # noqa: N803
    """The tensor names of `folder`'s heads-p{P}.safetensors, after checking that it is a head set of
    exactly that P (its metadata) bound to this folder's backbone (its fingerprint) holding only
    prefix and aggregation tensors; a ParScaleError names what is wrong."""
    path = folder / HEADS_FILE.format(P)
    names = _keys(path)
    backbone = [n for n in names if not is_head_tensor(n)]
    if backbone:
        raise ParScaleError(f"{path} holds backbone tensor {backbone[0]}"
                            f"{f' and {len(backbone) - 1} more' if len(backbone) > 1 else ''}: a head set holds "
                            "only prefix and aggregation tensors; the backbone comes from model.safetensors")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ParScaleError(f"cannot read {path.name}: {e}") from None
    if meta.get("parscale_n") != str(P):
        raise ParScaleError(f"{path} is a head set for P={meta.get('parscale_n')} (its metadata), not P={P}: "
                            "it was renamed or copied from elsewhere")
    fingerprint = meta.get(BACKBONE_KEY)
    retrain = f"retrain it on this backbone with `parscale train-heads {folder} --P {P} --force`"
    if fingerprint is None:
        raise ParScaleError(f"{path} records no backbone fingerprint (written before head sets were bound to "
                            f"their backbone), so it cannot be checked against {folder}'s backbone; {retrain}")
    if fingerprint != backbone_fingerprint(folder):
        raise ParScaleError(f"{path} was trained on another backbone (its fingerprint does not match the tensors "
                            f"of {folder}'s backbone): copied from another checkpoint, or the backbone changed "
                            f"since; {retrain}")
    return names


@dataclass(frozen=True)
class Stream:
    """One P to load: from `folder`'s own checkpoint or one of its head sets.

    `config`: the folder's config.json as written (its own parscale_n), when already read; carried so
    that the folder's config is read once however many P it serves."""

    folder: Path
    P: int
    config: ParScaleConfig | None = field(default=None, compare=False, repr=False)

    def own_config(self) -> ParScaleConfig:
        """The folder's config.json as written (not at this P: `.at(P)` gives that)."""
        return self.config if self.config is not None else ParScaleConfig.load(self.folder)


def load_streams(
    streams: list[Stream], dtype: torch.dtype = torch.float32
) -> dict[int, tuple[ParScaleConfig, ParScaleForCausalLM]]:
    """Load each stream count's module; the backbone tensors are read once and shared by all modules.

    Streams from different folders must have identical backbones (same config but parscale_n, same
    tensors by content): otherwise a ParScaleError names the first config field or tensor that differs.
    """
    Streams(tuple(s.P for s in streams))  # at least one P, each once
    for s in streams:
        check_folder(s.folder, "model folder")
    first = streams[0]
    own = _own_configs(streams)
    cfgs = {s.P: own[s.P].at(s.P) for s in streams}
    for s in streams[1:]:
        _check_same_config(first.folder, own[first.P], s.folder, own[s.P])
    sources = {s.P: _sources(s.folder, own[s.P], s.P) for s in streams}
    backbone_names = [n for n in sources[first.P] if not is_head_tensor(n)]
    backbone = read_weights(sources[first.P], backbone_names, dtype)
    for s in streams[1:]:
        if s.folder.resolve() != first.folder.resolve():
            _check_same_backbone(first.folder, backbone, s.folder, sources[s.P], backbone_names)
    out = {}
    for s in streams:
        heads = read_weights(sources[s.P], [n for n in sources[s.P] if is_head_tensor(n)], dtype)
        state = backbone | heads
        check_shapes(cfgs[s.P], {n: tuple(t.shape) for n, t in state.items()})
        out[s.P] = (cfgs[s.P], module_from_state(cfgs[s.P], state))
    return out


def _own_configs(streams: Sequence[Stream]) -> dict[int, ParScaleConfig]:
    """P -> its folder's config.json as written, each folder's read once (or taken from its Stream)."""
    by_folder: dict[Path, ParScaleConfig] = {}
    for s in streams:
        if s.config is not None:
            by_folder.setdefault(s.folder.resolve(), s.config)
    for s in streams:
        if s.folder.resolve() not in by_folder:
            by_folder[s.folder.resolve()] = ParScaleConfig.load(s.folder)
    return {s.P: by_folder[s.folder.resolve()] for s in streams}


_SAME_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
                "max_position_embeddings", "tie_word_embeddings", "parscale_n_tokens", "parscale_attn_smooth")


def _check_same_config(a: Path, cfg_a: ParScaleConfig, b: Path, cfg_b: ParScaleConfig) -> None:
    for name in _SAME_FIELDS:
        if getattr(cfg_a, name) != getattr(cfg_b, name):
            raise ParScaleError(
                f"{b} and {a} are not the same backbone: {name} is {getattr(cfg_b, name)!r} in {b}/config.json "
                f"and {getattr(cfg_a, name)!r} in {a}/config.json; a multi-P export needs head sets trained on one "
                "frozen backbone"
            )


def _check_same_backbone(a: Path, backbone: dict[str, torch.Tensor], b: Path, sources: dict[str, Path],
                         names: list[str]) -> None:
    """Compare `b`'s backbone with the one loaded from `a`, tensor by tensor (one in memory at a time)."""
    missing = [n for n in names if n not in sources]
    if missing:
        raise ParScaleError(f"{b} and {a} are not the same backbone: {b} lacks tensor {missing[0]}")
    for path in sorted({sources[n] for n in names}):
        for name, t in _read_tensors(path, [n for n in names if sources[n] == path]):
            if not torch.equal(t.to(backbone[name].dtype), backbone[name]):
                raise ParScaleError(
                    f"{b} and {a} are not the same backbone: tensor {name} differs; a multi-P export needs "
                    "head sets trained on one frozen backbone (parscale train-heads adds them to one checkpoint)"
                )


def save_heads(model: ParScaleForCausalLM, folder: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write `model`'s head set into `folder` as heads-p{P}.safetensors (atomically: a temporary file
    renamed into place), bound to the folder's backbone."""
    state = {n: t.detach().to(dtype).contiguous() for n, t in model.state_dict().items() if is_head_tensor(n)}
    return write_heads(folder, model.cfg.P, state)


def write_heads(folder: str | Path, P: int, state: dict[str, torch.Tensor]) -> Path:  # noqa: N803
    """Write one head set (the tensors of P streams that are not the backbone) as heads-p{P}.safetensors,
    atomically, recording the fingerprint of `folder`'s backbone (`backbone_fingerprint`)."""
    if P < 2:
        raise ParScaleError("P=1 is the backbone alone: it has no head set")
    backbone = [n for n in state if not is_head_tensor(n)]
    if backbone:
        raise ParScaleError(f"a head set holds only prefix and aggregation tensors, not {backbone[0]}")
    folder = Path(folder)
    path = folder / HEADS_FILE.format(P)
    metadata = {"format": "pt", "parscale_n": str(P), BACKBONE_KEY: backbone_fingerprint(folder)}
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=folder)  # O_EXCL: never someone's file
    os.close(fd)
    tmp = Path(name)
    try:
        save_file(state, tmp, metadata=metadata)
        tmp.chmod(0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def resolve_streams(folders: Sequence[Path], streams: Streams | None) -> list[Stream]:
    """The streams an export asks for, checked before any weight is read; each folder's config.json is
    read once here and carried in its Streams.

    One folder: `streams` (one P or several, from its own checkpoint and head sets; None: its
    parscale_n). Several folders: each gives its own parscale_n, and `streams` must be None.
    """
    for folder in folders:
        check_folder(folder, "model folder")
    if len(folders) > 1:
        if streams is not None:
            raise ParScaleError("with several checkpoints each gives its own P (its parscale_n): leave --P out")
        found = [Stream(f, cfg.P, cfg) for f in folders for cfg in [ParScaleConfig.load(f)]]
        try:
            Streams(tuple(s.P for s in found))
        except ParScaleError as e:
            held = ", ".join(f"{s.folder} holds P={s.P}" for s in found)
            raise ParScaleError(f"{e} ({held}): give each P once") from None
    else:
        folder = folders[0]
        own = ParScaleConfig.load(folder)
        have = head_sets(folder, own)
        wanted = streams if streams is not None else Streams((own.P,))
        for p in wanted:
            if p not in have:
                raise ParScaleError(
                    f"{folder} has no head set for P={p}: it holds P = {', '.join(map(str, have))}; pass one of "
                    f"those, or train one on its frozen backbone with `parscale train-heads {folder} --P {p}`")
        found = [Stream(folder, p, own) for p in wanted]
    return sorted(found, key=lambda s: s.P)


def streams_checksum(streams: Sequence[Stream]) -> str:
    """sha256 tying an export to its sources: the checkpoint's own (`source_checksum`) for a folder's own P;
    for head sets or several folders, over each P's folder checksum and head file."""
    if len(streams) == 1 and streams[0].P == streams[0].own_config().P:
        return source_checksum(streams[0].folder)
    folders = {s.folder.resolve(): source_checksum(s.folder) for s in streams}
    digest = hashlib.sha256()
    own = _own_configs(streams)
    for s in streams:
        digest.update(f"P={s.P} {folders[s.folder.resolve()]}\n".encode())
        heads = s.folder / HEADS_FILE.format(s.P)
        if s.P != own[s.P].P and heads.is_file():
            digest.update(file_digest(heads).encode())
    return digest.hexdigest()
