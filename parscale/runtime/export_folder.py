"""Open an export folder: manifest, config, tokenizer, EOS ids and the ONNX Runtime session, checked together.

The one way an export is opened (the runtime's `Model`, `parscale inspect`, benchmarks). The cache
heads, head_dim and vocabulary come from the graph itself (`GraphInfo`), after the manifest and
config.json are compared with it, so nothing downstream has a second source for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parscale.args import check_threads
from parscale.config import ParScaleConfig
from parscale.driver import CPU, CUDA, GraphInfo, default_threads, open_session, resolve_provider
from parscale.errors import ParScaleError
from parscale.manifest import MODEL_FILE, Manifest, listed_file
from parscale.runtime.integrity import check_against_config, check_against_graph, verify_folder
from parscale.runtime.memory import advise_random_access, limit_malloc_retention
from parscale.text import TOKENIZER_FILE, Tokenizer, check_tokenizer_fits, load_eos_ids


@dataclass(frozen=True)
class ExportFolder:
    """Everything `parscale export` wrote that a runtime needs, read and cross-checked."""

    path: Path
    manifest: Manifest
    config: ParScaleConfig | None  # the config.json copied into the export (None if it was removed)
    tokenizer: Tokenizer | None  # None when the folder has no tokenizer.json (prompts as ids only)
    eos_ids: list[int]
    session: Any  # onnxruntime.InferenceSession
    info: GraphInfo  # read from the graph: the one source of cache heads, head_dim and vocabulary
    provider: str  # the ONNX Runtime provider the session runs on

    @classmethod
    def check(cls, path: str | Path, *, verify: bool = True) -> Manifest:
        """The checks that need no session: manifest types, file sizes (hashes and NaN/Inf with
        `verify`), and the manifest against config.json. Returns the manifest."""
        return _checked(Path(path), verify)[0]

    @classmethod
    def open(cls, path: str | Path, *, provider: str = "auto", threads: int | None = None,
             verify: bool = True, spin: bool | None = None) -> ExportFolder:
        """Open an export folder on 'auto', 'cpu' or 'cuda'.

        Before ONNX Runtime reads anything: the manifest's fields are type-checked and every file it
        lists must have its size; with `verify` (the default) also its sha256, and no floating-point
        weight may hold NaN/Inf (`verify=False` skips both, for folders too large to read twice).
        After the session is created, P, cache heads, head_dim, vocabulary, layers and context are
        compared with the graph and config.json. `threads` is clamped to the CPUs available; `spin`:
        whether idle worker threads spin (None: `graph.SPIN_DEFAULT`).
        """
        path = Path(path)
        manifest, config = _checked(path, verify)
        name = resolve_provider(provider)
        threads = check_threads(threads if threads is not None else default_threads(), "threads")
        limit_malloc_retention()
        if spin is not None and not isinstance(spin, bool):
            raise ParScaleError(f"spin must be True, False or None, got {spin!r}")
        session = open_session(path / MODEL_FILE, provider=name, threads=threads, spin=spin)
        info = check_against_graph(path, manifest.model.runtime_fields(), session, manifest)
        if name == CUDA and CUDA not in session.get_providers():  # onnxruntime-gpu without a usable GPU
            if provider == "cuda":
                raise ParScaleError("onnxruntime could not initialise CUDA (no GPU or missing CUDA/cuDNN libraries)")
            name = CPU
        for data in sorted(path.glob(MODEL_FILE + "*.data")):
            advise_random_access(data)  # tables read in place (embeddings): fault in rows, not folios
        tok_path = listed_file(path, TOKENIZER_FILE)  # read only when the manifest lists it, with its hash
        tokenizer = None
        if tok_path is not None:
            tokenizer = check_tokenizer_fits(Tokenizer(tok_path), info.vocab_size, path)
        eos_ids = load_eos_ids(path, info.vocab_size, config=config)  # config.json already read: not again
        return cls(path=path, manifest=manifest, config=config, tokenizer=tokenizer, eos_ids=eos_ids,
                   session=session, info=info, provider=name)


def _checked(path: Path, verify: bool) -> tuple[Manifest, ParScaleConfig | None]:
    manifest = Manifest.read(path)
    verify_folder(path, manifest, verify=verify)
    return manifest, check_against_config(path, manifest.model.runtime_fields())
