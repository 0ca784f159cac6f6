"""The paper's headline on this CPU: what P streams cost in memory and latency next to parameter scaling.

    python -m benchmarks.scaling [--preset qwen2.5-0.5b] [--quant int8 int4] [--rounds 5] [--threads 2]
                                 [--batch 1 4] [--work /tmp/parscale-scaling] [--results benchmarks/results]
    python -m benchmarks.scaling --rewrite       # scaling.md and scaling.png again from scaling.json

ParScale (Chen et al. 2025, arXiv 2505.10475) fits, in Section 3.2 (Equation 5),

    L = (A / (N (k ln P + 1)))^alpha + E          (N: non-embedding parameters, P: streams)

so P streams on N parameters reach the loss of a dense model with N (k ln P + 1) parameters. This
script builds, for one backbone, random checkpoints at P = 1, 2, 4, 8 and the dense (P=1) models
the law says match each P (same code path, `parscale.modeling.init`), exports every one with
`parscale export` (int8; int4 by round-to-nearest, whose bytes and graph are those of the GPTQ
default), and measures each export in its own process with our runtime, interleaved over
`--rounds` rounds: decode ms/step and prefill tokens/s at batch 1 and 4, the latency of the whole
call (prompt `--prompt-len`, `--gen` new tokens: the paper's 64/64 by default), peak RSS while
generating, files on disk, and the KV cache at a 1k-token context computed from the config. It
then sets the memory and latency increase of each P over its P=1 backbone against the increase
of the quality-equivalent dense model, beside the paper's figures, and writes
`scaling.{json,md,png}` into `--results`. Checkpoints and exports are cached in `--work`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from benchmarks.report import machine

HERE = Path(__file__).resolve().parent
PY = sys.executable
PARSCALE = [PY, "-m", "parscale"]
STREAMS = (1, 2, 4, 8)
KV_CONTEXT = 1024

# --------------------------------------------------------------------------------------------------
# The paper's numbers, with where they come from.
#
# Text (arXiv 2505.10475): abstract: "ParScale can use up to 22x less memory increase and 6x less
# latency increase compared to parameter scaling that achieves the same performance improvement";
# Section 3.3 / Figure 4 / Figure 1(3): for the 1.6B model at P=8 and batch size 1 (the authors'
# README, github.com/QwenLM/ParScale: "... (batch size=1)"). Section 3.2: k = 0.39 on Stack-V2
# Python and 0.33 on the Pile, R^2 0.9978 / 0.9987. Table 2 (downstream coding after 42B tokens):
# the 1.6B model at P=8 matches the 4.4B dense model's coding scores; on general tasks (Table 3)
# only the 2.8B one. That 4.4B is a benchmark equivalence, not the law's.
#
# The constants below were computed by us from the authors' own code and data, because the paper
# prints k to two digits only: `parametric_fit.py` of QwenLM/ParScale (commit cd6acb4) holds the
# 48 training losses (6 sizes x P = 1, 2, 4, 8, 42B tokens each) and the non-embedding parameter
# counts; running its fit (Huber loss on log L, L-BFGS-B over its grid of starts) gives these, with
# R^2 0.9978 (Stack-V2 Python) and 0.9987 (Pile), the paper's values. `cost_analysis.py` of the same
# commit (llm-analysis, github.com/cli99/llm-analysis at d841e40: an A100-80GB model with 70 % FLOPs
# and 90 % HBM efficiency, 16-bit weights) gives the inference costs; Figure 4 averages them over
# input = output lengths 64, 128, 256, 512, and interpolating its loss-vs-cost curves with the
# Stack-V2 losses reproduces the headline: 22.5x memory and 6.4x latency at P=8, batch 1
# (`paper_ratios`). Nothing here was measured by us on a GPU.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fit:
    """One fit of L = (A / (N (k ln P + 1)))^alpha + E (N non-embedding parameters, natural log)."""

    dataset: str
    E: float
    A: float
    alpha: float
    k: float
    r2: float

    def loss(self, n: float, P: int) -> float:  # noqa: N803
        return (self.A / (n * (self.k * math.log(P) + 1))) ** self.alpha + self.E


FITS = {
    "stack-v2-python": Fit("Stack-V2 Python", E=0.69123678, A=1.130616e7, alpha=0.18937067, k=0.39346300, r2=0.9978),
    "pile": Fit("Pile", E=1.28876563, A=1.9735203e8, alpha=0.19633308, k=0.33445557, r2=0.9987),
}
DEFAULT_FIT = "stack-v2-python"  # the data set of Figure 4 and of the 22x / 6x headline

# The scaling-law models (36 layers, 16 heads, 2 KV heads, tied embeddings, vocabulary 151,936):
# widths recovered from the parameter counts of parametric_fit.py, which the library reproduces
# exactly (tests/test_scaling.py). Labels are the paper's (non-embedding) sizes.
PAPER_LAYERS, PAPER_HEADS, PAPER_KV_HEADS = 36, 16, 2
PAPER_SHAPES: dict[str, tuple[int, int]] = {  # label -> (hidden_size, intermediate_size)
    "0.5B": (896, 4864), "0.7B": (1024, 5504), "1.1B": (1280, 6912),
    "1.6B": (1536, 8320), "2.8B": (2048, 11008), "4.4B": (2560, 13824),
}
PAPER_PARAMS: dict[str, tuple[int, ...]] = {  # non-embedding parameters at P = 1, 2, 4, 8
    "0.5B": (535813376, 538195842, 540577412, 545340552),
    "0.7B": (693753856, 696738818, 699722756, 705690632),
    "1.1B": (1088376320, 1092762882, 1097148164, 1105918728),
    "1.6B": (1571472384, 1577522690, 1583571460, 1595669000),
    "2.8B": (2774773760, 2784937986, 2795100164, 2815424520),
    "4.4B": (4353203200, 4368529922, 4383854084, 4414502408),
}
PAPER_LOSS: dict[str, dict[str, tuple[float, ...]]] = {  # final training loss at P = 1, 2, 4, 8
    "stack-v2-python": {
        "0.5B": (1.1722, 1.1507, 1.1354, 1.1231), "0.7B": (1.1496, 1.1262, 1.1124, 1.0997),
        "1.1B": (1.1131, 1.094, 1.0808, 1.0688), "1.6B": (1.0817, 1.0623, 1.049, 1.0383),
        "2.8B": (1.0451, 1.0244, 1.0126, 1.0016), "4.4B": (1.0213, 1.0025, 0.9906, 0.9794),
    },
    "pile": {
        "0.5B": (2.1113, 2.0772, 2.0544, 2.0364), "0.7B": (2.0671, 2.0363, 2.0128, 1.9933),
        "1.1B": (2.0027, 1.973, 1.9509, 1.9318), "1.6B": (1.9539, 1.9266, 1.904, 1.8856),
        "2.8B": (1.8876, 1.861, 1.8394, 1.8218), "4.4B": (1.8451, 1.8137, 1.7938, 1.7772),
    },
}
# cost_analysis.py's "Memory: X GB; Latency: Y s" (GiB, seconds) at input = output = 64, 128, 256, 512.
PAPER_COST: dict[int, dict[tuple[str, int], list[tuple[float, float]]]] = {
    1: {
        ("0.5B", 1): [(1.272, 0.048), (1.292, 0.095), (1.332, 0.192), (1.412, 0.388)],
        ("0.7B", 1): [(1.602, 0.061), (1.623, 0.121), (1.663, 0.242), (1.744, 0.49)],
        ("1.1B", 1): [(2.41, 0.091), (2.431, 0.182), (2.473, 0.365), (2.556, 0.737)],
        ("1.6B", 1): [(3.383, 0.128), (3.404, 0.256), (3.447, 0.513), (3.533, 1.033)],
        ("2.8B", 1): [(5.77, 0.219), (5.793, 0.436), (5.838, 0.875), (5.928, 1.76)],
        ("4.4B", 1): [(8.856, 0.337), (8.88, 0.67), (8.927, 1.343), (9.022, 2.698)],
        ("1.6B", 2): [(3.411, 0.131), (3.436, 0.261), (3.485, 0.523), (3.584, 1.061)],
        ("1.6B", 4): [(3.429, 0.135), (3.46, 0.268), (3.523, 0.542), (3.648, 1.112)],
        ("1.6B", 8): [(3.465, 0.144), (3.509, 0.284), (3.598, 0.578), (3.776, 1.214)],
    },
    4: {
        ("0.5B", 1): [(1.332, 0.05), (1.412, 0.1), (1.572, 0.205), (1.893, 0.429)],
        ("0.7B", 1): [(1.663, 0.063), (1.744, 0.126), (1.907, 0.258), (2.232, 0.537)],
        ("1.1B", 1): [(2.473, 0.094), (2.556, 0.19), (2.723, 0.386), (3.057, 0.799)],
        ("1.6B", 1): [(3.447, 0.132), (3.533, 0.266), (3.704, 0.54), (4.047, 1.112)],
        ("2.8B", 1): [(5.838, 0.225), (5.928, 0.453), (6.108, 0.916), (6.468, 1.874)],
        ("4.4B", 1): [(8.927, 0.345), (9.022, 0.694), (9.21, 1.4), (9.588, 2.853)],
        ("1.6B", 2): [(3.533, 0.144), (3.632, 0.286), (3.83, 0.581), (4.225, 1.22)],
        ("1.6B", 4): [(3.579, 0.162), (3.704, 0.318), (3.954, 0.655), (4.455, 1.425)],
        ("1.6B", 8): [(3.669, 0.196), (3.847, 0.382), (4.202, 0.801), (4.914, 1.834)],
    },
}
PAPER_STATED = {"backbone": "1.6B", "P": 8, "batch": 1, "memory_ratio": 22.0, "latency_ratio": 6.0,
                "source": "arXiv 2505.10475, abstract and Section 3.3 (Figure 4, Figure 1(3)); batch size 1"}


def equivalent_params(n: float, P: int, k: float) -> float:  # noqa: N803
    """Non-embedding parameters of the dense model whose loss P streams on `n` match: n (k ln P + 1)."""
    return n * (k * math.log(P) + 1)


def _interpolate(points: list[tuple[float, float, float, float]], x: float, along: int) -> tuple[float, ...]:
    """Piecewise-linear interpolation of (n, loss, memory, latency) rows at value x of column `along`."""
    for a, b in itertools.pairwise(points):
        lo, hi = sorted((a[along], b[along]))
        if lo <= x <= hi:
            f = (x - a[along]) / (b[along] - a[along])
            return tuple(u + f * (v - u) for u, v in zip(a, b, strict=True))
    raise ValueError(f"{x} lies outside the paper's models")


def paper_ratios(batch: int, equivalence: str = "loss", fit: str = DEFAULT_FIT) -> dict[int, dict[str, float]]:
    """The paper's cost model for the 1.6B backbone at P = 2, 4, 8: increases over P=1 and their ratios.

    equivalence "loss": the dense model of equal measured loss (Figure 4's curves, interpolated);
    "law": the dense model with equivalent_params() non-embedding parameters (what we build here).
    Costs are averaged over the four lengths, as Figure 4 does; dense costs interpolated in N.
    """
    cost = {key: (statistics.fmean(m for m, _ in v), statistics.fmean(t for _, t in v))
            for key, v in PAPER_COST[batch].items()}
    dense = [(PAPER_PARAMS[s][0], PAPER_LOSS[fit][s][0], *cost[(s, 1)]) for s in PAPER_SHAPES]
    base_mem, base_lat = cost[("1.6B", 1)]
    out: dict[int, dict[str, float]] = {}
    for i, P in enumerate(STREAMS[1:], start=1):
        if equivalence == "loss":
            n_eq, _, mem, lat = _interpolate(dense, PAPER_LOSS[fit]["1.6B"][i], along=1)
        else:
            n_eq = equivalent_params(PAPER_PARAMS["1.6B"][i], P, FITS[fit].k)
            _, _, mem, lat = _interpolate(dense, n_eq, along=0)
        par_mem, par_lat = cost[("1.6B", P)]
        out[P] = {
            "equivalent_params": n_eq, "x": n_eq / PAPER_PARAMS["1.6B"][0],
            "parscale_memory_pct": 100 * (par_mem - base_mem) / base_mem,
            "dense_memory_pct": 100 * (mem - base_mem) / base_mem,
            "parscale_latency_pct": 100 * (par_lat - base_lat) / base_lat,
            "dense_latency_pct": 100 * (lat - base_lat) / base_lat,
            "memory_ratio": (mem - base_mem) / (par_mem - base_mem),
            "latency_ratio": (lat - base_lat) / (par_lat - base_lat),
        }
    return out


# --------------------------------------------------------------------------------------------------
# Shapes: the backbone of each preset, and the dense models the law says match it at each P.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """How a backbone's dense relatives are shaped.

    base: the `parscale init` preset the config starts from (vocabulary, RoPE, tied embeddings);
    backbone: config keys replacing the preset's for the P=1 backbone; keep: "head_dim" (Qwen2.5:
    heads grow with the width) or "heads" (the paper's models: 16 heads at every width); listed:
    published shapes, used as they are when within `LISTED_TOLERANCE` of the target.
    """

    base: str
    backbone: tuple[tuple[str, Any], ...] = ()
    keep: str = "head_dim"
    listed: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()


LISTED_TOLERANCE = 0.05


def _paper_overrides(label: str) -> tuple[tuple[str, Any], ...]:
    h, i = PAPER_SHAPES[label]
    return (("hidden_size", h), ("intermediate_size", i), ("num_hidden_layers", PAPER_LAYERS),
            ("num_attention_heads", PAPER_HEADS), ("num_key_value_heads", PAPER_KV_HEADS))


def _qwen_listed() -> tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]:
    from parscale.modeling.init import PRESETS

    return tuple((f"Qwen2.5-{name.split('-')[1].upper()} shape", tuple(PRESETS[name].items()))
                 for name in ("qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b"))


def families() -> dict[str, Family]:
    """Backbones this script takes (`--preset`): the Qwen2.5 presets, `tiny`, and the paper's models."""
    out = {"tiny": Family("tiny")}
    for name in ("qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b"):
        out[name] = Family(name, listed=_qwen_listed())
    paper = tuple((f"paper's {label} model (36 layers)", _paper_overrides(label)) for label in PAPER_SHAPES)
    for label in PAPER_SHAPES:
        out[f"paper-{label.lower()}"] = Family("qwen2.5-0.5b", _paper_overrides(label), keep="heads", listed=paper)
    return out


def config_for(family: Family, P: int, overrides: dict[str, Any] | None = None, prefix: int = 48) -> dict[str, Any]:  # noqa: N803
    """The config.json dict `parscale.modeling.init` writes for this shape."""
    from parscale.modeling.init import make_config

    return make_config(family.base, P=P, prefix=prefix, **{**dict(family.backbone), **(overrides or {})})


@cache
def _counts(config_json: str) -> tuple[int, int]:
    from parscale.config import ParScaleConfig
    from parscale.modeling.checkpoint import expected_shapes

    shapes = expected_shapes(ParScaleConfig.from_dict(json.loads(config_json)))
    total = sum(math.prod(s) for s in shapes.values())
    embedding = sum(math.prod(s) for n, s in shapes.items() if n in ("model.embed_tokens.weight", "lm_head.weight"))
    return total - embedding, total


def non_embedding_params(config: dict[str, Any]) -> int:
    """Parameters of the module `config` builds, less the embedding table and LM head (the paper's N).

    ParScale's prefixes and aggregation MLP count, as in the paper's fits."""
    return _counts(json.dumps(config, sort_keys=True))[0]


def total_params(config: dict[str, Any]) -> int:
    return _counts(json.dumps(config, sort_keys=True))[1]


@dataclass
class Shape:
    """A dense model's shape: config keys over the family's base preset, and how it was chosen."""

    label: str
    kind: str  # "backbone", "published shape" or "nearest shape (width)" / "nearest shape (depth)"
    overrides: dict[str, Any]
    non_embedding: int
    total: int


def dense_shape(family: Family, target: float, mode: str = "width", prefix: int = 48) -> Shape:
    """The P=1 model closest to `target` non-embedding parameters in this family.

    A listed (published) shape within 5 % is taken as it is. Otherwise "width" widens the backbone
    at its depth, as the paper's scaling-law models do (36 layers, width varied): hidden in steps
    that keep head_dim (or the head count) and GQA valid, intermediate in steps of up to 64, the
    backbone's intermediate/hidden ratio kept as closely as the two roundings allow; "depth" adds
    layers at the backbone's width instead.
    """
    for label, ov in family.listed:
        cfg = config_for(family, 1, {**dict(family.backbone), **dict(ov)}, prefix)
        n = non_embedding_params(cfg)
        if abs(n / target - 1) <= LISTED_TOLERANCE:
            return Shape(label, "published shape", {**dict(family.backbone), **dict(ov)}, n, total_params(cfg))
    base = config_for(family, 1, prefix=prefix)
    h0, i0, layers0 = base["hidden_size"], base["intermediate_size"], base["num_hidden_layers"]
    heads0, kv = base["num_attention_heads"], base["num_key_value_heads"]
    hd0 = base.get("head_dim") or h0 // heads0
    step_i = math.gcd(i0, 64)

    def shape(h: int, i: int, layers: int) -> dict[str, Any]:
        heads = h // hd0 if family.keep == "head_dim" else heads0
        return {**dict(family.backbone), "hidden_size": h, "intermediate_size": i, "num_hidden_layers": layers,
                "num_attention_heads": heads, "num_key_value_heads": kv}

    def n_of(ov: dict[str, Any]) -> int:
        return non_embedding_params(config_for(family, 1, ov, prefix))

    if mode == "depth":
        one, two = n_of(shape(h0, i0, 1)), n_of(shape(h0, i0, 2))
        layers = max(1, round((target - (2 * one - two)) / (two - one)))
        ov = shape(h0, i0, layers)
        cfg = config_for(family, 1, ov, prefix)
        return Shape(f"backbone with {layers} layers", "nearest shape (depth)", ov, n_of(ov), total_params(cfg))
    if mode != "width":
        raise ValueError(f"mode must be width or depth, got {mode!r}")
    step_h = kv * hd0 if family.keep == "head_dim" else 2 * heads0  # GQA groups whole; even head_dim
    ratio = i0 / h0

    def fitted_i(h: int) -> int:
        """The intermediate size (a multiple of step_i) that brings width h closest to the target."""
        a, b = n_of(shape(h, step_i, layers0)), n_of(shape(h, 2 * step_i, layers0))
        per_step = b - a
        return max(step_i, step_i * round(1 + (target - a) / per_step))

    h = h0
    while n_of(shape(h, step_i * round(ratio * h / step_i), layers0)) < target and h < 8 * h0:
        h += step_h
    candidates = [c for c in {max(step_h, h - step_h), h} if c >= step_h]
    best = min(candidates, key=lambda c: abs(math.log(fitted_i(c) / c / ratio)))
    ov = shape(best, fitted_i(best), layers0)
    cfg = config_for(family, 1, ov, prefix)
    return Shape(f"backbone widened to hidden {best}, intermediate {ov['intermediate_size']}",
                 "nearest shape (width)", ov, n_of(ov), total_params(cfg))


def kv_cache_bytes(config: dict[str, Any], context: int = KV_CONTEXT, bytes_per: int = 4) -> int:
    """The KV cache at `context` tokens, batch 1: layers x (key, value) x P*Hkv heads x head_dim x tokens."""
    heads = config["num_attention_heads"]
    hd = config.get("head_dim") or config["hidden_size"] // heads
    heads_cached = config["parscale_n"] * config["num_key_value_heads"]
    return config["num_hidden_layers"] * 2 * heads_cached * hd * context * bytes_per


def prefix_bytes(config: dict[str, Any], bytes_per: int = 4) -> int:
    """ParScale's prefix keys/values: P * parscale_n_tokens extra entries per KV head and layer.

    Our graph holds them as float constants (in the files on disk), not in the cache; the paper's
    cost model counts them as 48 more cached tokens per stream."""
    if config["parscale_n"] == 1:
        return 0
    return kv_cache_bytes(config, config["parscale_n_tokens"], bytes_per)


# --------------------------------------------------------------------------------------------------
# Systems, their checkpoints and exports.
# --------------------------------------------------------------------------------------------------


@dataclass
class System:
    name: str  # "ParScale P=4" or "dense for P=4"
    kind: str  # "parscale" or "dense"
    P: int  # the P whose cost it shows (the dense model itself runs at P=1)
    config: dict[str, Any]
    shape: Shape
    equivalent_params: float  # quality-equivalent non-embedding parameters (the law)
    slug: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)


