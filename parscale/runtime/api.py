"""`Model`: load an export folder and generate from it.

    m = Model.load("export")
    r = m.generate("def f", max_new_tokens=20)
    for piece in m.stream("def f", max_new_tokens=20):
        print(piece, end="")
    for event in m.stream_tokens("def f", max_new_tokens=20):
        print(event.token_id, repr(event.text))
    r = event.result  # the last event carries the call's GenerationResult
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from parscale.args import check_bool, check_generation, check_stop
from parscale.config import Streams
from parscale.driver import CPU, GraphInfo
from parscale.errors import ParScaleError
from parscale.runtime.batch import run_generation
from parscale.runtime.engine import Engine
from parscale.runtime.export_folder import ExportFolder
from parscale.runtime.generate import GenerationOptions, GenerationResult, Step, TokenEvent, call_options, takes_options
from parscale.runtime.memory import check_cache_fits
from parscale.runtime.sampling import SamplingConfig
from parscale.text import TOKENIZER_FILE

Prompt = str | Sequence[int] | Sequence[str] | Sequence[Sequence[int]]


class Model:
    """An export loaded into ONNX Runtime, with its tokenizer (if the folder has one) and EOS ids.

    `generate`, `stream` and `stream_tokens` may be called from several threads at once. After
    `load` the Model is only read: each call builds its own `Engine` (its own I/O binding, KV cache
    and logits buffer), sampler and text decoders, and returns its result to its caller. The
    calls share the ONNX Runtime session, whose `run_with_iobinding` may run concurrently as long
    as every call binds through its own I/O binding, which the per-call Engine guarantees.
    """

    def __init__(self, folder: ExportFolder) -> None:
        self.folder = folder
        self.path, self.manifest = folder.path, folder.manifest
        self.session, self.provider = folder.session, folder.provider
        self.tokenizer, self.eos_ids, self.info = folder.tokenizer, folder.eos_ids, folder.info
        self.P: int = folder.manifest.model.P  # the default; a multi-P export serves every P of `streams`
        self.streams: Streams = folder.manifest.streams
        self.vocab_size: int = folder.info.vocab_size
        self.context_length: int = folder.manifest.model.max_position_embeddings

    @classmethod
    def load(cls, path: str | Path, provider: str = "auto", threads: int | None = None,
             verify: bool = True, verify_checksums: bool | None = None, spin: bool | None = None) -> Model:
        """Open an export folder (made by `parscale export`) on 'auto', 'cpu' or 'cuda'.

        The checks are `ExportFolder.open`'s: manifest types and file sizes always; with `verify`
        (the default) sha256 and NaN/Inf weights too; then the manifest against the graph and
        config.json. `threads` is clamped to the CPUs available. `spin`: whether ONNX Runtime's idle
        worker threads spin between operators (faster on a quiet machine) or sleep (kinder to a busy
        one); None takes the measured default (`parscale.driver.SPIN_DEFAULT`). `verify_checksums` is
        the old name of `verify`.
        """
        if verify_checksums is not None:
            verify = verify_checksums
        if not isinstance(path, (str, Path)):
            raise ParScaleError(f"path must be an export folder (str or Path), got {type(path).__name__}")
        check_bool(verify, "verify")
        return cls(ExportFolder.open(path, provider=provider, threads=threads, verify=verify, spin=spin))

    @property
    def device(self) -> str:
        """'cpu' or 'cuda': where the session runs."""
        return "cpu" if self.provider == CPU else "cuda"

    def encode(self, text: str) -> list[int]:
        """Text -> token ids with the export's tokenizer (special tokens added as the tokenizer says)."""
        if self.tokenizer is None:
            raise ParScaleError(f"{self.path} has no {TOKENIZER_FILE}: pass the prompt as token ids")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # e.g. undecodable argv bytes, which Python keeps as lone surrogates
            raise ParScaleError("the prompt is not valid UTF-8 text; pass UTF-8 text or token ids") from None
        return self.tokenizer.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids -> text, special tokens left out."""
        if self.tokenizer is None:
            raise ParScaleError(f"{self.path} has no {TOKENIZER_FILE}: cannot turn ids into text")
        return self.tokenizer.decode(list(ids))

    @takes_options
    def generate(self, prompt: Prompt | None = None, *, prompt_ids: Sequence[int] | None = None,
                 options: GenerationOptions | None = None, **kwargs: Any) -> GenerationResult | list[GenerationResult]:
        """Generate for one prompt (-> a result) or a batch (a list of prompts -> a list of results).

        A prompt is text or a list of token ids (`prompt_ids` takes ids only). A batch is
        left-padded and runs together. The options (`GenerationOptions`: max_new_tokens, greedy,
        temperature, top_k, top_p, repetition_penalty, seed, stop, ignore_eos, P) come as keywords, or
        as `options=`, which keywords then override. Each call picks its own P; the backbone is
        loaded once for all.

        Bad input raises ParScaleError before ONNX Runtime runs.
        """
        started = time.perf_counter()
        prompts, single = self._prompts(prompt, prompt_ids)
        steps = self._start(prompts, started, call_options(options, kwargs, "generate"))
        results: list[GenerationResult] | None = None
        for step in steps:  # run to the end, so that the engine is released here
            results = step.results
        if results is None:  # run_generation's last step always carries them
            raise RuntimeError("generation ended without results")
        return results[0] if single else results

    @takes_options
    def stream_tokens(self, prompt: Prompt | None = None, *, prompt_ids: Sequence[int] | None = None,
                      options: GenerationOptions | None = None, **kwargs: Any) -> Iterator[TokenEvent]:
        """One `TokenEvent` per new token of one prompt; the last event's `result` is the `GenerationResult`.

        Options as for `generate`. Works without a tokenizer (every event's text is then '').
        The input is checked here, before the first event is asked for; the KV cache lives until the
        iteration ends (or the iterator is closed or dropped).
        """
        started = time.perf_counter()
        prompts = self._one_prompt(prompt, prompt_ids, "stream_tokens")
        steps = self._start(prompts, started, call_options(options, kwargs, "stream_tokens"))
        return _token_events(steps)

    @takes_options
    def stream(self, prompt: Prompt | None = None, *, prompt_ids: Sequence[int] | None = None,
               options: GenerationOptions | None = None, **kwargs: Any) -> Iterator[str]:
        """Yield the text of one prompt as it is generated (never splitting a character).

        Options as for `generate`; the pieces join to the result's `text`. For the token ids,
        finish reason or timings as well, iterate `stream_tokens` instead.
        """
        started = time.perf_counter()
        prompts = self._one_prompt(prompt, prompt_ids, "stream")
        opts = call_options(options, kwargs, "stream")
        if self.tokenizer is None:
            raise ParScaleError(f"{self.path} has no {TOKENIZER_FILE}: streaming text needs one; "
                                "use stream_tokens for token ids")
        return (event.text for event in _token_events(self._start(prompts, started, opts)) if event.text)

    def engine(self, info: GraphInfo) -> Engine:
        """A new Engine (one call's binding and cache) on this model's session, driving the graph as `info`
        says (`self.info.at(P)`); it can move cached rows (`Engine.shifts`) when config.json gives the
        rotary base."""
        config = self.folder.config
        return Engine(self.session, info, self.provider, rope_theta=config.rope_theta if config is not None else None)

    # ------------------------------------------------------------------ input checks

    def check_streams(self, P: Any) -> int:  # noqa: N803
        """`P` (None: the default) if this export serves it, else a ParScaleError naming the P it serves."""
        return self.streams.pick(P, str(self.path))

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
            if raw.ndim not in (1, 2):  # its values are checked below, as a list's are
                raise ParScaleError(f"a prompt array holds token ids, 1-D (one prompt) or 2-D (a batch); got "
                                    f"a {raw.ndim}-D array")
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

    def _one_prompt(self, prompt: Prompt | None, prompt_ids: Sequence[int] | None, what: str) -> list[list[int]]:
        prompts, single = self._prompts(prompt, prompt_ids)
        if not single:
            raise ParScaleError(f"{what} takes one prompt; use generate for a batch")
        return prompts

    def _start(self, prompts: list[list[int]], started: float, opts: GenerationOptions) -> Iterator[Step]:
        """Check the options and set up one call: a fresh Engine (never shared between calls) and sampler."""
        info = self.info.at(self.check_streams(opts.P))
        longest = max(len(p) for p in prompts)
        max_new_tokens = check_generation(longest, opts.max_new_tokens, self.context_length)
        check_cache_fits(info, len(prompts), longest + max_new_tokens)
        stops = check_stop(opts.stop)
        ignore_eos = check_bool(opts.ignore_eos, "ignore_eos")
        if stops and self.tokenizer is None:
            raise ParScaleError(f"{self.path} has no {TOKENIZER_FILE}: stop strings need one")
        sampling = SamplingConfig(greedy=opts.greedy, temperature=opts.temperature, top_k=opts.top_k,
                                  top_p=opts.top_p, repetition_penalty=opts.repetition_penalty, seed=opts.seed)
        return run_generation(
            self.engine(info), prompts, max_new_tokens=max_new_tokens, sampling=sampling,
            eos_ids=self.eos_ids, stop=stops, tokenizer=self.tokenizer, ignore_eos=ignore_eos, started=started,
        )


def _token_events(steps: Iterator[Step]) -> Iterator[TokenEvent]:
    """The steps of a one-prompt generation as token events (a single row never skips a step)."""
    for step in steps:
        token = step.tokens[0]
        if token is None:  # the loop stops once the only row has finished
            raise RuntimeError("a one-prompt generation yielded a step without a token")
        yield TokenEvent(token, step.pieces[0], step.results[0] if step.results is not None else None)
