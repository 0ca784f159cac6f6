"""The paper's scaling law and cost figures, and the shapes `benchmarks.scaling` builds from them (pure, no measuring).

ParScale (Chen et al. 2025, arXiv 2505.10475), Section 3.2 (Equation 5): L = (A / (N (k ln P + 1)))^alpha + E,
so P streams on N non-embedding parameters match a dense model of N (k ln P + 1). Here: the fitted
constants with their sources, the paper's cost model, the quality-equivalent parameter count, the
dense shape the law picks for each P, the KV-cache bytes of a config, and the study's systems.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
from dataclasses import dataclass, field
from functools import cache
from typing import Any

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
    from parscale.modeling.random_init import PRESETS

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


# families()'s keys, spelled out so that the CLI lists them without importing the library.
PRESETS = ("tiny", "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b", *(f"paper-{s.lower()}" for s in PAPER_SHAPES))


def config_for(family: Family, P: int, overrides: dict[str, Any] | None = None, prefix: int = 48) -> dict[str, Any]:  # noqa: N803
    """The config.json dict `parscale.modeling.random_init` writes for this shape."""
    from parscale.modeling.random_init import make_config

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


def shape_of(family: Family, label: str, kind: str, overrides: dict[str, Any], P: int = 1,  # noqa: N803
             prefix: int = 48) -> Shape:
    """The Shape of these config keys over the family's base preset, with its parameter counts."""
    cfg = config_for(family, P, overrides, prefix)
    return Shape(label, kind, overrides, non_embedding_params(cfg), total_params(cfg))


def dense_shape(family: Family, target: float, mode: str = "width", prefix: int = 48) -> Shape:
    """The P=1 model closest to `target` non-embedding parameters in this family.

    A listed (published) shape within 5 % is taken as it is. Otherwise "width" widens the backbone
    at its depth, as the paper's scaling-law models do (36 layers, width varied): hidden in steps
    that keep head_dim (or the head count) and GQA valid, intermediate in steps of up to 64, the
    backbone's intermediate/hidden ratio kept as closely as the two roundings allow; "depth" adds
    layers at the backbone's width instead.
    """
    for label, ov in family.listed:
        listed = shape_of(family, label, "published shape", {**dict(family.backbone), **dict(ov)}, prefix=prefix)
        if abs(listed.non_embedding / target - 1) <= LISTED_TOLERANCE:
            return listed
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
        return shape_of(family, f"backbone with {layers} layers", "nearest shape (depth)", shape(h0, i0, layers),
                        prefix=prefix)
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
    i = fitted_i(best)
    return shape_of(family, f"backbone widened to hidden {best}, intermediate {i}", "nearest shape (width)",
                    shape(best, i, layers0), prefix=prefix)


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
# The study's systems: each P on the backbone and its quality-equivalent dense model, and their exports.
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
        shape = shape_of(fam, preset, "backbone", dict(fam.backbone), P, prefix)
        out.append(System(f"ParScale P={P}", "parscale", P, config_for(fam, P, prefix=prefix), shape,
                          equivalent_params(shape.non_embedding, P, fit.k), slug=f"p{P}", overrides=dict(fam.backbone)))
    for s in out[1:]:
        shape = dense_shape(fam, s.equivalent_params, mode, prefix)
        ov = shape.overrides
        slug = "dense-" + "-".join(f"{k[0]}{ov.get(n, '')}" for k, n in
                                   (("h", "hidden_size"), ("i", "intermediate_size"), ("l", "num_hidden_layers")))
        out.append(System(f"dense for P={s.P}", "dense", s.P, config_for(fam, 1, ov, prefix), shape,
                          s.equivalent_params, slug=slug, overrides=ov))
    return out


EXPORT_FLAGS = {"fp32": [], "int8": ["--int8"], "int4": ["--int4", "--method", "rtn"]}
