"""Helpers for the runtime tests: tiny exports with a byte-level tokenizer, and PyTorch references."""

from __future__ import annotations

from pathlib import Path

import torch

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


def make_export(root: Path, P: int, *, tokenizer: bool = True) -> tuple[Path, Path]:  # noqa: N803
    """A tiny random fp32 checkpoint (prefix 8) and its export; returns (checkpoint, export)."""
    from parscale.exporter.export import export
    from parscale.modeling.init import init_checkpoint

    ckpt = init_checkpoint(root / f"ckpt_p{P}", P=P, preset="tiny", prefix=8, dtype="float32", seed=P)
    if tokenizer:
        byte_level_tokenizer(ckpt / "tokenizer.json")
    out = root / f"export_p{P}"
    export(ckpt, out, P=P, validate=False)
    return ckpt, out


def without_tokenizer(export: Path, dest: Path) -> Path:
    """A copy of an export without its tokenizer files, with the card and manifest rewritten as export would."""
    import json
    import shutil

    from parscale.exporter.card import CARD, write_card
    from parscale.manifest import MANIFEST, describe_files, read_manifest

    shutil.copytree(export, dest)
    for name in ("tokenizer.json", "tokenizer_config.json", CARD):
        (dest / name).unlink(missing_ok=True)
    manifest = read_manifest(dest)
    write_card(dest, manifest, dest.name)
    manifest["files"] = describe_files(dest)
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2))
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
