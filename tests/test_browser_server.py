"""`parscale web`'s server (parscale/browser.py) and the manifest's `web` record, without a browser.

The page itself runs in tests/test_browser.py (headless chromium). These check what the server
serves, with which headers, and that nothing outside its roots can be reached.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from parscale.browser import WEB_DIR, web_server
from parscale.errors import ParScaleError
from parscale.exporter.browser import BROWSER_OPERATORS, browser_support, graph_operators
from parscale.manifest import MANIFEST, Manifest

ORT_DIST = WEB_DIR / "node_modules" / "onnxruntime-web" / "dist"


@pytest.fixture(scope="module")
def web_dir() -> Path:
    """The repository's web/ with its JavaScript installed (`make web`)."""
    if not (ORT_DIST / "ort.wasm.min.mjs").is_file():
        pytest.skip(f"the page's JavaScript is not installed in {WEB_DIR} (run `make web`; needs npm)")
    return WEB_DIR


@pytest.fixture()
def export(tiny_exports, tmp_path) -> Path:
    """A copy of a tiny P=4 export, free to be changed by the test."""
    return Path(shutil.copytree(tiny_exports[4][1], tmp_path / "export"))


def get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """One raw request (http.client sends the path as given: no normalization of `..`)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def test_serves_the_page_its_javascript_and_the_export_with_isolation_headers(web_dir, export):
    with web_server(export, port=0).start() as server:
        cases = {
            "/": "text/html", "/parscale.js": "text/javascript", "/page.js": "text/javascript",
            "/vendor/onnxruntime-web/ort.wasm.min.mjs": "text/javascript",
            "/vendor/onnxruntime-web/ort-wasm-simd-threaded.wasm": "application/wasm",
            "/vendor/tokenizers/tokenizers.min.mjs": "text/javascript",
            "/model/parscale.json": "application/json", "/model/model.onnx": "application/octet-stream",
        }
        for path, mime in cases.items():
            status, headers, body = get(server.port, path, "HEAD" if path.endswith(".wasm") else "GET")
            assert status == 200, path
            assert headers["content-type"].split(";")[0] == mime, path
            assert headers["cross-origin-opener-policy"] == "same-origin"
            assert headers["cross-origin-embedder-policy"] == "require-corp"
        status, _, body = get(server.port, "/model/parscale.json")
        assert json.loads(body) == json.loads((export / MANIFEST).read_text())
        status, headers, body = get(server.port, "/vendor/onnxruntime-web/ort-wasm-simd-threaded.wasm", "HEAD")
        assert int(headers["content-length"]) == (ORT_DIST / "ort-wasm-simd-threaded.wasm").stat().st_size
        assert body == b""
        assert server.url == f"http://127.0.0.1:{server.port}/"


def test_nothing_outside_the_roots_is_served(web_dir, export, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the browser")
    (export / "link.json").symlink_to(secret)  # a symlink inside the export, pointing out of it
    (export / "sub").mkdir()
    (export / "sub" / "x.json").write_text("{}")  # the export root is flat
    with web_server(export, port=0).start() as server:
        refused = [
            "/model/../../../../etc/passwd", "/model/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/model/..%2f..%2fsecret.txt",
            "/model/link.json", "/model/sub/x.json", "/model//etc/passwd", "/model/", "//etc/passwd",
            "/../pyproject.toml", "/%2e%2e/pyproject.toml", "/package.json", "/generate.mjs",
            "/node_modules/onnxruntime-web/package.json", "/vendor/onnxruntime-web/../package.json",
            "/vendor/onnxruntime-web/%2e%2e/package.json", "/vendor/tokenizers/../../onnxruntime-web/package.json",
            "/vendor/other/x.js", "/model/model.onnx%00.json", "/model\\..\\..\\secret.txt",
        ]
        for path in refused:
            status, _, body = get(server.port, path)
            assert status == 404, path
            assert b"not for the browser" not in body
        assert get(server.port, "/model/parscale.json", "POST")[0] == 501  # only GET and HEAD


def test_a_symlink_in_the_page_folder_does_not_escape_it(web_dir, export, tmp_path):
    page = tmp_path / "web"
    page.mkdir()
    shutil.copy(web_dir / "index.html", page / "index.html")
    (page / "node_modules").symlink_to(web_dir / "node_modules")  # vendor roots may live elsewhere
    outside = tmp_path / "outside.js"
    outside.write_text("// outside")
    (page / "evil.js").symlink_to(outside)
    with web_server(export, port=0, web_dir=page).start() as server:
        assert get(server.port, "/")[0] == 200
        assert get(server.port, "/vendor/onnxruntime-web/ort.wasm.min.mjs", "HEAD")[0] == 200
        assert get(server.port, "/evil.js")[0] == 404


def test_missing_javascript_is_one_clear_error(export, tmp_path):
    page = tmp_path / "web"
    page.mkdir()
    (page / "index.html").write_text("<!doctype html>")
    with pytest.raises(ParScaleError, match=r"page's JavaScript is not installed .*run `make web`"):
        web_server(export, port=0, web_dir=page)
    with pytest.raises(ParScaleError, match=r"no index.html"):
        web_server(export, port=0, web_dir=tmp_path / "nowhere")


def test_bad_folders_and_ports_are_refused(web_dir, export, tmp_path):
    with pytest.raises(ParScaleError, match="not a parscale export"):
        web_server(tmp_path, port=0)
    (export / "model.onnx").write_bytes(b"cut")
    with pytest.raises(ParScaleError, match=r"model\.onnx has 3 bytes"):
        web_server(export, port=0)
    with pytest.raises(ParScaleError, match="--port must be between 0 and 65535"):
        web_server(export, port=70000)


def test_a_port_in_use_is_refused(web_dir, tiny_exports):
    first = web_server(tiny_exports[4][1], port=0)
    try:
        with pytest.raises(ParScaleError, match=rf"cannot listen on 127\.0\.0\.1:{first.port}: .*another --port"):
            web_server(tiny_exports[4][1], port=first.port)
    finally:
        first.close()


def test_cli_prints_the_url_serves_and_stops_on_ctrl_c(web_dir, tiny_exports):
    exe = Path(sys.executable).parent / "parscale"
    proc = subprocess.Popen([str(exe), "web", str(tiny_exports[4][1]), "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "200"})
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"serving {tiny_exports[4][1]} at http://127.0.0.1:"), line
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        assert get(port, "/")[0] == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.communicate()


def test_cli_errors_are_one_line(tmp_path):
    exe = Path(sys.executable).parent / "parscale"
    done = subprocess.run([str(exe), "web", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "is not a parscale export" in done.stderr and "Traceback" not in done.stderr


def test_exports_record_that_the_browser_can_run_them(tiny_exports):
    for P in (1, 4):
        web = Manifest.read(tiny_exports[P][1]).web
        assert web is not None and web["runs"] is True and web["problems"] == [] and web["warnings"] == []
        assert web["weights_bytes"] == (tiny_exports[P][1] / "model.onnx").stat().st_size
        assert graph_operators(tiny_exports[P][1] / "model.onnx") <= BROWSER_OPERATORS


def test_the_web_record_names_sizes_over_the_browsers_limits_and_unrun_operators(tiny_exports):
    folder = tiny_exports[4][1]
    size = (folder / "model.onnx").stat().st_size
    web = browser_support(folder, protobuf_limit=size, memory_limit=size)
    assert web["runs"] is False
    assert "over the" in web["problems"][0] and "protobuf" in web["problems"][0]
    assert "WebAssembly" in web["problems"][1] and "wasm32" in web["problems"][1]
    fewer = BROWSER_OPERATORS - {("com.microsoft", "GroupQueryAttention"), ("", "Softmax")}
    web = browser_support(folder, operators=fewer)
    assert web["runs"] is True
    assert web["warnings"] == ["operators not run in the browser tests (onnxruntime-web may lack them): "
                               "Softmax, com.microsoft.GroupQueryAttention"]


def test_inspect_shows_the_web_record(tiny_exports):
    exe = Path(sys.executable).parent / "parscale"
    done = subprocess.run([str(exe), "inspect", str(tiny_exports[4][1]), "--no-verify"], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    assert "  browser (`parscale web`): runs\n" in done.stdout
