"""`Model`: load an export folder and generate from it.

    m = Model.load("export")
    r = m.generate("def f", max_new_tokens=20)
    for piece in m.stream("def f", max_new_tokens=20):
        print(piece, end="")
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from parscale.args import check_generation, check_seed
from parscale.errors import ParScaleError
from parscale.graph import CPU
from parscale.runtime.folder import ExportFolder
from parscale.runtime.generate import Generation, GenerationResult
from parscale.runtime.sampling import Sampler, SamplingConfig
from parscale.runtime.session import Engine
from parscale.text import TOKENIZER_FILE

Prompt = str | Sequence[int] | Sequence[str] | Sequence[Sequence[int]]


class Model:
    """An export loaded into ONNX Runtime, with its tokenizer (if the folder has one) and EOS ids.

    `generate` and `stream` may be called from several threads: each call has its own cache.
    """

    def __init__(self, folder: ExportFolder) -> None:
        self.folder = folder
        self.path, self.manifest = folder.path, folder.manifest
        self.session, self.provider = folder.session, folder.provider
        self.tokenizer, self.eos_ids, self.info = folder.tokenizer, folder.eos_ids, folder.info
        self.P: int = folder.manifest.model.P
        self.vocab_size: int = folder.info.vocab_size
        self.context_length: int = folder.manifest.model.max_position_embeddings

    @classmethod
    def load(cls, path: str | Path, provider: str = "auto", threads: int | None = None,
             verify: bool = True, verify_checksums: bool | None = None) -> Model:
        """Open an export folder (made by `parscale export`) on 'auto', 'cpu' or 'cuda'.

        The checks are `ExportFolder.open`'s: manifest types and file sizes always; with `verify`
        (the default) sha256 and NaN/Inf weights too; then the manifest against the graph and
        config.json. `threads` is clamped to the CPUs available. `verify_checksums` is the old name
        of `verify`.
        """
        if verify_checksums is not None:
            verify = verify_checksums
        return cls(ExportFolder.open(path, provider=provider, threads=threads, verify=verify))

    @property
    def device(self) -> str:
        return "cpu" if self.provider == CPU else "cuda"

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ParScaleError(f"{self.path} has no {TOKENIZER_FILE}: pass the prompt as token ids")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # e.g. undecodable argv bytes, which Python keeps as lone surrogates
            raise ParScaleError("the prompt is not valid UTF-8 text; pass UTF-8 text or token ids") from None
        return self.tokenizer.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            raise ParScaleError(f"{self.path} has no {TOKENIZER_FILE}: cannot turn ids into text")
        return self.tokenizer.decode(list(ids))

    def generate(self, prompt: Prompt | None = None, *, prompt_ids: Sequence[int] | None = None,
                 **kwargs: Any) -> GenerationResult | list[GenerationResult]:
        """Generate for one prompt (-> a result) or a batch (list of prompts -> list of results).

        A prompt is text or a list of token ids. Keyword arguments: max_new_tokens (64), greedy,
        temperature (0 = greedy), top_k, top_p, repetition_penalty, seed, stop (a string or
        strings), ignore_eos. Batches are left-padded and run together.
        """
        started = time.perf_counter()
        prompts, single = self._prompts(prompt, prompt_ids)
        gen = self._generation(prompts, started, **kwargs)
        for _ in gen:
            pass
        return gen.results[0] if single else gen.results

    def stream(self, prompt: Prompt | None = None, *, prompt_ids: Sequence[int] | None = None,
               **kwargs: Any) -> Iterator[str]:
        """Yield the text of one prompt as it is generated (never splitting a character).

        After the loop, `self.last_result` holds the `GenerationResult` (ids, finish reason, timings).
        """
        started = time.perf_counter()
        prompts, single = self._prompts(prompt, prompt_ids)
        if not single:
            raise ParScaleError("stream takes one prompt; use generate for a batch")
        if self.tokenizer is None:
            raise ParScaleError(f"{self.path} has no {TOKENIZER_FILE}: streaming text needs one")
        gen = self._generation(prompts, started, **kwargs)
        for pieces in gen:
            if pieces[0]:
                yield pieces[0]
        self.last_result = gen.results[0]

    def stream_results(self, prompt: Prompt | None = None, *, prompt_ids: Sequence[int] | None = None,
                       **kwargs: Any) -> Generation:
        """The underlying `Generation`: iterate for per-row text pieces; `.results` when done."""
        started = time.perf_counter()
        prompts, _ = self._prompts(prompt, prompt_ids)
        return self._generation(prompts, started, **kwargs)

    # ------------------------------------------------------------------ input checks

    def _prompts(self, prompt: Prompt | None, prompt_ids: Sequence[int] | None) -> tuple[list[list[int]], bool]:
        """Normalise to a batch of id lists; check them against the vocabulary."""
        if (prompt is None) == (prompt_ids is None):
            raise ParScaleError("pass exactly one of prompt (text or ids) and prompt_ids")
        raw: Any = prompt_ids if prompt_ids is not None else prompt
        if isinstance(raw, (bytes, bytearray, memoryview)):
            raise ParScaleError(f"a prompt is text (str) or a list of int token ids, got {type(raw).__name__}; "
                                "decode bytes first, e.g. prompt.decode('utf-8')")
        if prompt_ids is not None and isinstance(raw, str):
            raise ParScaleError("prompt_ids takes a list of int token ids; pass text as prompt")
        if isinstance(raw, str):
            batch, single = [self.encode(raw)], True
        elif isinstance(raw, np.ndarray):
            raw = raw.tolist()
            batch, single = (raw, False) if raw and isinstance(raw[0], list) else ([raw], True)
        elif isinstance(raw, Sequence) and raw and all(isinstance(x, str) for x in raw):
            batch, single = [self.encode(x) for x in raw], False
        elif isinstance(raw, Sequence) and raw and all(isinstance(x, Sequence) and not isinstance(x, bytes)
                                                       for x in raw):
            batch, single = [list(x) for x in raw], False
        elif isinstance(raw, Sequence):
            batch, single = [list(raw)], True
        else:
            raise ParScaleError(f"a prompt is text or a list of token ids, got {type(raw).__name__}")
        for i, ids in enumerate(batch):
            where = "" if single else f" (prompt {i})"
            if not ids:
                raise ParScaleError(f"the prompt is empty{where}: give at least one token")
            wrong = [t for t in ids if isinstance(t, bool) or not isinstance(t, (int, np.integer))]
            if wrong:
                raise ParScaleError(f"expected int token ids{where}, got {wrong[0]!r} ({type(wrong[0]).__name__})")
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ParScaleError(
                    f"token id {bad[0]!r}{where} is outside the vocabulary (0..{self.vocab_size - 1})"
                )
        return [[int(t) for t in ids] for ids in batch], single

    def _generation(self, prompts: list[list[int]], started: float, *, max_new_tokens: int = 64,
                    greedy: bool = False, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                    repetition_penalty: float = 1.0, seed: int | None = None,
                    stop: str | Sequence[str] | None = None, ignore_eos: bool = False) -> Generation:
        check_generation(max(len(p) for p in prompts), max_new_tokens, self.context_length)
        check_seed(seed, "seed")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if not all(isinstance(s, str) and s for s in stops):
            raise ParScaleError(f"stop takes non-empty strings, got {stop!r}")
        if stops and self.tokenizer is None:
            raise ParScaleError(f"{self.path} has no {TOKENIZER_FILE}: stop strings need one")
        config = SamplingConfig(greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p,
                                repetition_penalty=repetition_penalty, seed=seed)
        return Generation(
            Engine(self.session, self.info, self.provider), prompts, max_new_tokens=max_new_tokens,
            sampler=Sampler(config, self.vocab_size, len(prompts)), eos_ids=self.eos_ids, stop=stops,
            tokenizer=self.tokenizer, ignore_eos=ignore_eos, started=started,
        )
