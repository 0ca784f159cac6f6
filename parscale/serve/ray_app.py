"""`parscale serve --ray`: the same app as a Ray Serve deployment, one `Model` in each replica.

Ray Serve's proxy takes the HTTP requests and spreads them over the replicas; inside a replica our
own batcher batches them as the single-process server does (Ray Serve's `@serve.batch` would batch
whole requests but knows nothing of streaming, per-row settings or rows joining between decode
steps). Every route, error and stream is `parscale.serve.app`'s: the replica builds that app at
start (`__serve_build_asgi_app__`), so it loads the export itself, from a path every node can read.

From Python, on a cluster of your own:

    from ray import serve
    from parscale.serve.ray_app import deployment

    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    serve.run(deployment("EXPORT", replicas=2), name="parscale", route_prefix="/")
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.deployment import Application

from parscale.runtime import Model
from parscale.serve.app import MAX_BODY_BYTES, create_app
from parscale.serve.chat import ChatTemplate

APP_NAME = "parscale"


@serve.deployment(name="parscale")
@serve.ingress()
class ParScaleReplica:
    """One replica: a `Model` and its batcher behind `parscale.serve.app`'s routes."""

    def __init__(self, export: str, options: dict[str, Any]) -> None:
        self.export, self.options = export, dict(options)

    def __serve_build_asgi_app__(self) -> Any:
        o = self.options
        model = Model.load(self.export, provider="cpu", threads=o.pop("threads"), verify=o.pop("verify"))
        template = o.pop("chat_template")
        o["chat_template"] = ChatTemplate.load(model.path, Path(template) if template is not None else None)
        return create_app(model, **o)


def deployment(export: str | Path, *, replicas: int = 2, threads: int = 1, num_cpus: float | None = None,
               max_batch: int = 8, max_queue: int = 64, api_key: str | None = None, name: str | None = None,
               chat_template: str | Path | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               verify: bool = True, shutdown_timeout: float = 10.0) -> Application:
    """The Ray Serve application: `replicas` replicas of the server, each with `threads` intra-op threads
    and `num_cpus` Ray CPUs (default: `threads`). Options as for `parscale.serve.app.serve`; a replica
    being stopped lets its requests finish for `shutdown_timeout` seconds."""
    export = Path(export).resolve()
    options = dict(threads=threads, verify=verify, max_batch=max_batch, max_queue=max_queue, api_key=api_key,
                   name=name or export.name, chat_template=str(chat_template) if chat_template else None,
                   max_body_bytes=max_body_bytes)
    return ParScaleReplica.options(  # type: ignore[attr-defined]
        num_replicas=replicas, ray_actor_options={"num_cpus": threads if num_cpus is None else num_cpus},
        # Ray Serve hands a replica at most this many requests at once: what its batcher runs and queues.
        max_ongoing_requests=max_batch + max_queue, graceful_shutdown_timeout_s=shutdown_timeout,
    ).bind(str(export), options)


def run(export: str | Path, *, host: str = "127.0.0.1", port: int = 8000, replicas: int = 2, threads: int = 1,
        address: str | None = None, shutdown_timeout: float = 10.0,
        on_ready: Callable[[str, Any], None] | None = None, **options: Any) -> None:
    """Start (or join, with `address`) a Ray cluster, deploy the server on it, and serve until SIGTERM or
    Ctrl-C; then shut Serve and the local cluster down."""
    import ray

    ChatTemplate.load(Path(export), Path(options["chat_template"]) if options.get("chat_template") else None)
    if address is None:
        ray.init(num_cpus=replicas * threads, include_dashboard=False, log_to_driver=False,
                 _node_ip_address="127.0.0.1" if host in ("127.0.0.1", "localhost") else None)
    else:
        ray.init(address=address, log_to_driver=False)
    # After ray.init, which installs a SIGTERM handler of its own that aborts the process.
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(deployment(export, replicas=replicas, threads=threads, shutdown_timeout=shutdown_timeout,
                             **options), name=APP_NAME, route_prefix="/")
        if on_ready is not None:
            on_ready(f"http://{host}:{port}", None)
        stop.wait()
        serve.delete(APP_NAME)  # replicas finish what they run (for shutdown_timeout) before they go
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        serve.shutdown()
        ray.shutdown()
