"""The recipe of the embedded default model: corpus, tokenizer, stage 1 (P=1), stage 2 (P streams)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from parscale.args import available_cpus, check_int, check_seed
from parscale.config import ParScaleConfig
from parscale.errors import ParScaleError
from parscale.modeling.checkpoint import checkpoint_folder, save_checkpoint
from parscale.modeling.model import ParScaleForCausalLM
from parscale.modeling.random_init import make_config
from parscale.scoring import Window, plan_windows, spread
from parscale.train.corpus import SourceFile, collect_sources, join_documents, split_sources, stdlib_root
from parscale.train.data import WindowSampler, encode_stream
from parscale.train.stages import (
    Log,
    StageResult,
    expand_to_parscale,
    held_out_nll,
    init_backbone,
    param_groups,
    train_stage,
)
from parscale.train.tokenizer import eos_id, save_tokenizer, train_tokenizer

REPORT_FILE = "training_report.json"


@dataclass(frozen=True)
class Recipe:
    """Every choice that determines the trained model (seed included): recorded in the report."""

    seed: int = 0  # initialisation, data order and the tokenizer's training sample
    vocab_size: int = 4096  # the byte-level BPE trained on the corpus
    # backbone (Qwen2 shapes)
    hidden_size: int = 256
    intermediate_size: int = 704  # the SwiGLU MLP's width
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2  # grouped-query attention: 2 query heads per KV head
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True  # the LM head is the embedding table
    # parallel scaling
    P: int = 4  # the streams of the checkpoint's own head set (parscale_n)
    prefix_tokens: int = 16  # learned key/value rows per stream and layer
    prefix_std: float = 0.02  # their initial scale
    seq_len: int = 256  # tokens per training window
    # stage 1: the whole backbone at P=1 (AdamW, warmup then cosine decay)
    steps1: int = 800
    batch1: int = 16  # windows per step
    lr1: float = 2e-3  # peak learning rate
    warmup1: int = 40  # steps of linear warmup
    weight_decay1: float = 0.1
    # stage 2: prefixes and aggregation only, backbone frozen
    steps2: int = 300
    batch2: int = 8  # windows per step
    lr2_prefix: float = 1e-2  # peak learning rate of the prefixes
    lr2_aggregate: float = 1e-3  # and of the aggregation MLP
    warmup2: int = 15  # steps of linear warmup
    # both stages
    min_lr_ratio: float = 0.1  # the cosine decay's floor, relative to the peak
    grad_clip: float = 1.0  # global gradient-norm clip
    bf16_autocast: bool = True
    # held-out measurement: this many non-overlapping seq_len windows, evenly spread over the held-out
    # stream (0 = all of them); both models are scored on exactly the same windows
    eval_windows: int = 128
    storage_dtype: str = "float32"

    def config(self, P: int) -> dict[str, Any]:  # noqa: N803
        """The `config.json` dict of the P=1 backbone or of the P-stream model."""
        return make_config(
            "tiny", P=P, prefix=self.prefix_tokens, tied=self.tie_word_embeddings,
            dtype=self.storage_dtype, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
            max_position_embeddings=self.max_position_embeddings, rope_theta=self.rope_theta,
        )


@dataclass
class TrainReport:
    """Measured figures of one run of the recipe (also written as training_report.json)."""

    recipe: dict[str, Any]
    held_out_loss_p1: float  # mean NLL per token (nats) of the stage-1 backbone
    held_out_loss_pn: float  # same windows, the final P-stream model
    held_out_loss_pn_init: float  # the P-stream model before stage 2 (what stage 2 starts from)
    held_out_tokens: int
    held_out_method: str
    corpus: dict[str, Any]
    stage1: dict[str, Any]
    stage2: dict[str, Any]
    tokenizer_seconds: float
    total_seconds: float
    checkpoint_bytes: int
    environment: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _stage_dict(r: StageResult) -> dict[str, Any]:
    return dataclasses.asdict(r) | {"tokens_per_second": r.tokens / max(r.seconds, 1e-9)}


def train(
    out: str | Path, recipe: Recipe, *, sources: Sequence[SourceFile] | None = None,
    backbone_out: str | Path | None = None, log: Log | None = None, threads: int = 2,
) -> TrainReport:
    """Run the recipe and write the P-stream checkpoint to `out` (replaced atomically).

    `sources` defaults to this interpreter's standard library; `backbone_out`, when given, also
    receives the stage-1 P=1 checkpoint (to compare with, or to check that stage 2 left it alone).
    `threads` sets torch's intra-op threads for the run (restored after); it is not part of the
    recipe: on this code path 1 and 2 threads gave bit-identical weights, only the speed differs.
    """
    say = log or (lambda _msg: None)
    out = Path(out)
    check_int(threads, "threads", minimum=1)
    check_seed(recipe.seed)
    check_int(recipe.steps1, "steps1", minimum=1)
    check_int(recipe.steps2, "steps2", minimum=1)
    threads = min(threads, available_cpus())
    # Refused now rather than after the run: the same rules are applied again under the lock at the end.
    for folder in (out, *([Path(backbone_out)] if backbone_out is not None else [])):
        checkpoint_folder(folder, force=True).check()
    t_start = time.perf_counter()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(recipe.seed)
        files = list(sources) if sources is not None else collect_sources()
        train_files, held_files = split_sources(files)
        if not train_files or not held_files:
            raise ParScaleError(f"corpus split left an empty side ({len(train_files)}/{len(held_files)} files)")
        t0 = time.perf_counter()
        tok = train_tokenizer([f.text for f in train_files], recipe.vocab_size)
        tok_seconds = time.perf_counter() - t0
        train_ids, held_ids, windows = token_streams(tok, train_files, held_files, recipe)
        corpus = {
            "root": str(stdlib_root()) if sources is None else "custom",
            "files_train": len(train_files), "files_held_out": len(held_files),
            "bytes_train": sum(len(f.text.encode()) for f in train_files),
            "bytes_held_out": len(join_documents(held_files).encode()),
            "tokens_train": len(train_ids), "tokens_held_out": len(held_ids) - 1,
            "vocab_size": tok.get_vocab_size(),
        }
        say(f"corpus: {corpus}")

        cfg_dict1 = recipe.config(1) | _special_ids(tok)
        cfg_dict1["vocab_size"] = tok.get_vocab_size()
        backbone = init_backbone(ParScaleConfig.from_dict(cfg_dict1), recipe.seed)
        s1 = train_stage(
            backbone, param_groups(backbone, recipe.lr1, recipe.weight_decay1),
            WindowSampler(train_ids, recipe.seq_len, recipe.batch1, recipe.seed),
            steps=recipe.steps1, warmup=recipe.warmup1, min_lr_ratio=recipe.min_lr_ratio,
            grad_clip=recipe.grad_clip, bf16=recipe.bf16_autocast, name="stage1", log=log,
        )
        loss1, n_eval = held_out_nll(backbone, held_ids, windows)
        say(f"stage 1 done in {s1.seconds:.0f}s: held-out loss P=1 {loss1:.4f} on {n_eval} tokens")

        cfg_dict = cfg_dict1 | {"parscale_n": recipe.P}
        model, s2, loss_init, loss_n = stage2(backbone, ParScaleConfig.from_dict(cfg_dict), recipe, train_ids,
                                              held_ids, windows, log)

        report = TrainReport(
            recipe=dataclasses.asdict(recipe), held_out_loss_p1=loss1, held_out_loss_pn=loss_n,
            held_out_loss_pn_init=loss_init, held_out_tokens=n_eval, corpus=corpus,
            held_out_method=(
                f"mean next-token NLL (nats, float32, no autocast) over {len(windows)} non-overlapping "
                f"{recipe.seq_len}-token windows spread evenly over the held-out stream (EOS, then the "
                "held-out files each followed by EOS); the same windows for every model"
            ),
            stage1=_stage_dict(s1), stage2=_stage_dict(s2), tokenizer_seconds=tok_seconds,
            total_seconds=0.0, checkpoint_bytes=0, environment=_environment() | {"threads": threads},
        )
        with tempfile.TemporaryDirectory() as scratch:
            tok_dir = Path(scratch)
            save_tokenizer(tok, tok_dir, recipe.max_position_embeddings)
            extra = {n: tok_dir / n for n in ("tokenizer.json", "tokenizer_config.json")}
            if backbone_out is not None:
                _write_atomically(Path(backbone_out), lambda d: save_checkpoint(
                    backbone, cfg_dict1, d, extra_files=extra))
            report.total_seconds = time.perf_counter() - t_start

            def write(d: Path) -> None:
                save_checkpoint(model, cfg_dict, d, extra_files=extra)
                report.checkpoint_bytes = (d / "model.safetensors").stat().st_size
                (d / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n")

            _write_atomically(out, write)
        return report
    finally:
        torch.set_num_threads(threads_before)


def token_streams(
    tok: Any, train_files: Sequence[SourceFile], held_files: Sequence[SourceFile], recipe: Recipe,
) -> tuple[np.ndarray, np.ndarray, list[Window]]:
    """(training stream, held-out stream behind one EOS, the held-out windows every model is scored on)."""
    train_ids = encode_stream(tok, train_files)
    held_ids = np.concatenate([[eos_id(tok)], encode_stream(tok, held_files)]).astype(np.int64)
    windows = spread(plan_windows(len(held_ids), recipe.seq_len, recipe.seq_len), recipe.eval_windows)
    return train_ids, held_ids, windows


def stage2(
    backbone: ParScaleForCausalLM, cfg: ParScaleConfig, recipe: Recipe, train_ids: np.ndarray,
    held_ids: np.ndarray, windows: list[Window], log: Log | None,
) -> tuple[ParScaleForCausalLM, StageResult, float, float]:
    """Stage 2 at `cfg.P` streams on the frozen `backbone`: (model, result, held-out loss before, after)."""
    say = log or (lambda _msg: None)
    model = expand_to_parscale(backbone, cfg, recipe.seed + 1, recipe.prefix_std)
    loss_init, _ = held_out_nll(model, held_ids, windows)
    say(f"stage 2 starts: held-out loss P={cfg.P} {loss_init:.4f}")
    groups = param_groups(model, recipe.lr2_aggregate, 0.0, {"prefix_": recipe.lr2_prefix})
    result = train_stage(
        model, groups, WindowSampler(train_ids, recipe.seq_len, recipe.batch2, recipe.seed + 1),
        steps=recipe.steps2, warmup=recipe.warmup2, min_lr_ratio=recipe.min_lr_ratio,
        grad_clip=recipe.grad_clip, bf16=recipe.bf16_autocast, name=f"stage2 P={cfg.P}", log=log,
    )
    loss_n, _ = held_out_nll(model, held_ids, windows)
    say(f"stage 2 done in {result.seconds:.0f}s: held-out loss P={cfg.P} {loss_n:.4f}")
    return model, result, loss_init, loss_n


HEADS_REPORT = "heads"  # training_report.json: P -> what `train_heads` measured


def train_heads(
    folder: str | Path, Ps: Sequence[int], *, steps: int | None = None, log: Log | None = None,  # noqa: N803
    threads: int = 2, sources: Sequence[SourceFile] | None = None, force: bool = False,
) -> dict[int, dict[str, Any]]:
    """Add stage-2 head sets for more P to the checkpoint `folder`, on its frozen backbone.

    Each P trains with the recipe recorded in the folder's training_report.json (the defaults when
    there is none) and is written as heads-p{P}.safetensors (`parscale.modeling.heads`); its held-out
    losses go into training_report.json under "heads". Corpus: `sources`, by default this interpreter's
    standard library, split and tokenized (with the folder's tokenizer) as when the folder was trained.
    An existing head set is replaced only with `force`. The folder's lock (`parscale.locking.FolderLock`,
    the one `train`/`init` take on it) is held throughout, so a concurrent run fails at once instead of
    losing a report entry; each file is written to a temporary name and renamed into place.
    """
    from parscale.config import check_folder
    from parscale.locking import FolderLock

    folder = check_folder(folder, "model folder")
    with FolderLock(folder):
        return _train_heads(folder, Ps, steps=steps, log=log, threads=threads, sources=sources, force=force)


def _train_heads(
    folder: Path, Ps: Sequence[int], *, steps: int | None, log: Log | None,  # noqa: N803
    threads: int, sources: Sequence[SourceFile] | None, force: bool,
) -> dict[int, dict[str, Any]]:
    from parscale.modeling.heads import HEADS_FILE, Stream, head_sets, load_streams, save_heads
    from parscale.train.tokenizer import load_tokenizer

    say = log or (lambda _msg: None)
    check_int(threads, "threads", minimum=1)
    cfg = ParScaleConfig.load(folder)
    for P in Ps:
        check_int(P, "P", minimum=1)
        if P == 1:
            raise ParScaleError("P=1 is the backbone itself: it needs no head set")
        if P == cfg.P:
            raise ParScaleError(f"{folder} was trained at P={P}: its model.safetensors holds that head set")
    if len(set(Ps)) != len(Ps):
        raise ParScaleError(f"each P may appear once, got {list(Ps)}")
    existing = [HEADS_FILE.format(P) for P in Ps if (folder / HEADS_FILE.format(P)).exists()]
    if existing and not force:
        raise ParScaleError(f"{folder} already holds {', '.join(existing)}; pass --force to retrain and replace "
                            f"{'it' if len(existing) == 1 else 'them'}")
    report_path = folder / REPORT_FILE
    report = _read_report(report_path)
    known = {f.name for f in dataclasses.fields(Recipe)}
    recipe = Recipe(**{k: v for k, v in report.get("recipe", {}).items() if k in known})
    if steps is not None:
        recipe = dataclasses.replace(recipe, steps2=check_int(steps, "steps", minimum=1))
    threads_before = torch.get_num_threads()
    torch.set_num_threads(min(threads, available_cpus()))
    try:
        tok = load_tokenizer(folder)
        train_ids, held_ids, windows = token_streams(
            tok, *split_sources(list(sources) if sources is not None else collect_sources()), recipe)
        _, backbone = load_streams([Stream(folder, 1)])[1]
        results: dict[int, dict[str, Any]] = {}
        for P in Ps:
            model, result, loss_init, loss_n = stage2(backbone, cfg.at(P), recipe, train_ids, held_ids,
                                                      windows, log)
            path = save_heads(model, folder)
            results[P] = {"held_out_loss": loss_n, "held_out_loss_init": loss_init, "stage2": _stage_dict(result),
                          "file": path.name, "bytes": path.stat().st_size}
            report.setdefault(HEADS_REPORT, {})[str(P)] = results[P] | {"recipe_steps2": recipe.steps2}
            _write_file_atomically(report_path, json.dumps(report, indent=2) + "\n")
            say(f"wrote {path.name}; {folder} now holds P = {', '.join(map(str, head_sets(folder)))}")
        return results
    finally:
        torch.set_num_threads(threads_before)


def _read_report(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ParScaleError(f"cannot read {path}: {e}; move it away to start a new report") from None
    if not isinstance(report, dict):
        raise ParScaleError(f"{path} is not a JSON object; move it away to start a new report")
    return report


def _write_file_atomically(path: Path, text: str) -> None:
    """A temporary file created exclusively beside `path` (O_EXCL), renamed over it: never half-written."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(name, 0o644)
        os.replace(name, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)


