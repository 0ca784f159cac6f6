"""A byte-level BPE tokenizer trained on the corpus, saved in the Hugging Face layout."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from parscale.errors import ParScaleError
from parscale.text import TOKENIZER_FILE
from parscale.train.corpus import EOS

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# Pre-tokens: a word or a punctuation run, each with at most one trailing space, or a whitespace run
# (a newline with the next line's indentation becomes one pre-token). The space goes *after* the word,
# unlike GPT-2's " word": a prompt such as "def " or "x = " then ends on a complete token, as the
# same text does in training, instead of on a lone space the model has only seen before a newline.
PRE_TOKEN_PATTERN = r"[\p{L}\p{N}_]+ ?|[^\s\p{L}\p{N}_]+ ?|\s+"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE on `texts`; EOS is id 0.

    Byte-level means every string round-trips exactly, whatever the training set held. Pre-tokens
    follow PRE_TOKEN_PATTERN rather than GPT-2's regex (same compression on held-out stdlib code at
    vocab 4096: 3.45 bytes per token).
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRE_TOKEN_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def eos_id(tok: Tokenizer) -> int:
    """The id of the EOS / document-separator token."""
    i = tok.token_to_id(EOS)
    if i is None:
        raise ParScaleError(f"tokenizer has no {EOS} token")
    return i


def save_tokenizer(tok: Tokenizer, out: str | Path, model_max_length: int) -> None:
    """Write `tokenizer.json` and a `tokenizer_config.json` that transformers' AutoTokenizer reads."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / TOKENIZER_FILE))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS,
        "pad_token": EOS,  # as Qwen2: padding is masked out, so reusing EOS is harmless
        "bos_token": None,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            str(eos_id(tok)): {
                "content": EOS, "lstrip": False, "rstrip": False, "normalized": False,
                "single_word": False, "special": True,
            }
        },
    }
    (out / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """The `tokenizer.json` of a checkpoint or export folder (a ParScaleError naming the file if it cannot be read:
    the tokenizers library's own error names no file)."""
    path = Path(model_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise ParScaleError(f"{path} not found: training needs the checkpoint's tokenizer ({TOKENIZER_FILE})")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
        raise ParScaleError(f"cannot read tokenizer {path}: {e}") from None
