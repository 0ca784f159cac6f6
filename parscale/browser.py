"""`parscale web`: serve the in-browser page (web/), its JavaScript and an export folder on loopback.

The page (web/index.html, web/parscale.js) runs the export with onnxruntime-web in the browser; this
module only serves files, with the Python standard library. Four roots, nothing outside them:

- `/` and `/<file>`: the page's own files, directly in web/ (no subfolders);
- `/vendor/onnxruntime-web/`: onnxruntime-web's dist/ (JavaScript and WebAssembly);
- `/vendor/tokenizers/`: @huggingface/tokenizers' dist/ (the tokenizer transformers.js uses);
- `/model/`: the export folder's files (no subfolders).

Both vendor packages come from web/node_modules, installed by `make web` (`npm ci`, pinned by
web/package-lock.json). Paths are resolved with symlinks followed and must stay inside their root,
so neither `..` nor a symlink reaches another file. Every response carries the cross-origin
isolation headers that WebAssembly threads need (SharedArrayBuffer).
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from parscale.errors import ParScaleError
from parscale.manifest import MANIFEST, Manifest, check_files

HOST = "127.0.0.1"  # loopback only: the page is for the person at this machine
DEFAULT_PORT = 8080
WEB_DIR = Path(__file__).resolve().parents[1] / "web"  # the repository's web/ (a source checkout)
PAGE_SUFFIXES = (".html", ".js", ".css", ".png", ".svg")
# URL prefix -> folder under web/ (the vendor packages, pinned by web/package-lock.json).
VENDOR = {
    "/vendor/onnxruntime-web/": Path("node_modules/onnxruntime-web/dist"),
    "/vendor/tokenizers/": Path("node_modules/@huggingface/tokenizers/dist"),
}
# Files the page loads from each vendor root: checked before serving, so a missing `make web` is one clear error.
REQUIRED = {
    "/vendor/onnxruntime-web/": ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.wasm", "ort-wasm-simd-threaded.mjs",
                                 "ort.webgpu.min.mjs", "ort-wasm-simd-threaded.asyncify.wasm",
                                 "ort-wasm-simd-threaded.asyncify.mjs"),
    "/vendor/tokenizers/": ("tokenizers.min.mjs",),
}
MODEL_PREFIX = "/model/"
MIME = {
    ".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8", ".json": "application/json",
    ".wasm": "application/wasm", ".png": "image/png", ".svg": "image/svg+xml", ".md": "text/markdown; charset=utf-8",
    ".txt": "text/plain; charset=utf-8", ".map": "application/json",
}
ISOLATION = {  # cross-origin isolation: SharedArrayBuffer, hence onnxruntime-web's WASM threads
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
}


@dataclass(frozen=True)
class Roots:
    """The folders the server may read: the page, each vendor package, the export."""

    web: Path
    vendor: dict[str, Path]
    model: Path
    listed: frozenset[str]  # the export's files the page may fetch: its manifest and what it lists

    def resolve(self, url_path: str) -> Path | None:
        """The file a request path names, or None when it names nothing servable (outside every root)."""
        path = unquote(urlsplit(url_path).path)
        if "\x00" in path or "\\" in path:
            return None
        if path == "/":
            return _inside(self.web, "index.html", flat=True, suffixes=PAGE_SUFFIXES)
        for prefix, root in self.vendor.items():
            if path.startswith(prefix):
                return _inside(root, path[len(prefix):], flat=False)
        if path.startswith(MODEL_PREFIX):
            name = path[len(MODEL_PREFIX):]
            if name not in self.listed:
                return None  # an unlisted file is never served (its integrity is unknown)
            return _inside(self.model, name, flat=True)
        return _inside(self.web, path[1:], flat=True, suffixes=PAGE_SUFFIXES)


def _inside(root: Path, rest: str, *, flat: bool, suffixes: tuple[str, ...] | None = None) -> Path | None:
    """root/rest if it is a regular file inside root once symlinks are followed (directly in it when flat)."""
    if not rest or rest.startswith("/"):
        return None
    try:
        target = (root / rest).resolve()
    except (OSError, RuntimeError):  # a symlink loop, an unreadable component
        return None
    inside = target.parent == root if flat else target.is_relative_to(root)
    if not inside or not target.is_file():
        return None
    if suffixes is not None and target.suffix not in suffixes:
        return None
    return target


def find_roots(export: str | Path, web_dir: str | Path | None = None) -> Roots:
    """Check the export folder and the page's files; raise ParScaleError naming what is missing."""
    export = Path(export)
    manifest = Manifest.read(export)  # refuses folders that are not exports
    check_files(export, manifest, checksums=False)  # sizes only: the browser does not hash either
    web = Path(web_dir) if web_dir is not None else WEB_DIR
    if not (web / "index.html").is_file():
        raise ParScaleError(f"the web page is not at {web} (no index.html): `parscale web` serves web/ from a "
                            "source checkout of parscale; pass --web-dir to point at it")
    vendor = {prefix: (web / sub).resolve() for prefix, sub in VENDOR.items()}
    missing = [str(web / VENDOR[p] / name) for p, names in REQUIRED.items() for name in names
               if not (vendor[p] / name).is_file()]
    if missing:
        raise ParScaleError(f"the page's JavaScript is not installed ({missing[0]} is missing"
                            f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}): run `make web` "
                            f"(npm ci in {web}, pinned by its package-lock.json)")
    return Roots(web=web.resolve(), vendor=vendor, model=export.resolve(),
                 listed=frozenset([MANIFEST, *manifest.files]))


