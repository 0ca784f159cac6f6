"""Token streams and the seeded window sampler that feeds training."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tokenizers import Tokenizer

from parscale.errors import ParScaleError
from parscale.train.corpus import SourceFile
from parscale.train.tokenizer import eos_id


def encode_stream(tok: Tokenizer, files: Sequence[SourceFile]) -> np.ndarray:
    """All documents as one int32 stream, each followed by EOS.

    Identical to encoding `join_documents(files)` as one text (special tokens split first), which
    is what the evaluators read, so held-out figures from training and from `eval` agree.
    """
    eos = eos_id(tok)
    parts: list[list[int]] = []
    for enc in tok.encode_batch([f.text for f in files]):
        parts.append(enc.ids)
        parts.append([eos])
    return np.fromiter((i for p in parts for i in p), dtype=np.int32)


class WindowSampler:
    """Batches of random fixed-length windows of a token stream, in a seeded, reproducible order.

    Windows may cross document boundaries (the EOS between documents is in the stream), as in GPT
    style pre-training; sampling offsets uniformly rather than walking the stream keeps the order
    independent of the batch size.
    """

    def __init__(self, stream: np.ndarray, length: int, batch: int, seed: int) -> None:
        if len(stream) < length + 2:
            raise ParScaleError(f"stream of {len(stream)} tokens is shorter than one window ({length} + 1)")
        self.stream = torch.from_numpy(stream.astype(np.int64))
        self.length, self.batch = length, batch
        self.gen = torch.Generator().manual_seed(seed)

    def next(self) -> torch.Tensor:
        """(batch, length + 1) int64: inputs are [:, :-1], targets [:, 1:]."""
        starts = torch.randint(0, len(self.stream) - self.length - 1, (self.batch,), generator=self.gen)
        offsets = torch.arange(self.length + 1)
        return self.stream[starts[:, None] + offsets]
