"""Training recipe of the embedded default model (stdlib corpus, byte-level BPE, two-stage ParScale).

Importing this package loads nothing heavy: the public names resolve on first use, so that a CLI can
list `parscale.train` without paying for torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Recipe", "TrainReport", "train", "train_default"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from parscale.train import recipe

        return getattr(recipe, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