def systems_for(preset: str, fit: Fit, mode: str = "width", prefix: int = 48) -> list[System]:
    fam = families()[preset]
    out: list[System] = []
    for P in STREAMS:
        cfg = config_for(fam, P, prefix=prefix)
        n = non_embedding_params(cfg)
        shape = Shape(preset, "backbone", dict(fam.backbone), n, total_params(cfg))
        out.append(System(f"ParScale P={P}", "parscale", P, cfg, shape, equivalent_params(n, P, fit.k),
                          slug=f"p{P}", overrides=dict(fam.backbone)))
    for s in out[1:]:
        shape = dense_shape(fam, s.equivalent_params, mode, prefix)
        ov = shape.overrides
        slug = "dense-" + "-".join(f"{k[0]}{ov.get(n, '')}" for k, n in
                                   (("h", "hidden_size"), ("i", "intermediate_size"), ("l", "num_hidden_layers")))
        out.append(System(f"dense for P={s.P}", "dense", s.P, config_for(fam, 1, ov, prefix), shape,
                          s.equivalent_params, slug=slug, overrides=ov))
    return out


def sh(cmd: list[str]) -> str:
    """Run a command from the repository root; return its stdout; on failure show its output and stop."""
    print("$", " ".join(str(c) for c in cmd), flush=True)
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=HERE.parent)
    if r.returncode:
        sys.stderr.write(r.stdout[-3000:] + r.stderr[-3000:])
        raise SystemExit(f"failed ({r.returncode}): {' '.join(str(c) for c in cmd)}")
    return r.stdout


SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "parscale_n", "parscale_n_tokens", "tie_word_embeddings")


def _same_shape(folder: Path, config: dict[str, Any]) -> bool:
    try:
        have = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return all(have.get(k) == config.get(k) for k in SHAPE_KEYS)


EXPORT_FLAGS = {"fp32": [], "int8": ["--int8"], "int4": ["--int4", "--method", "rtn"]}


def prepare(systems: list[System], preset: str, quants: list[str], work: Path,
            drop_checkpoints: bool = False) -> dict[tuple[str, str], Path]:
    """Checkpoints and exports, built once and reused while their shape matches: {(system, quant): export}.

    A checkpoint is made only when one of its exports is missing; `drop_checkpoints` deletes it once
    its exports exist (they are all the study reads: 8 GB of bf16 checkpoints at 0.5B, 27 GB at 1.5B).
    """
    fam = families()[preset]
    exports: dict[tuple[str, str], Path] = {}
    for s in systems:
        ckpt = work / preset / f"ckpt-{s.slug}"
        outs = {q: work / preset / f"export-{s.slug}-{q}" for q in quants}
        missing = [q for q, out in outs.items()
                   if not ((out / "parscale.json").is_file() and _same_shape(out, s.config))]
        if missing and not _same_shape(ckpt, s.config):
            if s.overrides:  # not a preset: the library's init with the shape's config keys
                sh([PY, "-m", "benchmarks.scaling", "_init", ckpt, "--base", fam.base, "--P", s.config["parscale_n"],
                    "--prefix", s.config["parscale_n_tokens"], "--overrides", json.dumps(s.overrides)])
            else:
                sh([*PARSCALE, "init", ckpt, "--preset", preset, "--P", s.config["parscale_n"],
                    "--prefix", s.config["parscale_n_tokens"], "--force"])
        for q in missing:
            # --no-validate: exactness is the test suite's job; only cost is measured here.
            sh([*PARSCALE, "export", ckpt, "-o", outs[q], "--P", s.config["parscale_n"], "--force", "--no-validate",
                *EXPORT_FLAGS[q]])
        if drop_checkpoints and ckpt.is_dir():
            shutil.rmtree(ckpt)
        exports.update({(s.name, q): out for q, out in outs.items()})
    return exports


