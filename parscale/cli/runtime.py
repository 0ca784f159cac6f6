"""The commands that run exports: generate, bench, serve, inspect, web.

Runtime modules are imported inside the commands: the CLI must start without torch installed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from parscale.cli.options import (
    NoVerifyOpt,
    ProviderOpt,
    RuntimeModelArg,
    SpinOpt,
    ThreadsOpt,
    err,
    load_checks,
    megabytes,
    ms_per_token,
    out,
    parse_ids,
)
from parscale.config import Streams
from parscale.errors import ParScaleError


def generate(
    model: RuntimeModelArg,
    prompt: Annotated[Optional[str], typer.Option(help="Prompt text.")] = None,  # noqa: UP045
    prompt_ids: Annotated[Optional[str], typer.Option("--prompt-ids", help="Prompt as token ids: 1,2,3.")] = None,  # noqa: UP045
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 64,
    greedy: Annotated[bool, typer.Option("--greedy", help="Always take the most likely token (default).")] = False,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 (or below 1e-3) = greedy.")] = 0.0,
    top_k: Annotated[int, typer.Option(help="Sample from the k most likely tokens (0 = all).")] = 0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass (1 = off).")] = 1.0,
    repetition_penalty: Annotated[float, typer.Option(help="> 1 discourages repeats (1 = off; 0.01 to 100).")] = 1.0,
    seed: Annotated[Optional[int], typer.Option(help="Random seed for sampling.")] = None,  # noqa: UP045
    stop: Annotated[Optional[list[str]], typer.Option(help="Stop string (repeatable).")] = None,  # noqa: UP045
    provider: ProviderOpt = "auto",
    threads: ThreadsOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of streaming.")] = False,
    P: Annotated[Optional[int], typer.Option(  # noqa: N803, UP045
        "--P", help="Streams, for a multi-P export (default: its largest).")] = None,
    spin: SpinOpt = None,
    no_verify: NoVerifyOpt = False,
) -> None:
    """Generate text from an export, streaming it to the terminal."""
    import json

    from parscale.args import check_seed, check_threads
    from parscale.runtime import Model

    if (prompt is None) == (prompt_ids is None):
        raise ParScaleError("pass exactly one of --prompt and --prompt-ids")
    ids = parse_ids(prompt_ids) if prompt_ids is not None else None
    check_seed(seed)
    m = Model.load(model, provider=provider, threads=check_threads(threads), verify=not no_verify, spin=spin)
    m.check_streams(P)
    options = dict(max_new_tokens=max_new_tokens, greedy=greedy, temperature=temperature, top_k=top_k,
                   top_p=top_p, repetition_penalty=repetition_penalty, seed=seed, stop=stop or None, P=P)
    if as_json or m.tokenizer is None:
        r = m.generate(prompt, prompt_ids=ids, **options)
        if as_json:
            print(json.dumps({**r.as_dict(), "model": str(model), "P": P or m.P, "provider": m.provider}))
        else:
            print(",".join(map(str, r.generated_ids)))
    else:
        for event in m.stream_tokens(prompt, prompt_ids=ids, **options):
            if event.text:
                sys.stdout.write(event.text)
                sys.stdout.flush()
            if event.result is not None:
                r = event.result
        sys.stdout.write("\n")
    if not as_json:
        t = r.timings
        at = f" at P={P or m.P}" if len(m.streams) > 1 else ""  # a multi-P export: say which P ran
        err.print(f"[dim]{len(r.generated_ids)} tokens{at}, finish: {r.finish_reason}; first token "
                  f"{1000 * t.time_to_first_token_s:.0f} ms, prefill {t.prefill_tokens_per_s:,.1f} tok/s, "
                  f"decode {ms_per_token(t.decode_ms_per_token, 1)}[/]")


def bench(
    model: RuntimeModelArg,
    prompt_len: Annotated[int, typer.Option(help="Prompt tokens (random ids).")] = 128,
    gen: Annotated[int, typer.Option(help="Tokens to generate.")] = 64,
    threads: ThreadsOpt = None,
    provider: ProviderOpt = "auto",
    batch: Annotated[int, typer.Option(help="Prompts generated together (decode ms/token is then one step).")] = 1,
    P: Annotated[Optional[str], typer.Option("--P", help=(  # noqa: N803, UP045
        "Streams to measure, in ascending order, from one process: e.g. 1,2,4,8 for a multi-P export "
        "(default: its largest)."
    ))] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (a list of them with --P).")] = False,
    spin: SpinOpt = None,
    no_verify: NoVerifyOpt = False,
) -> None:
    """Measure prefill tok/s, decode ms/token, time to first token and peak RSS (greedy; batch 1 by default)."""
    import json

    from parscale.runtime.bench import bench_streams

    results = bench_streams(model, Streams.parse(P) if P is not None else None, prompt_len=prompt_len, gen=gen,
                            threads=threads, provider=provider, verify=not no_verify, batch=batch, spin=spin)
    if as_json:
        print(json.dumps(results[0].as_dict() if P is None else [r.as_dict() for r in results]))
        return
    r = results[0]
    out.print(f"{r.model}: {r.dtype}, quantization {r.quantization}, {r.provider}, "
              f"threads {r.threads or 'default'}, batch {r.batch}, prompt {r.prompt_len}, {r.gen} new tokens; "
              f"load {r.load_s:.2f} s")
    for r in results:
        out.print(f"P={r.P}")
        out.print(f"  time to first token  {1000 * r.time_to_first_token_s:10.1f} ms")
        out.print(f"  prefill              {r.prefill_tokens_per_s:10.1f} tok/s")
        out.print(f"  decode               {ms_per_token(r.decode_ms_per_token, 2, 10)}")
        out.print(f"  peak RSS generating  {r.generate_peak_rss_mb:10.1f} MB (process peak {r.peak_rss_mb:,.1f} MB)")
        out.print(f"  files + KV cache     {r.files_mb + r.kv_cache_mb:10.1f} MB (ratio {r.rss_ratio:.2f})")


def serve(
    model: RuntimeModelArg,
    host: Annotated[str, typer.Option(help="Address to listen on (default loopback; 0.0.0.0: all).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free one).")] = 8000,
    threads: ThreadsOpt = None,
    max_batch: Annotated[int, typer.Option(help="Requests decoded together at most (per P).")] = 8,
    max_queue: Annotated[int, typer.Option(help="Requests waiting at most; more are answered 503.")] = 64,
    api_key: Annotated[Optional[str], typer.Option(  # noqa: UP045
        envvar="PARSCALE_API_KEY", help="Require 'Authorization: Bearer KEY' (or set PARSCALE_API_KEY).")] = None,
    name: Annotated[Optional[str], typer.Option(help="Model name clients use (default: the folder's name).")] = None,  # noqa: UP045
    chat_template: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="Jinja2 chat template file (default: the export's tokenizer_config.json chat_template).")] = None,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body accepted (413 beyond).")] = 1 << 20,
    shutdown_timeout: Annotated[float, typer.Option(
        help="On SIGTERM/Ctrl-C, seconds running requests may finish before they are cancelled.")] = 10.0,
    provider: ProviderOpt = "auto",
    ray: Annotated[bool, typer.Option("--ray", help="Deploy on Ray Serve (needs ray[serve]) instead.")] = False,
    replicas: Annotated[int, typer.Option(help="With --ray: replicas, each holding the model.")] = 2,
    ray_address: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="With --ray: a running cluster's address (default: start a local one).")] = None,
    no_verify: NoVerifyOpt = False,
) -> None:
    """Serve an export over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models)."""
    from parscale.args import check_float, check_int, check_threads

    check_int(port, "--port", minimum=0, maximum=65535)
    check_int(max_batch, "--max-batch", minimum=1, maximum=256)
    check_int(max_queue, "--max-queue", minimum=1)
    check_int(max_body_bytes, "--max-body-bytes", minimum=1024)
    check_int(replicas, "--replicas", minimum=1)
    check_float(shutdown_timeout, "--shutdown-timeout", minimum=0, maximum=3600)
    if api_key is not None and not api_key:
        raise ParScaleError("--api-key is empty: give a key, or leave the option out")
    if ray:
        if provider not in ("auto", "cpu"):
            raise ParScaleError(f"--ray runs its replicas on the CPU; --provider {provider} is not supported with it")
        load_checks(model, not no_verify)  # a clear error before a cluster starts (replicas load it again)
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        err.print(f"[yellow]warning:[/] listening on {host} without --api-key: anyone who can reach it may use it")
    options = dict(max_batch=max_batch, max_queue=max_queue, api_key=api_key, name=name, chat_template=chat_template,
                   max_body_bytes=max_body_bytes, verify=not no_verify)

    def ready(url: str, app: object = None) -> None:
        names = getattr(getattr(app, "state", None), "names", None)
        models = f" as {', '.join(names.ids())}" if names is not None else ""
        out.print(f"serving {model}{models} on {url}/v1 (Ctrl-C to stop)", markup=False)

    try:
        if ray:
            from parscale.serve.ray_app import run as run_ray
        else:
            from parscale.serve.app import serve as run_server
    except ImportError as e:
        extra = "serve-ray" if ray else "serve"
        raise ParScaleError(f"parscale serve needs the {extra} extra ({e.name} is missing): "
                            f"pip install 'parscale[{extra}]'") from None
    if ray:
        run_ray(model, host=host, port=port, replicas=replicas, threads=check_threads(threads) or 1,
                address=ray_address, shutdown_timeout=shutdown_timeout, on_ready=ready, **options)
    else:
        run_server(model, host=host, port=port, threads=check_threads(threads), provider=provider,
                   shutdown_timeout=shutdown_timeout, on_ready=ready, **options)


def inspect(model: RuntimeModelArg, no_verify: NoVerifyOpt = False) -> None:
    """Print an export's manifest: P, dtype, quantization, sizes and graph inputs/outputs."""
    m = load_checks(model, not no_verify)
    info = m.model
    out.print(f"{model}: parscale export (format {m.format_version}, tool {m.tool.get('version', '?')})")
    streams = f" (default; serves P = {', '.join(map(str, m.streams))})" if len(m.streams) > 1 else ""
    out.print(f"  P={info.P}{streams}  prefix tokens {info.prefix_tokens}  dtype {m.dtype}  "
              f"quantization {m.quantization}  opset {m.opset}")
    for key in ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads",
                "num_key_value_heads", "cache_heads", "head_dim", "vocab_size", "max_position_embeddings",
                "tie_word_embeddings"):
        out.print(f"  {key:24s} {getattr(info, key)}")
    out.print(f"  files ({megabytes(m.total_bytes)}):")
    for name, f in m.files.items():
        out.print(f"    {name:28s} {megabytes(f.bytes):>12s}")
    axes = m.io.get("axes", {})
    io = m.io
    for kind in ("inputs", "outputs"):
        names = io.get(kind, [])
        shown = [n for n in names if all(i == "0" for i in re.findall(r"\.(\d+)\.", n))]  # layer 0 stands for all
        out.print(f"  {kind}: {len(names)}")
        for n in shown:
            out.print(f"    {n:32s} {axes.get(n)}")
        if len(shown) < len(names):
            out.print(f"    ... and the other layers' {kind[:-1]}s alike")
    if isinstance(m.web, dict):
        problems = "; ".join(m.web.get("problems") or [])
        out.print("  browser (`parscale web`): " + ("runs" if m.web.get("runs") else f"cannot run: {problems}"))
        for warning in m.web.get("warnings") or []:
            out.print(f"    warning: {warning}")
    v = m.validation
    if v is not None and isinstance(v.get("max_abs_logit_diff"), (int, float)):
        out.print(f"  validation: max |logit diff| {v['max_abs_logit_diff']:.2e}, "
                  f"greedy match {v.get('greedy_match')}")


def web(
    model: RuntimeModelArg,
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (0 picks a free one).")] = 8080,
    web_dir: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        "--web-dir", help="The page's folder (default: web/ of this source checkout, after `make web`).")] = None,
    log: Annotated[bool, typer.Option("--log", help="Print one line per request.")] = False,
) -> None:
    """Serve the in-browser page and an export on 127.0.0.1: onnxruntime-web runs it (WebGPU, else WASM)."""
    from parscale.browser import web_server

    printer = (lambda line: err.print(line, markup=False)) if log else None
    server = web_server(model, port=port, web_dir=web_dir, log=printer)
    out.print(f"serving {model} at {server.url} (Ctrl-C to stop)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        out.print("stopped")
    finally:
        server.close()
