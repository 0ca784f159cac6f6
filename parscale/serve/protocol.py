"""The OpenAI API as this server speaks it: request validation and response bodies.

Every bad input becomes an `APIError`, a 4xx status with OpenAI's error body
(`{"error": {"message", "type", "param", "code"}}`), raised before the model sees the request.
Fields are checked with the same rules (and words) as the CLI's options (`parscale.args`).
OpenAI fields whose behaviour we do not implement are refused unless they hold their default
value; unknown fields are refused by name, as OpenAI does. Extra fields: `parscale_p` (the P to
run), `top_k`, `repetition_penalty`, `ignore_eos` and `return_token_ids` (each choice then carries
its `token_ids`).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from parscale.args import MAX_SEED, check_float, check_generation, check_int
from parscale.config import Streams
from parscale.errors import ParScaleError
from parscale.runtime.batch import RowSpec
from parscale.runtime.generate import GenerationResult
from parscale.runtime.sampling import MAX_PENALTY, MIN_PENALTY, SamplingConfig

if TYPE_CHECKING:
    from parscale.runtime import Model
    from parscale.serve.chat import ChatTemplate

MAX_STOP = 4  # OpenAI's limit on stop strings
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
IGNORED = frozenset({"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"})
COMMON = frozenset({"model", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "stream_options", "n",
                    "logit_bias", "presence_penalty", "frequency_penalty", "logprobs",
                    "parscale_p", "top_k", "repetition_penalty", "ignore_eos", "return_token_ids"}) | IGNORED
COMPLETION_FIELDS = COMMON | {"prompt", "best_of", "echo", "suffix"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools",
                        "tool_choice", "parallel_tool_calls"}
# Fields we accept only at their default (value -> whether it is the default).
DEFAULT_ONLY: dict[str, Callable[[Any], bool]] = {
    "n": lambda v: v == 1, "best_of": lambda v: v == 1, "echo": lambda v: v is False, "suffix": lambda v: v == "",
    "logprobs": lambda v: v is False or v == 0, "top_logprobs": lambda v: v == 0, "logit_bias": lambda v: v == {},
    "presence_penalty": lambda v: v == 0, "frequency_penalty": lambda v: v == 0, "tools": lambda v: v == [],
    "tool_choice": lambda v: v == "none", "response_format": lambda v: v == {"type": "text"},
}
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}  # the runtime's finish reasons in OpenAI's words


class APIError(Exception):
    """An error answered as OpenAI does: `status`, and a body naming the problem and the field."""

    def __init__(self, status: int, message: str, *, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@contextmanager
def _field(name: str) -> Iterator[None]:
    """A ParScaleError raised while checking `name` becomes a 400 naming the field."""
    try:
        yield
    except ParScaleError as e:
        raise APIError(400, str(e), param=name) from None


@dataclass(frozen=True)
class ModelNames:
    """The names the server answers to: NAME (the default P) and NAME:p{P} for each P it serves."""

    name: str
    streams: Streams
    default: int

    def ids(self) -> list[str]:
        return [self.name, *(f"{self.name}:p{P}" for P in self.streams)]

    def resolve(self, requested: Any, parscale_p: Any) -> int:
        """The P a request asks for, by its model name or its `parscale_p` field."""
        served = ", ".join(self.ids())
        if not isinstance(requested, str):
            raise APIError(400, f"model must be a string, one of: {served}", param="model")
        P: int | None = None
        if requested != self.name:
            head, _, tail = requested.rpartition(":p")
            if head != self.name or not tail.isdigit():
                raise APIError(404, f"the model {requested!r} does not exist; this server serves: {served}",
                               param="model", code="model_not_found")
            try:
                P = self.streams.pick(int(tail), self.name)
            except ParScaleError:
                raise APIError(404, f"{self.name} serves P = {self.streams}; there is no {requested!r}",
                               param="model", code="model_not_found") from None
        if parscale_p is not None:
            with _field("parscale_p"):
                asked = check_int(parscale_p, "parscale_p")
            try:
                self.streams.pick(asked, self.name)
            except ParScaleError:
                raise APIError(400, f"{self.name} serves P = {self.streams}; got parscale_p={asked}",
                               param="parscale_p") from None
            if P is not None and asked != P:
                raise APIError(400, f"the model {requested!r} runs P={P}, but parscale_p is {asked}: "
                               "give one or the other", param="parscale_p")
            P = asked
        return self.default if P is None else P


@dataclass(frozen=True)
class Request:
    """A checked request: the P to run and one row per prompt."""

    chat: bool
    model: str  # as the client named it (echoed in the response)
    P: int
    specs: list[RowSpec]
    stream: bool
    include_usage: bool
    return_token_ids: bool
    id: str
    created: int


def parse_completion(body: dict[str, Any], names: ModelNames, model: Model, *, max_prompts: int,
                     created: int) -> Request:
    """A /v1/completions body -> Request (APIError for anything wrong with it)."""
    _check_fields(body, COMPLETION_FIELDS)
    P = names.resolve(body.get("model"), body.get("parscale_p"))
    if "prompt" not in body:
        raise APIError(400, "prompt is required: text, a list of texts, token ids or a list of token id lists",
                       param="prompt")
    prompts = _prompts(body["prompt"], model, max_prompts)
    return _request(body, names, model, P, prompts, chat=False, created=created, default_max=COMPLETION_MAX_TOKENS)


def parse_chat(body: dict[str, Any], names: ModelNames, model: Model, template: ChatTemplate | None, *,
               created: int) -> Request:
    """A /v1/chat/completions body -> Request; the messages go through the chat template."""
    _check_fields(body, CHAT_FIELDS)
    P = names.resolve(body.get("model"), body.get("parscale_p"))
    if template is None:
        raise APIError(400, f"{names.name} has no chat template (its tokenizer_config.json has no chat_template): "
                       "use /v1/completions, or start the server with --chat-template FILE",
                       param="messages", code="chat_template_missing")
    if "messages" not in body:
        raise APIError(400, "messages is required: a list of {role, content} objects", param="messages")
    text = template.render(body["messages"])
    with _field("messages"):
        ids = model.tokenizer.encode(text, add_special_tokens=False) if model.tokenizer is not None else []
    if not ids:
        raise APIError(400, "the chat template rendered the messages as no tokens", param="messages")
    if body.get("max_completion_tokens") is not None:
        if body.get("max_tokens") is not None:
            raise APIError(400, "give max_tokens or max_completion_tokens, not both", param="max_completion_tokens")
        body = {**body, "max_tokens": body["max_completion_tokens"]}
    return _request(body, names, model, P, [ids], chat=True, created=created, default_max=None)


def _check_fields(body: dict[str, Any], known: frozenset[str]) -> None:
    for key, value in body.items():
        if key not in known:
            raise APIError(400, f"unrecognized request argument supplied: {key}", param=key)
        if key in DEFAULT_ONLY and value is not None and not DEFAULT_ONLY[key](value):
            raise APIError(400, f"{key}={value!r} is not supported by this server (leave it out)", param=key)


def _prompts(raw: Any, model: Model, max_prompts: int) -> list[list[int]]:
    if isinstance(raw, str):
        batch: list[Any] = [raw]
    elif isinstance(raw, list) and raw and all(_is_id(t) for t in raw):
        batch = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(p, (str, list)) for p in raw):
        batch = raw
    else:
        raise APIError(400, "prompt must be text, a list of texts, a list of token ids or a list of token id "
                       f"lists, got {_kind(raw)}", param="prompt")
    if len(batch) > max_prompts:
        raise APIError(400, f"at most {max_prompts} prompts per request, got {len(batch)}", param="prompt")
    out = []
    for p in batch:
        if isinstance(p, str):
            if model.tokenizer is None:
                raise APIError(400, f"{model.path.name} has no tokenizer: send the prompt as token ids",
                               param="prompt")
            with _field("prompt"):
                ids = model.encode(p)
        elif all(_is_id(t) for t in p):
            ids = list(p)
            bad = [t for t in ids if not 0 <= t < model.vocab_size]
            if bad:
                raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0..{model.vocab_size - 1})",
                               param="prompt")
        else:
            raise APIError(400, "a token id prompt holds integers only", param="prompt")
        if not ids:
            raise APIError(400, "the prompt is empty: give at least one token", param="prompt")
        out.append(ids)
    return out


def _request(body: dict[str, Any], names: ModelNames, model: Model, P: int, prompts: list[list[int]], *,  # noqa: N803
             chat: bool, created: int, default_max: int | None) -> Request:
    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and not stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise APIError(400, "stream_options takes one field, include_usage (true or false)", param="stream_options")
    include_usage = _bool(options or {}, "include_usage", False, name="stream_options.include_usage")
    with _field("temperature"):
        temperature = check_float(_get(body, "temperature", 1.0), "temperature", minimum=0, maximum=2)
    with _field("top_p"):
        top_p = check_float(_get(body, "top_p", 1.0), "top_p", minimum=0, maximum=1)
        if top_p == 0:
            raise ParScaleError("top_p must be in (0, 1], got 0")
    with _field("top_k"):
        top_k = check_int(_get(body, "top_k", 0), "top_k", minimum=-1)
    with _field("repetition_penalty"):
        penalty = check_float(_get(body, "repetition_penalty", 1.0), "repetition_penalty",
                              minimum=MIN_PENALTY, maximum=MAX_PENALTY)
    with _field("seed"):
        seed = body.get("seed")
        seed = None if seed is None else check_int(seed, "seed", minimum=0, maximum=MAX_SEED)
    stop = _stop(body.get("stop"), model)
    ignore_eos = _bool(body, "ignore_eos", False)
    sampling = SamplingConfig(temperature=temperature, top_k=max(top_k, 0), top_p=top_p,
                              repetition_penalty=penalty, seed=seed)
    specs = []
    for ids in prompts:
        if default_max is None and body.get("max_tokens") is None and len(ids) >= model.context_length:
            raise APIError(400, f"the prompt ({len(ids)} tokens) fills the model's context length of "
                           f"{model.context_length} tokens", param="messages" if chat else "prompt")
        wanted = _get(body, "max_tokens", default_max if default_max is not None else model.context_length - len(ids))
        with _field("max_tokens"):
            check_generation(len(ids), wanted, model.context_length, name="max_tokens")
        specs.append(RowSpec(prompt=ids, max_new_tokens=wanted, sampling=sampling, stop=stop, ignore_eos=ignore_eos))
    prefix = "chatcmpl" if chat else "cmpl"
    return Request(chat=chat, model=body["model"], P=P, specs=specs, stream=stream, include_usage=include_usage,
                   return_token_ids=_bool(body, "return_token_ids", False), id=f"{prefix}-{uuid.uuid4().hex}",
                   created=created)


def _get(body: dict[str, Any], name: str, default: Any) -> Any:
    value = body.get(name)
    return default if value is None else value


def _bool(body: dict[str, Any], key: str, default: bool, name: str | None = None) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise APIError(400, f"{name or key} must be true or false, got {value!r}", param=name or key)
    return value


def _stop(raw: Any, model: Model) -> tuple[str, ...]:
    if raw is None:
        return ()
    stops = [raw] if isinstance(raw, str) else raw
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP:
        raise APIError(400, f"stop must be a non-empty string or a list of at most {MAX_STOP} of them, got "
                       f"{_kind(raw)}", param="stop")
    if stops and model.tokenizer is None:
        raise APIError(400, f"{model.path.name} has no tokenizer: stop strings need one", param="stop")
    return tuple(stops)


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{type(value).__name__} {text[:57]}..."


# ----------------------------------------------------------------------------- responses


def usage(prompts: Sequence[RowSpec], completion_tokens: int) -> dict[str, int]:
    prompt = sum(len(s.prompt) for s in prompts)
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens}


def response(req: Request, results: list[GenerationResult]) -> dict[str, Any]:
    """The whole answer of a request that is not streamed."""
    choices = []
    for i, r in enumerate(results):
        choice: dict[str, Any] = {"index": i, "finish_reason": FINISH[r.finish_reason], "logprobs": None}
        if req.chat:
            choice["message"] = {"role": "assistant", "content": r.text or ""}
        else:
            choice["text"] = r.text or ""
        if req.return_token_ids:
            choice["token_ids"] = r.generated_ids
        choices.append(choice)
    return {"id": req.id, "object": "chat.completion" if req.chat else "text_completion", "created": req.created,
            "model": req.model, "choices": choices,
            "usage": usage(req.specs, sum(len(r.generated_ids) for r in results))}


def chunk(req: Request, index: int, text: str | None, *, finish: str | None = None,
          token_ids: list[int] | None = None, first: bool = False) -> dict[str, Any]:
    """One server-sent event of a streamed answer (`text` None: no content in this chunk)."""
    choice: dict[str, Any] = {"index": index, "logprobs": None, "finish_reason": FINISH[finish] if finish else None}
    if req.chat:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        choice["delta"] = delta
    else:
        choice["text"] = text or ""
    if req.return_token_ids and token_ids is not None:
        choice["token_ids"] = token_ids
    return {"id": req.id, "object": "chat.completion.chunk" if req.chat else "text_completion",
            "created": req.created, "model": req.model, "choices": [choice]}


def usage_chunk(req: Request, completion_tokens: int) -> dict[str, Any]:
    """The last event when the client asked for `stream_options.include_usage`."""
    return {"id": req.id, "object": "chat.completion.chunk" if req.chat else "text_completion",
            "created": req.created, "model": req.model, "choices": [],
            "usage": usage(req.specs, completion_tokens)}
