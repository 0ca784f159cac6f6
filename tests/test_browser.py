"""The in-browser page (web/) in a real browser: Debian's chromium, headless, driven by Playwright.

The page, served by `parscale web`'s server, runs an export with onnxruntime-web and must give our
runtime's greedy tokens at every P it is asked for, from one session. Skipped, saying why, without
chromium (`make browser` installs it with apt-get), Playwright (the dev extra) or the page's
JavaScript (`make web`).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from parscale.browser import WEB_DIR, web_server
from parscale.exporter.browser import BROWSER_OPERATORS, browser_support, graph_operators
from parscale.manifest import MANIFEST, Manifest

pytestmark = pytest.mark.slow  # a browser and exports: the full tier (CI)

CHROMIUM = Path("/usr/bin/chromium")
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "parscale" / "assets" / "default"
# Root on a closed network: no sandbox, and none of chromium's own connections (they fail and log errors).
FLAGS = ["--headless", "--no-sandbox", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
NO_GPU = ["--disable-gpu"]
# WebGPU on the CPU: chromium's SwiftShader Vulkan adapter (slow, but a real WebGPU device).
SWIFTSHADER = ["--enable-unsafe-webgpu", "--use-webgpu-adapter=swiftshader", "--enable-features=Vulkan",
               "--use-vulkan=swiftshader", "--use-angle=swiftshader", "--disable-vulkan-surface"]
PROMPT = "def fibonacci(n):"  # P=1 and P=4 of the embedded model continue it differently within 16 tokens
PROMPT_IDS = [5, 17, 42]


@pytest.fixture(scope="module")
def playwright() -> Iterator[object]:
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} not found: `make browser` installs Debian's chromium with apt-get (as root)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright comes with the dev extra (.[dev])")
    if not (WEB_DIR / "node_modules" / "onnxruntime-web" / "dist" / "ort.wasm.min.mjs").is_file():
        pytest.skip(f"the page's JavaScript is not installed in {WEB_DIR} (run `make web`; needs npm)")
    with sync_api.sync_playwright() as p:
        yield p


def launch(playwright, flags: list[str]):  # type: ignore[no-untyped-def]
    """A headless chromium with a fresh profile (a persistent context: a fresh --user-data-dir)."""
    profile = tempfile.mkdtemp(prefix="chromium-")
    ctx = playwright.chromium.launch_persistent_context(profile, executable_path=str(CHROMIUM), headless=True,
                                                        args=FLAGS + flags)
    return ctx, profile


@pytest.fixture(scope="module")
def browser(playwright):  # type: ignore[no-untyped-def]
    ctx, profile = launch(playwright, NO_GPU)
    yield ctx
    ctx.close()
    shutil.rmtree(profile, ignore_errors=True)


class Page:
    """A page of the browser with its console errors and uncaught exceptions collected."""

    def __init__(self, ctx, url: str) -> None:  # type: ignore[no-untyped-def]
        self.page = ctx.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(f"console.error: {m.text}"))
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        self.page.goto(url)

    def call(self, script: str, arg: object = None) -> dict:
        """Run `script` (the body of an async function of `arg`); {"ok": value} or {"error": message}."""
        return self.page.evaluate(
            f"async (arg) => {{ try {{ return {{ok: await (async () => {{ {script} }})()}}; }}"
            " catch (e) { return {error: String(e && e.message || e)}; } }", arg)

    def text(self, selector: str) -> str:
        return self.page.locator(selector).inner_text()


@pytest.fixture(scope="module")
def multi_export(tmp_path_factory) -> Path:
    """The embedded default model's int8 multi-P export: `parscale export --P 1,2,4,8 --int8` (as `make demo`)."""
    from parscale.exporter.pipeline import export
    from parscale.exporter.quant.policy import default_scheme

    if not (DEFAULT_MODEL / "model.safetensors").is_file():
        pytest.skip(f"the embedded default model is not in {DEFAULT_MODEL}")
    out = tmp_path_factory.mktemp("browser") / "default-int8"
    return export(DEFAULT_MODEL, out, P=[1, 2, 4, 8], quantize=default_scheme(8), validate=False).out


@pytest.fixture(scope="module")
def runtime(multi_export):  # type: ignore[no-untyped-def]
    from parscale.runtime import Model

    return Model.load(multi_export, provider="cpu", threads=1)


def greedy(model, prompt_ids: list[int], n: int, P: int) -> list[int]:  # type: ignore[no-untyped-def]  # noqa: N803
    return model.generate(prompt_ids=prompt_ids, max_new_tokens=n, greedy=True, P=P).generated_ids