def train_default(
    out: str | Path, *, seed: int = 0, steps1: int = Recipe.steps1, steps2: int = Recipe.steps2,
    backbone_out: str | Path | None = None, log: Log | None = None, threads: int = 2,
) -> TrainReport:
    """Train the embedded default model (the `Recipe` defaults) into `out` on the stdlib corpus.

    `backbone_out`, when given, also receives the stage-1 P=1 backbone (to compare with `eval`).
    """
    return train(out, Recipe(seed=seed, steps1=steps1, steps2=steps2), backbone_out=backbone_out,
                 log=log, threads=threads)


def _special_ids(tok: Any) -> dict[str, int]:
    # Qwen2 style: no BOS is prepended; EOS ends a document and generation.
    e = eos_id(tok)
    return {"bos_token_id": e, "eos_token_id": e}


def _environment() -> dict[str, Any]:
    return {
        "python": sys.version.split()[0], "torch": torch.__version__,
        "platform": platform.platform(), "machine": platform.machine(),
    }


def _write_atomically(out: Path, write: Any) -> None:
    """Build the folder beside `out`, then swap it in: a failed run leaves no half checkpoint, and an
    existing `out` is replaced only if it is a checkpoint (parscale.atomic has the rules)."""
    with checkpoint_folder(out, force=True) as tmp:
        write(tmp)
