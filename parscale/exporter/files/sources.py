"""The checkpoint files an export folder copies (configs, tokenizer), checked before any work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from parscale.config import ParScaleConfig
from parscale.errors import ParScaleError

# Copied from the checkpoint when present: configs and every tokenizer file format we know.
SOURCE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json",
)


def copy_source_files(model_dir: Path, out: Path, *, parscale_n: int | None = None) -> list[str]:
    """Copy configs and tokenizer files; returns the names copied.

    `parscale_n`: the P the export's config.json states, when it is not the checkpoint's own (an export
    of a head set, or of several P, whose config.json states the largest)."""
    copied = []
    for name in SOURCE_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, out / name)
            copied.append(name)
    config = out / "config.json"
    if parscale_n is not None and config.is_file():
        data = json.loads(config.read_text())
        if data.get("parscale_n", 1) != parscale_n:
            data["parscale_n"] = parscale_n
            config.write_text(json.dumps(data, indent=2) + "\n")
    return copied


def check_sources(dirs: list[Path], cfg: ParScaleConfig) -> None:
    """Refuse, before any work, source files the export would copy but a runtime could not use.

    The tokenizer must fit the vocabulary (`parscale.text.check_tokenizer_fits`). Several checkpoint
    folders exported together share one copy of each file of SOURCE_FILES (but config.json, which
    states each P): those files must be in every folder alike, or in none, else the first folder's
    would silently win (another EOS id, another tokenizer) for the others' P.
    """
    from parscale.text import TOKENIZER_FILE, Tokenizer, check_tokenizer_fits

    if (dirs[0] / TOKENIZER_FILE).is_file():
        check_tokenizer_fits(Tokenizer(dirs[0] / TOKENIZER_FILE), cfg.vocab_size, dirs[0])
    for other in dirs[1:]:
        for name in SOURCE_FILES[1:]:
            a, b = _source(dirs[0] / name), _source(other / name)
            if a != b:
                how = ("is only in " + str(dirs[0] if b is None else other)) if None in (a, b) else "differs"
                raise ParScaleError(
                    f"{dirs[0]} and {other} are exported together but their {name} {how}: the export holds "
                    f"one {name} for every P; make the folders' {name} the same (copy one over the other)")


def _source(path: Path) -> Any:
    """A source file's content for comparison: JSON parsed (formatting aside), other files as bytes."""
    if not path.is_file():
        return None
    data = path.read_bytes()
    if path.suffix == ".json":
        try:
            return json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return data
    return data