def test_the_page_generates_our_greedy_tokens_at_p1_and_p4(browser, multi_export, runtime, tmp_path):
    requests: list[str] = []
    with web_server(multi_export, port=0, log=requests.append).start() as server:
        page = Page(browser, server.url + "?threads=2")
        loaded = page.call("return await window.parscale.ready;")
        assert loaded == {"ok": {"streams": [1, 2, 4, 8], "P": 8, "backend": "wasm", "threads": 2,
                                 "backendReason": loaded["ok"]["backendReason"]}}, loaded
        assert page.page.evaluate("crossOriginIsolated")  # COOP/COEP: WASM threads are allowed
        assert page.text("#backend").startswith("WASM (2 threads): navigator.gpu ")  # headless, no GPU: why WASM
        assert page.page.locator("#P option").all_inner_texts() == ["P=1", "P=2", "P=4", "P=8"]
        results = {}
        for P in (1, 4):
            r = page.call("return await window.parscale.generate(arg);",
                          {"prompt": PROMPT, "maxNewTokens": 16, "P": P, "greedy": True})
            assert "ok" in r, r
            results[P] = r["ok"]
            ours = runtime.generate(PROMPT, max_new_tokens=16, greedy=True, P=P)
            assert results[P]["promptIds"] == runtime.tokenizer.encode(PROMPT)  # same tokenization
            assert results[P]["generatedIds"] == ours.generated_ids, f"P={P}"
            assert results[P]["text"] == ours.text and results[P]["P"] == P
            assert results[P]["msPerToken"] > 0 and results[P]["decodeSteps"] == len(ours.generated_ids) - 1
            # The page shows the text, the P in use and the speed.
            assert page.text("#output") == PROMPT + ours.text
            stats = page.text("#stats")
            assert stats.startswith(f"P={P} · WASM · 16 tokens (length) · ") and "ms/token" in stats
            assert page.page.locator("#P").input_value() == str(P)
        shot = tmp_path / "page.png"
        page.page.screenshot(path=str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert results[1]["generatedIds"] != results[4]["generatedIds"]  # P really changed between the calls
        assert sum("/model/model.onnx " in line for line in requests) == 1  # one session: weights loaded once
        assert page.errors == []


def test_the_backend_choice_falls_back_to_wasm_with_the_reason(browser, multi_export):
    with web_server(multi_export, port=0).start() as server:
        page = Page(browser, server.url + "?autoload=0")
        choose = "return await window.parscale.chooseBackend(...arg);"
        assert page.call(choose.replace("...arg", "'auto', {}")) == {
            "ok": {"backend": "wasm", "reason": "navigator.gpu is absent (no WebGPU in this browser or context)",
                   "fallback": False}}
        assert page.call(choose.replace("...arg", "'auto', {gpu: {requestAdapter: async () => null}}")) == {
            "ok": {"backend": "wasm", "reason": "navigator.gpu gave no adapter", "fallback": False}}
        assert page.call(choose.replace("...arg", "'auto', {gpu: {requestAdapter: async () => ({})}}")) == {
            "ok": {"backend": "webgpu", "reason": "navigator.gpu gave an adapter", "fallback": True}}
        assert page.call(choose.replace("...arg", "'webgpu', {gpu: {requestAdapter: async () => ({})}}"))["ok"][
            "fallback"] is False  # asked for WebGPU: its failure is an error, not a fallback
        assert page.call(choose.replace("...arg", "'webgpu', {}")) == {
            "error": "WebGPU was requested but navigator.gpu is absent (no WebGPU in this browser or context)"}
        assert page.call(choose.replace("...arg", "'wasm', {gpu: {requestAdapter: async () => ({})}}"))["ok"][
            "backend"] == "wasm"
        assert page.errors == []


def test_errors_are_shown_on_the_page_and_thrown(browser, multi_export, tmp_path):
    with web_server(multi_export, port=0).start() as server:
        page = Page(browser, server.url + "?autoload=0&threads=1")
        assert page.call("return await window.parscale.generate({promptIds: [1]});") == {
            "error": "no export loaded: call parscale.load(url) first"}
        assert page.text("#error") == "Error: no export loaded: call parscale.load(url) first"
        assert "ok" in page.call("return await window.parscale.load('model/');")
        assert page.page.locator("#error").is_hidden()
        for options, message in [
            ({"promptIds": [1], "P": 3}, "this export serves P = 1, 2, 4, 8; got P=3"),
            ({"promptIds": [1, 99999]}, "token id 99999 is outside the vocabulary (0..4095)"),
            ({"promptIds": [1], "maxNewTokens": 5000},
             "prompt (1 tokens) + maxNewTokens (5000) exceeds the context of 1024"),
        ]:
            assert page.call("return await window.parscale.generate(arg);", options) == {"error": message}
            assert page.text("#error") == f"Error: {message}"
        sampled = {"promptIds": [5, 17, 42], "maxNewTokens": 8, "greedy": False, "temperature": 0.8, "topP": 0.9,
                   "seed": 3, "ignoreEos": True}
        first, again = (page.call("return (await window.parscale.generate(arg)).generatedIds;", sampled) for _ in "ab")
        assert first == again and len(first["ok"]) == 8  # a seed repeats a sampled reply
        assert page.call("return await window.parscale.generate(arg);", {**sampled, "topP": 0}) == {
            "error": "sampling needs temperature > 0 and 0 < topP <= 1"}
        assert page.call("return await window.parscale.load('nowhere/');")["error"].startswith(
            "cannot fetch the export manifest")
        assert page.text("#backend") == "no model loaded"

    # Bytes onnxruntime-web cannot parse (sizes intact, so the server serves them): its error, on the page.
    broken = Path(shutil.copytree(multi_export, tmp_path / "broken"))
    data = bytearray((broken / "model.onnx").read_bytes())
    data[:64] = b"\xff" * 64
    (broken / "model.onnx").write_bytes(bytes(data))
    with web_server(broken, port=0).start() as server:
        page = Page(browser, server.url + "?threads=1")
        r = page.call("return await window.parscale.ready;")
        assert r["error"].startswith("onnxruntime-web (wasm) cannot run this export: ")
        assert page.text("#error") == f"Error: {r['error']}"
        assert page.page.locator("#generate").is_disabled()


def test_an_export_over_the_browsers_limits_is_refused_with_the_reason(browser, multi_export, tmp_path):
    import json

    folder = Path(shutil.copytree(multi_export, tmp_path / "too-big"))
    size = (folder / "model.onnx").stat().st_size
    manifest = Manifest.read(folder).replace(web=browser_support(folder, memory_limit=size))  # as if over 4 GiB
    (folder / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2))
    requests: list[str] = []
    with web_server(folder, port=0, log=requests.append).start() as server:
        page = Page(browser, server.url)
        r = page.call("return await window.parscale.ready;")
        assert r["error"].startswith("this export cannot run in the browser: the weights (")
        assert "WebAssembly's" in r["error"] and page.text("#error") == f"Error: {r['error']}"
        assert not any("/model/model.onnx " in line for line in requests)  # refused before downloading


