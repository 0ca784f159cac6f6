"""The ASGI app (Starlette) of `parscale serve`, and `serve`, which runs it under uvicorn.

Routes: `GET /health`, `GET /v1/models` (and `/v1/models/{id}`), `POST /v1/completions`,
`POST /v1/chat/completions`. Every error is OpenAI's JSON body: bad input a 4xx (`protocol`), a full
queue 503 with Retry-After, a wrong or missing API key 401, an oversized body 413. A client that
disconnects (mid-stream or while waiting) frees its slot at the next decode step. On SIGTERM (or
Ctrl-C) the server stops accepting connections, lets what runs finish for `shutdown_timeout`
seconds, then ends what is left with an error event and exits.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from parscale.errors import ParScaleError
from parscale.runtime import Model
from parscale.serve.batcher import Batcher, Event, QueueFullError, ShuttingDownError, Ticket
from parscale.serve.chat import ChatTemplate
from parscale.serve.protocol import APIError, ModelNames, chunk, parse_chat, parse_completion, usage_chunk
from parscale.serve.protocol import Request as Generation
from parscale.serve.protocol import response as full_response

log = logging.getLogger("parscale.serve")
MAX_BODY_BYTES = 1 << 20
DRAIN_FACTOR = 8
RETRY_AFTER_S = 1
Handler = Callable[[Request], Awaitable[Response]]


def create_app(model: Model, *, name: str | None = None, max_batch: int = 8, max_queue: int = 64,
               api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               chat_template: ChatTemplate | None = None) -> Starlette:
    """The app serving `model` under `name` (default: the export folder's name) at every P it serves.

    `app.state.batcher` is its scheduler, started and stopped by the app's lifespan.
    """
    names = ModelNames(name or model.path.name, model.streams, model.P)
    batcher = Batcher(model, max_batch=max_batch, max_queue=max_queue)
    started = int(time.time())

    def endpoint(handler: Handler, *, auth: bool = True) -> Handler:
        async def run(request: Request) -> Response:
            try:
                if auth and api_key is not None:
                    _check_key(request, api_key)
                return await handler(request)
            except APIError as e:
                return _error(e)
        return run

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": names.name, "streams": list(names.streams),
                             **batcher.counts(), "stats": dict(batcher.stats)})

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [_model(i, started) for i in names.ids()]})

    async def retrieve(request: Request) -> Response:
        wanted = request.path_params["model_id"]
        if wanted not in names.ids():
            raise APIError(404, f"the model {wanted!r} does not exist; this server serves: {', '.join(names.ids())}",
                           param="model", code="model_not_found")
        return JSONResponse(_model(wanted, started))

    async def completions(request: Request) -> Response:
        body = await _json_body(request, max_body_bytes)
        return await _answer(request, parse_completion(body, names, model, max_prompts=max_queue,
                                                       created=int(time.time())))

    async def chat(request: Request) -> Response:
        body = await _json_body(request, max_body_bytes)
        return await _answer(request, parse_chat(body, names, model, chat_template, created=int(time.time())))

    async def _answer(request: Request, req: Generation) -> Response:
        queue: asyncio.Queue[Event] = asyncio.Queue()
        try:
            tickets = batcher.submit(req.specs, req.P, asyncio.get_running_loop(), queue)
        except QueueFullError as e:
            raise APIError(503, f"the server is busy ({e}); retry in a moment", kind="server_busy",
                           code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except ShuttingDownError as e:
            raise APIError(503, str(e), kind="server_busy", code="shutting_down") from None
        if req.stream:
            return _Stream(_events(req, tickets, queue), media_type="text/event-stream",
                           headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            results = await _unless_disconnected(request, _collect(tickets, queue))
        finally:
            _cancel(tickets)
        if results is None:  # the client left; nobody reads this
            return Response(status_code=499)
        return JSONResponse(full_response(req, results))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()

    routes = [
        Route("/health", endpoint(health, auth=False), methods=["GET"]),
        Route("/v1/models", endpoint(models), methods=["GET"]),
        Route("/v1/models/{model_id:path}", endpoint(retrieve), methods=["GET"]),
        Route("/v1/completions", endpoint(completions), methods=["POST"]),
        Route("/v1/chat/completions", endpoint(chat), methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: _http_error, Exception: _internal_error})
    app.state.batcher = batcher
    app.state.names = names
    return app


def _model(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "parscale"}


def _check_key(request: Request, api_key: str) -> None:
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
        what = "no API key was given" if not given else "the API key is wrong"
        raise APIError(401, f"{what}: send 'Authorization: Bearer KEY' with the server's --api-key",
                       code="invalid_api_key")


async def _json_body(request: Request, limit: int) -> dict[str, Any]:
    body = bytearray()
    seen = 0
    # Past the limit the rest is read and dropped (up to DRAIN_FACTOR times the limit), so that a client
    # still sending gets the 413 instead of a reset connection; beyond that the connection is dropped.
    async for part in request.stream():
        seen += len(part)
        if seen <= limit:
            body += part
        elif seen > DRAIN_FACTOR * limit:
            break
    if seen > limit:
        raise APIError(413, f"the request body exceeds the limit of {limit} bytes (--max-body-bytes)",
                       code="request_too_large")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    return data


async def _collect(tickets: list[Ticket], queue: asyncio.Queue[Event]) -> list[Any]:
    """Wait for every prompt's result (an error event raises APIError)."""
    results: list[Any] = [None] * len(tickets)
    left = len(tickets)
    while left:
        e = await queue.get()
        if e.error is not None:
            raise _event_error(e.error)
        if e.result is not None:
            results[e.index] = e.result
            left -= 1
    return results


async def _events(req: Generation, tickets: list[Ticket], queue: asyncio.Queue[Event]) -> AsyncIterator[str]:
    """Server-sent events of a streamed answer; the tickets are cancelled however the stream ends."""
    try:
        if req.chat:  # OpenAI's first chat chunk names the role
            for i in range(len(tickets)):
                yield _sse(chunk(req, i, "", first=True))
        left, tokens = len(tickets), 0
        while left:
            e = await queue.get()
            if e.error is not None:
                yield _sse(_event_error(e.error).body())
                break
            if e.result is not None:
                left -= 1
                yield _sse(chunk(req, e.index, None if req.chat else "", finish=e.result.finish_reason))
                continue
            tokens += 1
            if e.text or req.return_token_ids:
                yield _sse(chunk(req, e.index, e.text, token_ids=[e.token] if e.token is not None else None))
        else:
            if req.include_usage:
                yield _sse(usage_chunk(req, tokens))
        yield "data: [DONE]\n\n"
    finally:
        _cancel(tickets)


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _event_error(message: str) -> APIError:
    if "shutting down" in message:
        return APIError(503, message, kind="server_busy", code="shutting_down")
    return APIError(500, message, kind="server_error")


def _cancel(tickets: list[Ticket]) -> None:
    for t in tickets:
        t.cancelled = True  # finished ones are gone already; the others leave at the next step


async def _unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """`work`'s result, or None if the client disconnects first (`work` is then cancelled)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, gone):
            if not t.done():
                t.cancel()
    return task.result() if task.done() and not task.cancelled() else None


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _Stream(StreamingResponse):
    """A streaming response whose generator is closed (its finally run) even when sending fails."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"no route {request.url.path}: the routes are /health, /v1/models, /v1/completions and " \
                  "/v1/chat/completions"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    return _error(APIError(exc.status_code, message, headers=dict(exc.headers or {})))


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("internal error on %s: %r", request.url.path, exc)
    return _error(APIError(500, f"internal server error ({type(exc).__name__})", kind="server_error"))


# ----------------------------------------------------------------------------- running it


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free one); a clear error if it cannot be had."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        raise ParScaleError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def serve(export: str | Path, *, host: str = "127.0.0.1", port: int = 8000, threads: int | None = None,
          max_batch: int = 8, max_queue: int = 64, api_key: str | None = None, name: str | None = None,
          chat_template: str | Path | None = None, max_body_bytes: int = MAX_BODY_BYTES,
          shutdown_timeout: float = 10.0, provider: str = "auto", verify: bool = True,
          on_ready: Callable[[str, Starlette], None] | None = None) -> None:
    """Load `export` and serve it until SIGTERM or Ctrl-C; `on_ready(url, app)` once it listens."""
    model = Model.load(export, provider=provider, threads=threads, verify=verify)
    template = ChatTemplate.load(model.path, Path(chat_template) if chat_template is not None else None)
    app = create_app(model, name=name, max_batch=max_batch, max_queue=max_queue, api_key=api_key,
                     max_body_bytes=max_body_bytes, chat_template=template)
    sock = listen(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=int(shutdown_timeout) + 5)
    server = _Server(config, app.state.batcher, shutdown_timeout)
    if on_ready is not None:
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        on_ready(f"http://{shown}:{bound_port}", app)
    server.run(sockets=[sock])


class _Server(uvicorn.Server):
    """uvicorn's Server, which also drains the batcher when a shutdown signal arrives.

    A graceful stop is the end of the command's work, so it exits 0: uvicorn's own handler would
    raise the signal again once stopped, ending the process by the signal. A second Ctrl-C forces
    the exit, as in uvicorn.
    """

    def __init__(self, config: uvicorn.Config, batcher: Batcher, grace: float) -> None:
        super().__init__(config)
        self.batcher, self.grace = batcher, grace

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.batcher.drain(self.grace)  # what runs may finish for `grace` seconds, then is cancelled
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True
