"""Chat templates: the export's `chat_template` (tokenizer_config.json) or a file, rendered in a sandbox.

Templates are Jinja2, as Hugging Face tokenizers ship them, written by whoever made the model: they
run in Jinja2's `ImmutableSandboxedEnvironment` (no access to Python internals, no mutation of the
data passed in), with what `transformers`' `apply_chat_template` provides: `messages`,
`add_generation_prompt`, the special tokens (`bos_token`, `eos_token`, ...), `raise_exception` and
`strftime_now`. The messages are checked first (roles, text content) so that a template sees plain
strings only.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from parscale.errors import ParScaleError
from parscale.manifest import listed_file
from parscale.serve.protocol import APIError

TOKENIZER_CONFIG = "tokenizer_config.json"
ROLES = ("system", "developer", "user", "assistant", "tool")
SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")


class ChatTemplate:
    """A compiled chat template and the special tokens it may refer to."""

    def __init__(self, source: str, special_tokens: dict[str, str], origin: str) -> None:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
        try:
            self.template = env.from_string(source)
        except TemplateError as e:
            raise ParScaleError(f"the chat template of {origin} is not a valid Jinja2 template: {e}") from None
        self.special_tokens, self.origin = special_tokens, origin

    @classmethod
    def load(cls, export: Path, path: Path | None = None) -> ChatTemplate | None:
        """The template of `path` (a Jinja2 file) if given, else the export's own; None if it has none."""
        config = _read_config(listed_file(export, TOKENIZER_CONFIG))  # only as the manifest lists it
        special = {k: t for k in SPECIAL if (t := _token(config.get(k))) is not None}
        if path is not None:
            try:
                return cls(Path(path).read_text(encoding="utf-8"), special, str(path))
            except (OSError, UnicodeDecodeError) as e:
                raise ParScaleError(f"cannot read the chat template {path}: {e}") from None
        source = config.get("chat_template")
        if isinstance(source, list):  # several named templates: the default one serves chat
            source = next((t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"),
                          None)
        if source is None:
            return None
        if not isinstance(source, str):
            raise ParScaleError(f"chat_template in {export / TOKENIZER_CONFIG} is not a string")
        return cls(source, special, str(export / TOKENIZER_CONFIG))

    def render(self, messages: Any) -> str:
        """The prompt text of a conversation, ending where the assistant's answer starts."""
        checked = check_messages(messages)
        try:
            return self.template.render(messages=checked, add_generation_prompt=True, **self.special_tokens)
        except Exception as e:  # the template's own checks (raise_exception) and its bugs alike: the input's 400
            raise APIError(400, f"the chat template refused these messages: {type(e).__name__}: {e}",
                           param="messages") from None


def check_messages(messages: Any) -> list[dict[str, str]]:
    """Messages as plain {role, content[, name]} dicts of strings; APIError for anything else."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, f"{where} must be an object with role and content", param=where)
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise APIError(400, f"{where} has {', '.join(sorted(extra))}: only role, content and name are supported "
                           "(no tools)", param=where)
        if m.get("role") not in ROLES:
            raise APIError(400, f"{where}.role must be one of {', '.join(ROLES)}, got {m.get('role')!r}",
                           param=f"{where}.role")
        message = {"role": m["role"], "content": _content(m.get("content"), f"{where}.content")}
        if m.get("name") is not None:
            if not isinstance(m["name"], str):
                raise APIError(400, f"{where}.name must be a string", param=f"{where}.name")
            message["name"] = m["name"]
        out.append(message)
    return out


def _content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise APIError(400, f"{where} must be text or a list of {{type: 'text', text}} parts (only text is supported)",
                   param=where)


def _raise(message: str) -> None:
    from jinja2 import TemplateError

    raise TemplateError(message)


def _read_config(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ParScaleError(f"cannot read {path}: {e}") from None
    return config if isinstance(config, dict) else {}


def _token(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None