class _Handler(BaseHTTPRequestHandler):
    roots: Roots
    log: Callable[[str], None] | None

    def do_GET(self) -> None:
        self._send(body=True)

    def do_HEAD(self) -> None:
        self._send(body=False)

    def _send(self, body: bool) -> None:
        path = self.roots.resolve(self.path)
        if path is None:
            self.send_error(HTTPStatus.NOT_FOUND, "not found")
            return
        try:
            f = path.open("rb")
        except OSError:
            self.send_error(HTTPStatus.NOT_FOUND, "not found")
            return
        with f:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", MIME.get(path.suffix, "application/octet-stream"))
            self.send_header("Content-Length", str(path.stat().st_size))
            self.send_header("Cache-Control", "no-cache")  # an export re-made in place must not be served stale
            self.end_headers()
            if body:
                try:
                    shutil.copyfileobj(f, self.wfile, 1 << 20)
                except (BrokenPipeError, ConnectionResetError):  # the page went away mid-download
                    return

    def end_headers(self) -> None:
        for name, value in ISOLATION.items():
            self.send_header(name, value)
        super().end_headers()

    def log_message(self, format: str, *args: object) -> None:
        if self.log is not None:
            self.log(format % args)


class WebServer:
    """A running `parscale web` server (loopback); `url` is the page. Stop with `close()`."""

    def __init__(self, roots: Roots, port: int, log: Callable[[str], None] | None = None) -> None:
        handler = type("Handler", (_Handler,), {"roots": roots, "log": staticmethod(log) if log else None})
        try:
            self._httpd = ThreadingHTTPServer((HOST, port), handler)
        except OSError as e:
            raise ParScaleError(f"cannot listen on {HOST}:{port}: {e.strerror}; pass another --port "
                                "(0 picks a free one)") from None
        self._httpd.daemon_threads = True
        self.roots = roots
        self.port = self._httpd.server_address[1]
        self.url = f"http://{HOST}:{self.port}/"
        self._thread: threading.Thread | None = None

    def serve_forever(self) -> None:
        """Serve in this thread until `close()` (from another thread) or KeyboardInterrupt."""
        self._httpd.serve_forever()

    def start(self) -> WebServer:
        """Serve from a background thread; returns self."""
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="parscale-web", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()

    def __enter__(self) -> WebServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def web_server(export: str | Path, *, port: int = DEFAULT_PORT, web_dir: str | Path | None = None,
               log: Callable[[str], None] | None = None) -> WebServer:
    """A server for the page and `export` on 127.0.0.1:`port` (0: a free port), not yet serving.

    Raises ParScaleError for a folder that is not an export, a missing page or JavaScript
    (`make web`), or a port that cannot be bound. `log` receives one line per request.
    """
    if not 0 <= port <= 65535:
        raise ParScaleError(f"--port must be between 0 and 65535, got {port}")
    return WebServer(find_roots(export, web_dir), port, log)