# --------------------------------------------------------------------------------------------------
# One measurement, in a fresh process (`_measure`).
# --------------------------------------------------------------------------------------------------


def measure_export(path: Path, batch: int, prompt_len: int, gen: int, threads: int) -> dict[str, Any]:
    """Load, warm up with the same batch, then time one greedy call of `batch` prompts (EOS ignored).

    Peak RSS is the kernel's high-water mark reset after the warm-up: the memory of generating,
    weights included (what `parscale bench` reports, for any batch).
    """
    from benchmarks.common import peak_rss_mb, prompt_ids, reset_peak_rss
    from parscale.runtime import Model

    t0 = time.perf_counter()
    m = Model.load(path, provider="cpu", threads=threads, verify=False)
    load_s = time.perf_counter() - t0
    prompts = [prompt_ids(m.vocab_size, prompt_len, seed=row) for row in range(batch)]
    m.generate(prompts, max_new_tokens=min(gen, 4), ignore_eos=True)
    hwm = reset_peak_rss()
    t0 = time.perf_counter()
    results = m.generate(prompts, max_new_tokens=gen, ignore_eos=True)
    wall = time.perf_counter() - t0
    assert isinstance(results, list)
    t = results[0].timings
    return {
        "P": m.P, "batch": batch, "prompt_len": prompt_len, "gen": gen, "threads": threads, "load_s": load_s,
        "latency_s": wall, "time_to_first_token_s": t.time_to_first_token_s,
        "prefill_tokens_per_s": t.prefill_tokens_per_s, "decode_ms_per_step": t.decode_ms_per_token,
        "generate_peak_rss_mb": peak_rss_mb() if hwm else -1.0, "files_bytes": m.manifest.total_bytes,
    }


