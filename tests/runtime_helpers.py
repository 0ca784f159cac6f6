"""Helpers for the runtime tests: tiny exports with a byte-level tokenizer, and PyTorch references."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from parscale.driver import GraphInfo, step
from parscale.manifest import MANIFEST, Manifest, describe_files

# Installed before anything else in a child interpreter: importing these fails as if not installed.
BLOCK_TORCH = textwrap.dedent("""
    import importlib.abc, sys
    BLOCKED = ("torch", "onnx", "safetensors", "transformers")
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
            return None
    sys.meta_path.insert(0, Block())
""")


def run_cli(*args: str, prelude: str = "") -> subprocess.CompletedProcess[str]:
    """`parscale ARGS` in a child interpreter (after `prelude`, e.g. BLOCK_TORCH), its output captured."""
    code = prelude + "\nimport sys\nfrom parscale.cli import main\nsys.argv = ['parscale', *sys.argv[1:]]\nmain()\n"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


def edit_manifest(folder: Path, fn) -> None:  # type: ignore[no-untyped-def]
    """Apply `fn` to an export's parscale.json (a dict), in place."""
    m = json.loads((folder / MANIFEST).read_text())
    fn(m)
    (folder / MANIFEST).write_text(json.dumps(m))


def rehash(folder: Path) -> None:
    """Make the manifest agree with the files again: what a careless (or malicious) edit would do."""
    def update(m: dict) -> None:
        m["files"] = Manifest.from_dict(m).replace(files=describe_files(folder)).to_dict()["files"]

    edit_manifest(folder, update)


TEXTS = [
    "def f(x):\n    return x + 1\n",
    "the quick brown fox jumps over the lazy dog. " * 4,
    "print('hello world')\nfor i in range(10):\n    print(i)\n",
    "naïve café, 日本語のテキスト, emoji 🙂 and more plain ascii text to learn merges from. ",
]
VOCAB = 512  # the tiny preset's vocabulary: tokenizer and model agree on every id


def byte_level_tokenizer(path: Path) -> Path:
    """A byte-level BPE (512 ids) whose multi-byte characters stay split over several tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, min_frequency=2, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    # ASCII repeated often enough to merge; the non-ASCII characters appear once, so stay split.
    tok.train_from_iterator([*TEXTS[:3]] * 50 + [TEXTS[3]], trainer=trainer)
    tok.save(str(path))
    return path


class TinyFactory:
    """The one memoized factory of tiny checkpoints and their exports: each distinct request is made
    once per test session (tracing costs seconds), and a test that needs a variant asks for it by
    keyword instead of writing its own fixture. Callers must not modify what they get (copy it)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._made: dict[tuple, Path] = {}

    def checkpoint(self, *, P: int = 4, prefix: int = 8, seed: int = 0, tied: bool | None = None,  # noqa: N803
                   dtype: str = "float32", tokenizer: bool = False, tokenizer_config: bool = False) -> Path:
        """A random `tiny`-preset checkpoint; `tokenizer`: with a byte-level tokenizer.json (512 ids),
        `tokenizer_config`: and the tokenizer_config.json a published checkpoint has."""
        from parscale.modeling.random_init import init_checkpoint

        key = ("ckpt", P, prefix, seed, tied, dtype, tokenizer, tokenizer_config)
        if key not in self._made:
            path = self.root / f"ckpt-{len(self._made)}"
            init_checkpoint(path, P=P, preset="tiny", prefix=prefix, dtype=dtype, seed=seed, tied=tied)
            if tokenizer or tokenizer_config:
                byte_level_tokenizer(path / "tokenizer.json")
            if tokenizer_config:
                (path / "tokenizer_config.json").write_text(json.dumps({
                    "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
                    "pad_token": "<|endoftext|>", "model_max_length": 512,
                }))
            self._made[key] = path
        return self._made[key]

    def export(self, ckpt: Path, **options: Any) -> Path:
        """`parscale.exporter.pipeline.export(ckpt, ...)` of a factory checkpoint, with `options`."""
        from parscale.exporter.pipeline import export

        key = ("export", ckpt, *sorted((k, repr(v)) for k, v in options.items()))
        if key not in self._made:
            self._made[key] = export(ckpt, self.root / f"export-{len(self._made)}", **options).out
        return self._made[key]


