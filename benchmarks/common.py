"""Shared pieces of the benchmark scripts: the prompt, memory high-water marks, the result record."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from parscale.runtime.bench import max_rss_mb, peak_rss_mb, reset_peak_rss

__all__ = ["commit", "emit", "max_rss_mb", "peak_rss_mb", "prompt_ids", "reset_peak_rss"]

ROOT = Path(__file__).resolve().parent.parent


def prompt_ids(vocab_size: int, length: int, seed: int = 0) -> list[int]:
    """The prompt every system gets: the same random ids as `parscale bench` (same seed, same rng)."""
    return np.random.default_rng(seed).integers(0, vocab_size, size=length).tolist()


def emit(record: dict, out: Path | None) -> None:
    """Print the record as one JSON line (the harness reads it) and optionally save it."""
    line = json.dumps(record)
    if out is not None:
        out.write_text(line + "\n")
    sys.stdout.write(line + "\n")


def commit(*paths: str) -> str:
    """The commit measured: HEAD's short hash, marked when `paths` (what the figures depend on) have changes."""
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], capture_output=True, text=True, cwd=ROOT).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    # Results files written by the run itself are not code: they do not mark the commit as changed.
    changed = git("status", "--porcelain", "--", *paths, ":(exclude)benchmarks/results")
    return head + ("+uncommitted changes" if changed else "")