def run_measure(path: Path, batch: int, prompt_len: int, gen: int, threads: int) -> dict[str, Any]:
    load = os.getloadavg()[0]
    out = sh([PY, "-m", "benchmarks.scaling", "_measure", path, "--batch", batch, "--prompt-len", prompt_len,
              "--gen", gen, "--threads", threads])
    return {**json.loads(out.strip().splitlines()[-1]), "load_avg_1min": load}


# --------------------------------------------------------------------------------------------------
# Analysis, tables and the plot (pure: tests feed them synthetic measurements).
# --------------------------------------------------------------------------------------------------

METRICS = ("decode_ms_per_step", "prefill_tokens_per_s", "latency_s", "time_to_first_token_s",
           "generate_peak_rss_mb", "files_bytes", "load_avg_1min")


def medians(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per key ("system|quant|batch"), the median of every metric over the rounds (each on its own)."""
    return {key: {m: statistics.median(r[m] for r in rs) for m in METRICS} | {"rounds": len(rs)}
            for key, rs in runs.items() if rs}


def key_of(system: str, quant: str, batch: int) -> str:
    return f"{system}|{quant}|{batch}"


def increases(med: dict[str, dict[str, Any]], quants: list[str], batches: list[int],
              kv_per_token: dict[str, int] | None = None, tokens: int = 0) -> list[dict[str, Any]]:
    """Each P's increase over its P=1 backbone against its dense equivalent's, per quant and batch.

    With `kv_per_token` (KV-cache bytes per token and sequence, by system) and `tokens` (prompt +
    generated, what the measured cache held), also the memory increase at a KV_CONTEXT-token
    context, estimated: measured peak RSS plus the cache's growth from `tokens` to KV_CONTEXT.
    """
    rows = []
    for q in quants:
        for b in batches:
            for P in STREAMS[1:]:
                names = ["ParScale P=1", f"ParScale P={P}", f"dense for P={P}"]
                base, par, den = (med.get(key_of(n, q, b)) for n in names)
                if not (base and par and den):
                    continue
                row: dict[str, Any] = {"P": P, "quant": q, "batch": b}
                for name, metric in (("memory", "generate_peak_rss_mb"), ("latency", "latency_s"),
                                     ("decode", "decode_ms_per_step"), ("files", "files_bytes")):
                    p_inc, d_inc = par[metric] - base[metric], den[metric] - base[metric]
                    row[f"{name}_parscale"], row[f"{name}_dense"] = p_inc, d_inc
                    row[f"{name}_parscale_pct"] = 100 * p_inc / base[metric]
                    row[f"{name}_dense_pct"] = 100 * d_inc / base[metric]
                    row[f"{name}_ratio"] = d_inc / p_inc if p_inc > 0 else None
                if kv_per_token and all(n in kv_per_token for n in names):
                    grow = {n: b * kv_per_token[n] * (KV_CONTEXT - tokens) / 1e6 for n in names}
                    peaks = (base["generate_peak_rss_mb"], par["generate_peak_rss_mb"], den["generate_peak_rss_mb"])
                    at_1k = {n: peak + grow[n] for n, peak in zip(names, peaks, strict=True)}
                    p_inc, d_inc = at_1k[names[1]] - at_1k[names[0]], at_1k[names[2]] - at_1k[names[0]]
                    row["memory_1k_parscale"], row["memory_1k_dense"] = p_inc, d_inc
                    row["memory_1k_ratio"] = d_inc / p_inc if p_inc > 0 else None
                rows.append(row)
    return rows


def _n(n: float) -> str:
    """A parameter count: 86.6 k, 357.9 M, 1.572 B."""
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:,.1f} M" if n >= 1e6 else f"{n / 1e3:,.1f} k"


def _num(x: float) -> str:
    """A measured figure: whole numbers from 100 up, else three significant digits."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _mb(n_bytes: float) -> str:
    return f"{n_bytes / 1e6:,.0f}" if n_bytes >= 100e6 else f"{n_bytes / 1e6:.2f}"


def _ratio(x: float | None) -> str:
    return "n/a (ParScale increase <= 0)" if x is None else f"{x:.1f}x"


def markdown(report: dict[str, Any]) -> str:
    meta, fit = report["meta"], FITS[report["meta"]["fit"]]
    lines = [
        "# Scaling: P streams against parameters, on this CPU",
        "",
        f"Command: `{meta['command']}` at commit `{meta['commit']}` ({meta['started']} to {meta['finished']}).",
        f"Machine: {meta['cpu']}, {meta['logical_cpus']} logical CPUs, {meta['memory_gb']} GiB RAM; "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v) + ".",
        f"Backbone `{meta['preset']}` (random weights, `parscale init`); {meta['threads']} threads; prompt "
        f"{meta['prompt_len']} random ids, {meta['gen']} new tokens (greedy, EOS ignored); each figure the median "
        f"of {meta['rounds']} interleaved round(s), every export in its own process "
        f"({meta.get('prepare_s', 0) / 60:.0f} min building what --work lacked, "
        f"{meta.get('measure_s', 0) / 60:.0f} min measuring); exports "
        f"`parscale export --no-validate` with " + ", ".join(f"{q}: `{' '.join(EXPORT_FLAGS[q]) or '(float)'}`"
                                                          for q in meta["quant"]) + ".",
    ]
    if meta["rounds"] < 5:
        lines += ["", f"**{meta['rounds']} round(s): a smoke run, not a result (the study takes 5 or more).**"]
    lines += [
        "",
        "## Quality-equivalent dense models",
        "",
        f"Law: L = (A / (N (k ln P + 1)))^alpha + E, {fit.dataset} fit (k = {fit.k:.4f}, R^2 {fit.r2}; "
        "arXiv 2505.10475 Section 3.2, constants from the authors' parametric_fit.py). N: non-embedding "
        "parameters, ParScale's prefixes and aggregation included.",
        "",
        "| model | P | non-embedding params | x (k ln P + 1) | quality-equivalent | dense model built "
        "| its non-embedding | all params | shape |",
        "|---|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    eq = report["systems"]
    for s in (x for x in eq if x["kind"] == "parscale"):
        d = next((x for x in eq if x["kind"] == "dense" and x["P"] == s["P"]), None)
        head = (f"| ParScale P={s['P']} | {s['P']} | {_n(s['shape']['non_embedding'])} "
                f"| {fit.k * math.log(s['P']) + 1:.3f} | {_n(s['equivalent_params'])} ")
        if d is None:
            lines.append(head + f"| (the backbone) | - | {_n(s['shape']['total'])} | backbone |")
            continue
        off = 100 * (d["shape"]["non_embedding"] / s["equivalent_params"] - 1)
        lines.append(head + f"| {d['shape']['label']} | {_n(d['shape']['non_embedding'])} ({off:+.1f} %) "
                     f"| {_n(d['shape']['total'])} | {d['shape']['kind']} |")
    lines += [
        "",
        "## Measurements",
        "",
        "Latency: the whole call (prefill of the prompt and every decode step). Decode: ms per step, each step "
        "one token for every sequence of the batch. Peak RSS: while generating, weights included. KV @1k: the "
        f"cache at {KV_CONTEXT} tokens, batch 1, float32, from the config; prefix: ParScale's prefix keys/values "
        "(float32 constants in our graph, counted in files). Load: the 1-minute load average before the run "
        "(median, and range over the rounds).",
        "",
        "| model | quant | batch | decode ms/step | prefill tok/s | latency s | peak RSS MB | files MB | KV @1k MB "
        "| prefix MB | load avg |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for key, r in report["medians"].items():
        name, q, b = key.split("|")
        s = next(x for x in eq if x["name"] == name)
        loads = [x["load_avg_1min"] for x in report["runs"][key]]
        lines.append(
            f"| {name} | {q} | {b} | {_num(r['decode_ms_per_step'])} | {_num(r['prefill_tokens_per_s'])} "
            f"| {_num(r['latency_s'])} | {r['generate_peak_rss_mb']:.0f} | {_mb(r['files_bytes'])} "
            f"| {_mb(s['kv_1k_bytes'])} | {_mb(s['prefix_bytes'])} "
            f"| {r['load_avg_1min']:.1f} ({min(loads):.1f}-{max(loads):.1f}) |")
    lines += [
        "",
        "## Increase over the P=1 backbone: ParScale against its quality-equivalent dense model",
        "",
        "Ratio: the dense model's increase over ParScale's (the paper's \"x less increase\"). At 1k context: the "
        f"memory ratio with every KV cache grown from {meta['prompt_len'] + meta['gen']} to {KV_CONTEXT} tokens "
        "(measured peak plus the computed growth; ParScale's cache is P times the backbone's). Paper: its cost "
        "model (A100, llm-analysis) for its 1.6B backbone at the same batch, dense equivalent by measured loss "
        "(Figure 4's method) / by the law (ours); the paper states only P=8, batch 1: 22x memory, 6x latency.",
        "",
        "| P | quant | batch | memory MB: ParScale | dense | ratio | at 1k context (est.) | latency s: ParScale "
        "| dense | ratio | decode ratio | paper memory ratio (loss / law) | paper latency ratio (loss / law) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    paper = report["paper"]
    for r in report["increases"]:
        pl, pw = (paper["by_loss"].get(str(r["batch"]), {}).get(str(r["P"])),
                  paper["by_law"].get(str(r["batch"]), {}).get(str(r["P"])))
        pm = f"{pl['memory_ratio']:.1f}x / {pw['memory_ratio']:.1f}x" if pl and pw else "-"
        pt = f"{pl['latency_ratio']:.1f}x / {pw['latency_ratio']:.1f}x" if pl and pw else "-"
        lines.append(
            f"| {r['P']} | {r['quant']} | {r['batch']} "
            f"| {r['memory_parscale']:+.0f} ({r['memory_parscale_pct']:+.1f} %) "
            f"| {r['memory_dense']:+.0f} ({r['memory_dense_pct']:+.1f} %) | {_ratio(r['memory_ratio'])} "
            f"| {_ratio(r.get('memory_1k_ratio')) if 'memory_1k_ratio' in r else '-'} "
            f"| {r['latency_parscale']:+.3g} ({r['latency_parscale_pct']:+.1f} %) "
            f"| {r['latency_dense']:+.3g} ({r['latency_dense_pct']:+.1f} %) | {_ratio(r['latency_ratio'])} "
            f"| {_ratio(r['decode_ratio'])} | {pm} | {pt} |")
    lines += [
        "",
        f"Paper, stated: {paper['stated']['memory_ratio']:g}x less memory increase and "
        f"{paper['stated']['latency_ratio']:g}x less latency increase ({paper['stated']['source']}). Its cost model "
        "reproduced from the authors' code: " + "; ".join(
            f"batch {b}, P={P}: {v['memory_ratio']:.1f}x / {v['latency_ratio']:.1f}x (equivalent "
            f"{v['equivalent_params'] / 1e9:.2f} B)" for b, d in paper["by_loss"].items() for P, v in d.items()) + ".",
        "",
        "![memory and latency increase against quality-equivalent size](scaling.png)",
        "",
        "Every figure comes from one fresh process, `python -m benchmarks.scaling _measure EXPORT --batch B "
        f"--prompt-len {meta['prompt_len']} --gen {meta['gen']} --threads {meta['threads']}` (the exact command "
        "of each is in scaling.json, `commands`); a negative ratio means the dense model came out cheaper than the "
        "backbone.",
    ]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """Memory and latency increase (% of the P=1 backbone) against quality-equivalent size, both kinds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in report["increases"]}) or [1]
    fig, axes = plt.subplots(len(batches), 2, figsize=(11, 4.2 * len(batches)), squeeze=False)
    n0 = next(s for s in report["systems"] if s["name"] == "ParScale P=1")["shape"]["non_embedding"]
    xs = {s["P"]: s["equivalent_params"] / n0 for s in report["systems"] if s["kind"] == "parscale"}
    dense_x = {s["P"]: s["shape"]["non_embedding"] / n0 for s in report["systems"] if s["kind"] == "dense"}
    styles = {"int8": "-", "int4": "--", "fp32": ":"}
    for row, b in enumerate(batches):
        for col, what in enumerate(("memory", "latency")):
            ax = axes[row][col]
            for q in sorted({r["quant"] for r in report["increases"]}):
                rs = sorted((r for r in report["increases"] if r["quant"] == q and r["batch"] == b),
                            key=lambda r: r["P"])
                if not rs:
                    continue
                ax.plot([1] + [xs[r["P"]] for r in rs], [0] + [r[f"{what}_parscale_pct"] for r in rs],
                        styles.get(q, "-"), marker="o", color="tab:blue", label=f"ParScale P=1, 2, 4, 8: {q}, ours")
                ax.plot([1] + [dense_x[r["P"]] for r in rs], [0] + [r[f"{what}_dense_pct"] for r in rs],
                        styles.get(q, "-"), marker="s", color="tab:red", label=f"dense of the same quality: {q}, ours")
                if q == sorted({r["quant"] for r in report["increases"]})[0]:
                    for r in rs:
                        ax.annotate(f"P={r['P']}", (xs[r["P"]], r[f"{what}_parscale_pct"]),
                                    textcoords="offset points", xytext=(4, -10), fontsize=7, color="tab:blue")
            paper = report["paper"]["by_loss"].get(str(b), {})
            if paper:
                ps = sorted(paper.items(), key=lambda kv: int(kv[0]))
                ax.plot([1] + [v["x"] for _, v in ps], [0] + [v[f"parscale_{what}_pct"] for _, v in ps], ":",
                        marker="^", color="gray", label="ParScale: the paper's cost model (1.6B, A100)")
                ax.plot([1] + [v["x"] for _, v in ps], [0] + [v[f"dense_{what}_pct"] for _, v in ps], ":",
                        marker="D", color="black", label="dense of equal measured loss: the paper's cost model")
            ax.set_xlabel("quality-equivalent size: non-embedding parameters / P=1 backbone")
            ax.set_ylabel(f"{what} increase over the P=1 backbone (%)")
            ax.set_title(f"{what}, batch {b}" + (" (peak RSS while generating)" if what == "memory" else
                                                 " (prompt + generation, one call)"))
            ax.grid(alpha=0.3)
    meta = report["meta"]
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(f"ParScale against parameter scaling on {meta['logical_cpus']} CPUs, backbone {meta['preset']}, "
                 f"commit {meta['commit']}\nthe paper (1.6B, P=8, batch 1, A100 cost model): "
                 f"{PAPER_STATED['memory_ratio']:g}x less memory increase, {PAPER_STATED['latency_ratio']:g}x less "
                 "latency increase than parameter scaling", fontsize=10)
    fig.tight_layout(rect=(0, 0.07 if len(batches) > 1 else 0.12, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def paper_section(batches: list[int], fit: str) -> dict[str, Any]:
    return {
        "stated": PAPER_STATED,
        "by_loss": {str(b): {str(P): v for P, v in paper_ratios(b, "loss", fit).items()}
                    for b in batches if b in PAPER_COST},
        "by_law": {str(b): {str(P): v for P, v in paper_ratios(b, "law", fit).items()}
                   for b in batches if b in PAPER_COST},
    }


def write(report: dict[str, Any], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "scaling.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / "scaling.md").write_text(markdown(report))
    plot(report, folder / "scaling.png")


def commit() -> str:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], capture_output=True, text=True, cwd=HERE.parent).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "parscale", "benchmarks/scaling.py")
    return head + ("+uncommitted changes" if dirty else "")


def system_record(s: System) -> dict[str, Any]:
    return {"name": s.name, "kind": s.kind, "P": s.P, "slug": s.slug, "equivalent_params": s.equivalent_params,
            "shape": asdict(s.shape), "config": s.config, "kv_1k_bytes": kv_cache_bytes(s.config),
            "prefix_bytes": prefix_bytes(s.config)}


def study(args: argparse.Namespace) -> None:
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    fit = FITS[args.fit]
    systems = systems_for(args.preset, fit, args.dense_scaling, args.prefix)
    for s in systems:
        print(f"{s.name}: {s.shape.label} ({s.shape.kind}), {_n(s.shape.non_embedding)} non-embedding, "
              f"quality-equivalent {_n(s.equivalent_params)}", flush=True)
    t_prepare = time.perf_counter()
    exports = prepare(systems, args.preset, args.quant, args.work, args.drop_checkpoints)
    prepare_s = time.perf_counter() - t_prepare
    jobs = [(s, q, b) for s in systems for q in args.quant for b in args.batch]
    runs: dict[str, list[dict[str, Any]]] = {key_of(s.name, q, b): [] for s, q, b in jobs}
    commands: dict[str, str] = {}
    t_start = time.perf_counter()
    for rnd in range(args.rounds):
        # Interleaved, each round starting elsewhere, so that drifting load hits every system alike.
        shift = (rnd * len(jobs)) // max(args.rounds, 1)
        for n, (s, q, b) in enumerate(jobs[shift:] + jobs[:shift]):
            record = run_measure(exports[(s.name, q)], b, args.prompt_len, args.gen, args.threads)
            key = key_of(s.name, q, b)
            runs[key].append(record)
            commands[key] = (f"python -m benchmarks.scaling _measure {exports[(s.name, q)]} --batch {b} "
                             f"--prompt-len {args.prompt_len} --gen {args.gen} --threads {args.threads}")
            done = rnd * len(jobs) + n + 1
            eta = (time.perf_counter() - t_start) / done * (args.rounds * len(jobs) - done)
            print(f"  [{done}/{args.rounds * len(jobs)}, ~{eta / 60:.0f} min left] {key}: decode "
                  f"{record['decode_ms_per_step']:.1f} ms/step, latency {record['latency_s']:.2f} s, "
                  f"RSS {record['generate_peak_rss_mb']:.0f} MB, load {record['load_avg_1min']:.1f}", flush=True)
    med = medians(runs)
    report = {
        "meta": {**machine(), "started": started, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                 "command": "python -m benchmarks.scaling " + " ".join(sys.argv[1:]), "commit": commit(),
                 "preset": args.preset, "quant": args.quant, "batch": args.batch, "threads": args.threads,
                 "rounds": args.rounds, "prompt_len": args.prompt_len, "gen": args.gen, "fit": args.fit,
                 "dense_scaling": args.dense_scaling, "prefix": args.prefix, "work": str(args.work),
                 "prepare_s": prepare_s, "measure_s": time.perf_counter() - t_start},
        "law": asdict(fit),
        "systems": [system_record(s) for s in systems],
        "runs": runs, "medians": med,
        "increases": increases(med, args.quant, args.batch, {s.name: kv_cache_bytes(s.config, 1) for s in systems},
                               args.prompt_len + args.gen),
        "paper": paper_section(args.batch, args.fit), "commands": commands,
    }
    write(report, args.results)
    print((args.results / "scaling.md").read_text())


PRESETS = ("tiny", "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b", *(f"paper-{s.lower()}" for s in PAPER_SHAPES))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("_measure", "_init"):
        internal(sys.argv[1], sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="qwen2.5-0.5b", choices=PRESETS, help="Backbone.")
    ap.add_argument("--quant", nargs="+", default=["int8", "int4"], choices=sorted(EXPORT_FLAGS))
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 4])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5,
                    help="Interleaved rounds; medians are reported (5 or more for a result).")
    ap.add_argument("--prompt-len", type=int, default=64, help="The paper's cost_analysis.py default.")
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--prefix", type=int, default=48, help="ParScale prefix tokens per stream (the paper's 48).")
    ap.add_argument("--fit", default=DEFAULT_FIT, choices=sorted(FITS), help="Which fitted k picks the dense models.")
    ap.add_argument("--dense-scaling", default="width", choices=["width", "depth"],
                    help="How dense models grow from the backbone (the paper's: width at fixed depth).")
    ap.add_argument("--work", type=Path, default=Path("/tmp/parscale-scaling"),
                    help="Checkpoints and exports, reused by later runs.")
    ap.add_argument("--drop-checkpoints", action="store_true",
                    help="Delete each checkpoint once its exports exist (disk: 27 GB of them at 1.5B).")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    ap.add_argument("--rewrite", action="store_true",
                    help="Only rewrite scaling.md and scaling.png from the scaling.json in --results.")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    if args.rewrite:
        write(json.loads((args.results / "scaling.json").read_text()), args.results)
        return
    study(args)


def internal(cmd: str, argv: list[str]) -> None:
    """`_measure PATH ...` (one measurement, torch-free) and `_init OUT ...` (a checkpoint of a custom shape)."""
    if cmd == "_measure":
        mp = argparse.ArgumentParser(prog="scaling _measure")
        mp.add_argument("path", type=Path)
        for name, default in (("--batch", 1), ("--prompt-len", 64), ("--gen", 64), ("--threads", 2)):
            mp.add_argument(name, type=int, default=default)
        a = mp.parse_args(argv)
        print(json.dumps(measure_export(a.path, a.batch, a.prompt_len, a.gen, a.threads)))
        return
    ip = argparse.ArgumentParser(prog="scaling _init")
    ip.add_argument("out", type=Path)
    ip.add_argument("--base", required=True)
    ip.add_argument("--P", type=int, required=True)
    ip.add_argument("--prefix", type=int, default=48)
    ip.add_argument("--overrides", default="{}")
    a = ip.parse_args(argv)
    from parscale.modeling.init import init_checkpoint

    init_checkpoint(a.out, P=a.P, preset=a.base, prefix=a.prefix, overrides=json.loads(a.overrides), force=True)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
