"""Text: the tokenizer (tokenizer.json), EOS ids, a document's token ids, incremental detokenization.

The one home of these for the runtime, evaluation, fidelity, GPTQ calibration and training, so that
every scorer tokenizes a text the same way. Torch-free.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from parscale.config import ParScaleConfig
from parscale.errors import ParScaleError

TOKENIZER_FILE = "tokenizer.json"
EOS_TEXT = "<|endoftext|>"  # end of a document in the Qwen2 vocabulary and in the embedded model's
REPLACEMENT = "\ufffd"  # what a decoder emits for an incomplete UTF-8 sequence


class Tokenizer:
    """A `tokenizers.Tokenizer` loaded from an export folder's tokenizer.json."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer  # imported here: only text prompts need it

        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise ParScaleError(f"cannot read tokenizer {path}: {e}") from None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


class IncrementalDecoder:
    """Turns a growing list of token ids into text pieces that never split a UTF-8 character.

    Byte-level BPE tokens can end inside a multi-byte character; the decoder then shows U+FFFD.
    We decode a short window (from the last clean boundary) and hold text back while it ends in
    U+FFFD. Decoding the window against its own start (not the token alone) keeps decoders that
    treat the first token specially (leading spaces) consistent with decoding the whole sequence.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start: a clean character boundary
        self.read = 0  # tokens up to here have been emitted as text
        self.emitted = ""

    def push(self, token: int) -> str:
        """Add one token; return the newly completed text (possibly empty)."""
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        window = self.tokenizer.decode(self.ids[self.prefix :])
        if len(window) <= len(before) or window.endswith(REPLACEMENT):
            return ""
        piece = window[len(before) :]
        self.prefix, self.read = self.read, len(self.ids)
        self.emitted += piece
        return piece

    def flush(self) -> str:
        """Whatever text is left at the end (e.g. a truly invalid byte sequence shown as U+FFFD)."""
        full = self.tokenizer.decode(self.ids)
        rest = full[len(self.emitted) :] if full.startswith(self.emitted) else ""
        self.emitted += rest
        return rest


def load_eos_ids(folder: str | Path, vocab_size: int | None = None, *,
                 config: ParScaleConfig | None = None) -> list[int]:
    """The EOS ids of a checkpoint or export folder: the one reader of them.

    From generation_config.json (preferred, as transformers does), else config.json; an export's
    files are read as its manifest lists them (`listed_file`). `config`: the folder's config.json
    already loaded, read instead of the file. `vocab_size`: keep only the ids inside the vocabulary
    (a runtime cannot emit the others). A file that is not a JSON object, or an eos_token_id that is
    not a token id or a list of them, is refused naming the file.
    """
    from parscale.manifest import listed_file

    folder = Path(folder)
    # Both looked up first: an export's file present but unlisted (or altered) is refused either way.
    generation, config_file = (listed_file(folder, name) for name in ("generation_config.json", "config.json"))
    ids: Any = None
    where = folder / "config.json"
    if generation is not None:
        ids, where = _json_object(generation).get("eos_token_id"), generation
    if ids is None and config is not None:
        ids = config.eos_token_id
    elif ids is None and config_file is not None:
        ids = _json_object(config_file).get("eos_token_id")
    if ids is None:
        return []
    ids = ids if isinstance(ids, list) else [ids]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ParScaleError(f"{where}: eos_token_id must be a token id or a list of them, got {ids!r}")
    return [i for i in ids if vocab_size is None or i < vocab_size]


def _json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict):
        raise ParScaleError(f"{path} is not a valid JSON object")
    return data


def check_tokenizer_fits(tokenizer: Tokenizer, vocab_size: int, where: str | Path) -> Tokenizer:
    """Refuse a tokenizer that can produce ids the model has no row for (they would index past its
    embedding table: an IndexError in PyTorch, garbage or a crash in ONNX Runtime)."""
    if tokenizer.vocab_size > vocab_size:
        raise ParScaleError(
            f"{where}: {TOKENIZER_FILE} has {tokenizer.vocab_size} tokens but the model's vocabulary has "
            f"{vocab_size}: the tokenizer belongs to another model; use the checkpoint's own {TOKENIZER_FILE}")
    return tokenizer


def read_text(path: str | Path) -> str:
    """A UTF-8 text file's contents, or a ParScaleError naming the file."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ParScaleError(f"cannot read {path} as UTF-8 text: {e}") from None


def folder_tokenizer(folder: str | Path) -> Tokenizer:
    """The tokenizer.json of a checkpoint or export folder (an export's only as its manifest lists it)."""
    from parscale.manifest import listed_file

    path = listed_file(folder, TOKENIZER_FILE)
    if path is None:
        raise ParScaleError(f"{Path(folder) / TOKENIZER_FILE} not found: scoring text needs the folder's "
                            "tokenizer.json")
    return Tokenizer(path)


def document_ids(folder: str | Path, text: str, tokenizer: Tokenizer | None = None) -> np.ndarray:
    """The ids every scorer uses for a text: one document-boundary EOS as context, then the text.

    The EOS is the boundary the model saw between documents in training, so the first real token is
    predicted from a familiar context: the tokenizer's `<|endoftext|>` when it has one, else the
    first EOS id of the folder's generation_config.json / config.json, else none. No other special
    tokens are added (a BOS template, say): the context is chosen here, the same for all.
    `tokenizer`: the folder's, when the caller has it loaded already.
    """
    tok = tokenizer if tokenizer is not None else folder_tokenizer(folder)
    eos = tok.token_id(EOS_TEXT)
    context = [eos] if eos is not None else load_eos_ids(Path(folder), tok.vocab_size)[:1]
    return np.asarray(context + tok.encode(text, add_special_tokens=False), dtype=np.int64)