def without_tokenizer(export: Path, dest: Path) -> Path:
    """A copy of an export without its tokenizer files, with the card and manifest rewritten as export would."""
    import json
    import shutil

    from parscale.exporter.files.card import CARD, write_card
    from parscale.manifest import MANIFEST, Manifest, describe_files

    shutil.copytree(export, dest)
    for name in ("tokenizer.json", "tokenizer_config.json", CARD):
        (dest / name).unlink(missing_ok=True)
    manifest = Manifest.read(dest)
    write_card(dest, manifest, dest.name)
    manifest = manifest.replace(files=describe_files(dest))
    (dest / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2))
    return dest


def torch_greedy(model: torch.nn.Module, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Greedy tokens from the PyTorch module with its KV cache, batch left-padded like the runtime."""
    b, longest = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros(b, longest, dtype=torch.int64)
    mask = torch.zeros(b, longest, dtype=torch.int64)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.tensor(p)
        mask[i, longest - len(p):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out: list[list[int]] = [[] for _ in range(b)]
    with torch.no_grad():
        logits, cache = model(ids, mask, pos)
        nxt_pos = mask.sum(-1, keepdim=True)
        for _ in range(n):
            token = logits[:, -1].argmax(-1, keepdim=True)
            for i in range(b):
                out[i].append(int(token[i]))
            mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.int64)], dim=1)
            logits, cache = model(token, mask, nxt_pos, cache, 1)
            nxt_pos = nxt_pos + 1
    return out


def greedy_graph(session: ort.InferenceSession, ids: np.ndarray, mask: np.ndarray, n: int) -> np.ndarray:
    """Greedy tokens (prompts included) of a left-padded batch, with nothing but the session and
    `parscale.driver.step`: the plainest driver of the graph contract, independent of the runtime."""
    info = GraphInfo.of(session)
    pos = np.clip(mask.cumsum(-1) - 1, 0, None)
    tokens, step_ids, past = ids, ids, None
    for _ in range(n):
        logits, past = step(session, info, step_ids, mask, pos, past, keep=1)
        step_ids = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        tokens = np.concatenate([tokens, step_ids], axis=1)
        mask = np.concatenate([mask, np.ones_like(step_ids)], axis=1)
        pos = pos[:, -1:] + 1
    return tokens


def all_nodes(graph: Any) -> list[Any]:
    """Every node of an ONNX graph, those inside `If` branches included."""
    import onnx

    nodes = []
    for n in graph.node:
        nodes.append(n)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                nodes.extend(all_nodes(a.g))
    return nodes


def decode_step_ops(path: Path, P: int | None = None, prompt: int = 5) -> list[str]:  # noqa: N803
    """The op types ONNX Runtime runs in one decode step (after a prefill), read from its profile."""
    from parscale.driver import CPU, session_options

    opts = session_options(1)
    opts.enable_profiling = True
    opts.profile_file_prefix = str(path.parent / "decode-profile")
    session = ort.InferenceSession(str(path), opts, providers=[CPU])
    info = GraphInfo.of(session).at(P)
    ids = np.arange(1, prompt + 1)[None]
    logits, past = step(session, info, ids, np.ones_like(ids), np.arange(prompt)[None], keep=1)
    nxt = logits[:, -1].argmax(-1)[:, None]
    step(session, info, nxt, np.ones((1, prompt + 1), np.int64), np.array([[prompt]]), past, keep=1)
    with open(session.end_profiling()) as f:
        events = json.load(f)
    runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    assert len(runs) == 2
    return [e["args"]["op_name"] for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
            and e["ts"] >= runs[1]["ts"]]
