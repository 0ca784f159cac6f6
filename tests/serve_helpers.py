"""Helpers for the server tests: a live `parscale serve` process on a free loopback port, and raw HTTP."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

START_TIMEOUT_S = 120


@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT
    proc: subprocess.Popen[str]
    stderr: Path

    def client(self, api_key: str = "unused", **options: Any) -> Any:
        """The official openai client, pointed at this server (no retries: every answer is the first)."""
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0,
                             timeout=options.pop("timeout", 120), **options)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


def serving(export: Path, *args: str) -> AbstractContextManager[Server]:
    """`python -m parscale serve EXPORT --port 0 --threads 1 ARGS` until the block ends (then SIGTERM)."""
    return running(["serve", str(export), "--port", "0", "--threads", "1", *args])


@contextmanager
def running(argv: list[str], cwd: Path | None = None) -> Iterator[Server]:
    """`python -m parscale ARGV` (a `serve` command on a free port) until the block ends (then SIGTERM)."""
    with tempfile.TemporaryDirectory() as tmp:
        stderr = Path(tmp) / "stderr.txt"
        with open(stderr, "w") as err:
            proc = subprocess.Popen([sys.executable, "-m", "parscale", *argv], stdout=subprocess.PIPE, stderr=err,
                                    text=True, cwd=cwd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            ready, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT_S)
            line = proc.stdout.readline() if ready else ""  # type: ignore[union-attr]
            found = re.search(r" on (http://\S+)/v1 ", line)
            if found is None:
                proc.kill()
                proc.wait()
                raise AssertionError(f"the server did not start: {line!r}\n{stderr.read_text()[-3000:]}")
            yield Server(found.group(1), proc, stderr)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


def http(url: str, body: bytes | str | dict | None = None, *, method: str | None = None,
         headers: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, dict[str, str], Any]:
    """(status, headers by lower-case name, body) of one request: the body parsed from JSON (or the text of
    a stream of server-sent events); a dict body is sent as JSON."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body.encode() if isinstance(body, str) else body
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            events = r.headers.get("content-type", "").startswith("text/event-stream")
            return r.status, {k.lower(): v for k, v in r.headers.items()}, raw.decode() if events else json.loads(raw)
    except urllib.error.HTTPError as e:
        raw = e.read()
        return e.code, {k.lower(): v for k, v in e.headers.items()}, json.loads(raw) if raw else None
