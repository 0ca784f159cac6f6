"""The training corpus: the Python standard library's own `.py` sources, split into train and held-out.

The corpus ships with every Python install, so the default model can be rebuilt anywhere without a
download. It does depend on the Python version: the training report records it.
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from parscale.text import EOS_TEXT

EOS = EOS_TEXT  # end of text, and the separator between documents

# Folders excluded anywhere in the path: third-party code, the test suites (huge, repetitive
# fixtures), and two packages that are mostly frozen tooling or data.
EXCLUDED_DIRS = frozenset({
    "site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test",
    "idlelib", "lib2to3", "pydoc_data", "ensurepip",
})
# Generated files: code tables and build variables, not Python written by people.
EXCLUDED_PREFIXES = ("_sysconfigdata",)
GENERATED_MARKERS = ("with gencodec.py",)  # encodings/cp*.py and friends: 256-entry mapping tables
MAX_FILE_BYTES = 300_000  # beyond this a stdlib file is generated data (pydoc_data/topics.py: 750 kB)
HELD_OUT_PER_MILLE = 50  # ~5% of the files


@dataclass(frozen=True)
class SourceFile:
    """One corpus document: its path relative to the stdlib root, and its text."""

    rel: str
    text: str


def stdlib_root() -> Path:
    """The folder of this interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _excluded(rel: Path) -> bool:
    if any(part in EXCLUDED_DIRS for part in rel.parts[:-1]):
        return True
    return rel.name.startswith(EXCLUDED_PREFIXES)


def collect_sources(root: Path | None = None) -> list[SourceFile]:
    """Every eligible `.py` file under `root` (default: the stdlib), sorted by relative path.

    Files that are not UTF-8, are larger than MAX_FILE_BYTES, or carry a generator's marker in their
    first kilobyte are skipped; sorting makes the corpus independent of the file system's order.
    """
    root = root or stdlib_root()
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if _excluded(rel) or not path.is_file() or path.stat().st_size > MAX_FILE_BYTES:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if any(m in text[:1000] for m in GENERATED_MARKERS) or not text.strip():
            continue
        # EOS inside a document would be read as the special token and break the document boundaries.
        files.append(SourceFile(rel.as_posix(), text.replace(EOS, "")))
    files.sort(key=lambda f: f.rel)
    return files


def is_held_out(rel: str, per_mille: int = HELD_OUT_PER_MILLE) -> bool:
    """Stable assignment of a file to the held-out set: sha256 of its relative path, not `hash()`,
    whose value changes between interpreter runs."""
    digest = hashlib.sha256(rel.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 1000 < per_mille


def split_sources(
    files: Iterable[SourceFile], per_mille: int = HELD_OUT_PER_MILLE
) -> tuple[list[SourceFile], list[SourceFile]]:
    """(train, held_out): disjoint, deterministic, each in the input order."""
    train, held = [], []
    for f in files:
        (held if is_held_out(f.rel, per_mille) else train).append(f)
    return train, held


def join_documents(files: Iterable[SourceFile]) -> str:
    """All documents as one text, each followed by the EOS separator (as in the training stream)."""
    return "".join(f.text + EOS for f in files)


def write_held_out(path: str | Path, files: Iterable[SourceFile] | None = None) -> Path:
    """Write the held-out documents (default: those of this stdlib) to one UTF-8 file for `eval --text`.

    Documents are separated by the EOS text, which the tokenizer reads as its special token.
    """
    if files is None:
        files = split_sources(collect_sources())[1]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(join_documents(files), encoding="utf-8")
    return path