@pytest.mark.parametrize("variant", ["fp32", "fp16", "int4", "int8-external"])
def test_every_kind_of_export_runs_in_the_browser(browser, tiny, variant):
    """fp32, fp16, int4 and int8 (weights in model.onnx.data) exports: our greedy tokens on WASM.

    Together with the multi-P int8 export above they hold every operator of BROWSER_OPERATORS."""
    from parscale.exporter.quant.policy import default_scheme
    from parscale.runtime import Model

    options = {"fp32": {}, "fp16": {"dtype": "fp16"}, "int4": {"quantize": default_scheme(4, method="rtn")},
               "int8-external": {"quantize": default_scheme(8), "external_data_threshold": 0}}[variant]
    folder = tiny.export(tiny.checkpoint(P=2, seed=7, tokenizer=True, tied=True), P=2, validate=False, **options)
    assert Manifest.read(folder).web["warnings"] == []
    prompt = [5, 17, 300, 42]
    ours = Model.load(folder, provider="cpu", threads=1).generate(prompt_ids=prompt, max_new_tokens=6, greedy=True)
    with web_server(folder, port=0).start() as server:
        page = Page(browser, server.url + "?threads=1")
        assert page.call("return (await window.parscale.ready).backend;") == {"ok": "wasm"}
        r = page.call("return await window.parscale.generate(arg);", {"promptIds": prompt, "maxNewTokens": 6})
        assert r["ok"]["generatedIds"] == ours.generated_ids
        assert page.errors == []


def test_the_operator_list_is_what_the_browser_tests_run(multi_export, tiny):
    """BROWSER_OPERATORS holds exactly the operators of the exports run above: no operator is listed unrun."""
    from parscale.exporter.quant.policy import default_scheme

    ckpt = tiny.checkpoint(P=2, seed=7, tokenizer=True, tied=True)
    variants = [{}, {"dtype": "fp16"}, {"quantize": default_scheme(4, method="rtn")},
                {"quantize": default_scheme(8), "external_data_threshold": 0}]
    ran = graph_operators(multi_export / "model.onnx")
    for options in variants:
        ran |= graph_operators(tiny.export(ckpt, P=2, validate=False, **options) / "model.onnx")
    assert ran == BROWSER_OPERATORS


def test_webgpu_on_swiftshader(playwright, multi_export, runtime):
    """WebGPU for real, on chromium's CPU adapter: the page's probe picks it, and P=8 and P=1 give our tokens.

    Decode steps no longer feed the prefix's zero rows to RotaryEmbedding (the prefix is written in an If
    on the first step only), which onnxruntime-web 1.31's WebGPU kernel divided by zero on.
    """
    ctx, profile = launch(playwright, SWIFTSHADER)
    try:
        with web_server(multi_export, port=0).start() as server:
            page = Page(ctx, server.url + "?autoload=0&threads=1")
            if page.page.evaluate("async () => !(await navigator.gpu?.requestAdapter())"):
                pytest.skip("this chromium offers no WebGPU adapter on SwiftShader")
            loaded = page.call("return await window.parscale.load('model/');")["ok"]
            assert (loaded["backend"], loaded["backendReason"]) == ("webgpu", "navigator.gpu gave an adapter")
            for P in (8, 1):
                r = page.call("return await window.parscale.generate(arg);",
                              {"promptIds": PROMPT_IDS, "maxNewTokens": 3, "P": P})
                assert r["ok"]["backend"] == "webgpu"
                assert r["ok"]["generatedIds"] == greedy(runtime, PROMPT_IDS, 3, P=P)
    finally:
        ctx.close()
        shutil.rmtree(profile, ignore_errors=True)
