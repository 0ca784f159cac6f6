"""llama.cpp yardstick: built from source, the same P=1 weights as GGUF, timed by its own tools.

    python -m benchmarks.llamacpp build WORK                      # source from PyPI, cmake build (cached)
    python -m benchmarks.llamacpp gguf CKPT_P1 OUT.gguf --type q8_0|q4_0 [--work WORK]
    python -m benchmarks.llamacpp run OUT.gguf --prompt-len 128 --gen 64 --threads 2 [--batch 1] [--work WORK]

The source is the llama.cpp that the PyPI sdist of `llama-cpp-python` vendors (pinned below); the
build is CPU only, Release, `GGML_NATIVE=ON`, without HTTPS (`LLAMA_OPENSSL=OFF`: this llama.cpp has
no curl any more, its `LLAMA_CURL` option is deprecated and ignored), and makes only the tools used
here. Where no C++ compiler, no cmake (`pip install cmake` provides one) or no download is to be had,
`build` prints one line `llama.cpp skipped: <why>` and returns None (the CLI exits 0).

Batch 1 uses `llama-bench`: prefill is its `pp<prompt>` test, decode its `tg<gen>` test at depth
<prompt> (each step sees a cache holding the prompt, as in `parscale bench`). Batch B > 1 uses
`llama-batched-bench` (B prompts, then B sequences decoding together); there decode_ms_per_token is
the time of one step, which gives each of the B sequences one token. Both feed random token ids and
time `llama_decode` only: no sampling, and no text is ever tokenized.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import emit
from benchmarks.genai_bench import make_hf_qwen2

LLAMA_CPP_PYTHON = "0.3.36"  # the PyPI sdist that carries the source (vendor/llama.cpp)
LLAMA_CPP_COMMIT = "0c1e57098"  # the llama.cpp commit that sdist vendors (its CHANGELOG says so)
TARGETS = ("llama-bench", "llama-batched-bench", "llama-quantize")
QTYPES = {"q8_0": "Q8_0", "q4_0": "Q4_0"}
DEFAULT_WORK = Path("/tmp/parscale-bench/llamacpp")
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
    f"-DLLAMA_BUILD_COMMIT={LLAMA_CPP_COMMIT}", "-DLLAMA_BUILD_NUMBER=0",
]


def tools_dir(work: Path) -> Path:
    """Where build() puts this pin's source (`src/`) and binaries (`build/bin/`)."""
    return work / f"llama.cpp-{LLAMA_CPP_COMMIT}"


def binary(tools: Path, name: str) -> Path:
    return tools / "build" / "bin" / name


def skip(why: str) -> None:
    print(f"llama.cpp skipped: {why}", flush=True)


def find_cmake() -> str | None:
    """cmake on PATH, else the one `pip install cmake` puts beside this Python."""
    local = Path(sys.executable).parent / "cmake"
    return shutil.which("cmake") or (str(local) if local.is_file() else None)


def missing_tool() -> str | None:
    """Why llama.cpp cannot be built here, or None."""
    if find_cmake() is None:
        return "no cmake on PATH (`pip install cmake` provides one)"
    if not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "c++", "g++", "clang++") if c):
        return "no C++ compiler (c++, g++ or clang++) on PATH"
    if not any(shutil.which(c) for c in (os.environ.get("CC", ""), "cc", "gcc", "clang") if c):
        return "no C compiler (cc, gcc or clang) on PATH"
    return None


def fetch_source(tools: Path) -> Path:
    """Download the pinned llama-cpp-python sdist with pip and unpack its vendor/llama.cpp to tools/src."""
    src = tools / "src"
    if (src / "CMakeLists.txt").is_file():
        return src
    dl = tools / "download"
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                    f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(dl)],
                   check=True, capture_output=True, text=True)
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
    with tempfile.TemporaryDirectory(dir=tools) as tmp, \
            tarfile.open(dl / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz") as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        tar.extractall(tmp, members=members, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        os.replace(Path(tmp) / prefix, src)
    shutil.rmtree(dl)
    return src


def build(work: Path) -> Path | None:
    """Build llama-bench, llama-batched-bench and llama-quantize into tools_dir(work); reuse them if there.

    Returns the tools folder (what write_gguf and run take), or None after saying why llama.cpp is skipped.
    """
    tools = tools_dir(work)
    if all(binary(tools, t).is_file() for t in TARGETS):
        return tools
    why = missing_tool()
    if why:
        skip(why)
        return None
    tools.mkdir(parents=True, exist_ok=True)
    try:
        src = fetch_source(tools)
    except (subprocess.CalledProcessError, OSError, tarfile.TarError) as e:
        detail = (getattr(e, "stderr", "") or str(e)).strip().splitlines()
        skip(f"cannot get the llama-cpp-python=={LLAMA_CPP_PYTHON} sdist ({detail[-1] if detail else e})")
        return None
    log = tools / "build.log"
    cmake = find_cmake() or "cmake"
    with log.open("w") as f:
        for cmd in ([cmake, "-S", str(src), "-B", str(tools / "build"), *CMAKE_FLAGS],
                    [cmake, "--build", str(tools / "build"), "--config", "Release", "-j", "2",
                     "--target", *TARGETS]):
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode:
                skip(f"the build failed (log: {log})")
                return None
    return tools


def _standin_vocab(self: Any) -> None:
    """The vocabulary of a checkpoint that has none (random `parscale init` weights).

    llama.cpp loads no model without one; llama-bench only needs its size. GPT-2's 256 byte tokens,
    one merge (GGUF has no empty arrays), then `[PAD<id>]` up to vocab_size, as the converter names
    ids that a tokenizer lacks.
    """
    import gguf  # the vendored gguf-py: this runs inside the converter's process

    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = [chr(b) for b in bs] + [chr(256 + i) for i in range(256 - len(bs))]  # bytes_to_unicode's letters
    n = self.hparams["vocab_size"]
    tokens = [*chars, "ĠĠ", *(f"[PAD{i}]" for i in range(len(chars) + 1, n))]
    types = [gguf.TokenType.NORMAL] * (len(chars) + 1) + [gguf.TokenType.UNUSED] * (n - len(chars) - 1)
    self.gguf_writer.add_tokenizer_model("gpt2")
    self.gguf_writer.add_tokenizer_pre("qwen2")
    self.gguf_writer.add_token_list(tokens)
    self.gguf_writer.add_token_types(types)
    self.gguf_writer.add_token_merges(["Ġ Ġ"])
    gguf.SpecialVocab(self.dir_model, n_vocab=n).add_to_gguf(self.gguf_writer)  # bos/eos ids of config.json


def convert_main(argv: list[str]) -> None:
    """Child process: run the vendored convert_hf_to_gguf.py (argv: SRC, then its own arguments).

    A folder without tokenizer files gets _standin_vocab instead of a tokenizer; the tensors go
    through the official Qwen2 conversion either way.
    """
    import runpy

    src, args = Path(argv[0]), argv[1:]
    sys.path[:0] = [str(src), str(src / "gguf-py")]
    from conversion.qwen import Qwen2Model  # the vendored converter's package

    hf = Path(args[0])
    if not any((hf / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer.model")):
        Qwen2Model.set_vocab = _standin_vocab
    sys.argv = [str(src / "convert_hf_to_gguf.py"), *args]
    runpy.run_path(sys.argv[0], run_name="__main__")


def write_gguf(ckpt: Path, out: Path, qtype: str, tools: Path, threads: int = 2) -> Path:
    """GGUF of a P=1 checkpoint's weights: converted losslessly (its own dtype), then llama-quantize'd.

    llama-quantize's default mix for the type: with tied embeddings (qwen2.5-0.5b) the embedding is
    the output layer, which a Q4_0 file gives Q6_K; Q6_K needs rows of a multiple of 256 and hidden
    size 896 is not, so llama-quantize falls back to Q8_0 for it (every other matrix is Q4_0).
    """
    if qtype not in QTYPES:
        raise SystemExit(f"--type must be one of {', '.join(QTYPES)}, got {qtype!r}")
    dtype = json.loads((ckpt / "config.json").read_text()).get("torch_dtype", "float32")
    outtype = {"bfloat16": "bf16", "float16": "f16"}.get(dtype, "f32")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".gguf-") as tmp:
        hf = make_hf_qwen2(ckpt, Path(tmp) / "hf")
        full = Path(tmp) / f"model-{outtype}.gguf"
        code = "import sys; from benchmarks.llamacpp import convert_main; convert_main(sys.argv[1:])"
        subprocess.run([sys.executable, "-c", code, str(tools / "src"), str(hf), "--outfile", str(full),
                        "--outtype", outtype], check=True, cwd=Path(__file__).resolve().parents[1])
        part = Path(tmp) / out.name
        subprocess.run([str(binary(tools, "llama-quantize")), str(full), str(part), QTYPES[qtype], str(threads)],
                       check=True)
        os.replace(part, out)
    return out


def run_tool(cmd: list[str]) -> tuple[str, float]:
    """Run a llama.cpp tool; return its stdout and its own peak RSS in MB (wait4: this child's alone)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if p.returncode:
            raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}\n{err.read()[-3000:]}")
        return out.read(), usage.ru_maxrss / 1024


def run(gguf: Path, prompt_len: int, gen: int, threads: int, tools: Path, batch: int = 1, reps: int = 2) -> dict:
    """Prefill and decode figures of llama.cpp on `gguf`, in genai_bench.run's record shape.

    Batch 1: two llama-bench calls of `reps` repetitions each (it warms up first and reports the
    mean). Batch B > 1: `reps` llama-batched-bench calls (each warms up), averaged.
    """
    common = ["-m", str(gguf), "-t", str(threads)]
    extra: dict[str, Any]
    if batch == 1:
        bench = str(binary(tools, "llama-bench"))
        tests, rss = [], []
        for p, n, d in ((prompt_len, 0, 0), (0, gen, prompt_len)):  # pp<prompt>, then tg<gen> at depth <prompt>
            text, mb = run_tool([bench, *common, "-p", str(p), "-n", str(n), "-d", str(d), "-r", str(reps),
                                 "-o", "json"])
            tests.append(json.loads(text)[0])
            rss.append(mb)
        pp, tg = tests
        prefill_s = pp["avg_ns"] / 1e9
        step_ms = tg["avg_ns"] / 1e6 / gen
        extra = {"prefill_s_samples": [s / 1e9 for s in pp["samples_ns"]],
                 "decode_ms_per_token_samples": [s / 1e6 / gen for s in tg["samples_ns"]],
                 "model_type": tg["model_type"], "cpu_info": tg["cpu_info"], "n_batch": tg["n_batch"],
                 "n_ubatch": tg["n_ubatch"], "flash_attn": tg.get("flash_attn"), "poll": tg.get("poll"),
                 "build_commit": tg["build_commit"]}
        command = f"llama-bench -m {gguf.name} -t {threads} -r {reps} -o json: -p {prompt_len} -n 0; -p 0 -n {gen} " \
                  f"-d {prompt_len}"
    else:
        cmd = [str(binary(tools, "llama-batched-bench")), *common, "-tb", str(threads),
               "-c", str(batch * (prompt_len + gen)), "-npp", str(prompt_len), "-ntg", str(gen), "-npl", str(batch),
               "--output-format", "jsonl"]
        rows, rss = [], []
        for _ in range(reps):
            text, mb = run_tool(cmd)
            rows += [json.loads(line) for line in text.splitlines() if line.startswith("{")]
            rss.append(mb)
        prefill_s = sum(r["t_pp"] for r in rows) / len(rows)
        step_ms = 1000 * sum(r["t_tg"] for r in rows) / len(rows) / gen
        extra = {"prefill_s_samples": [r["t_pp"] for r in rows],
                 "decode_ms_per_token_samples": [1000 * r["t_tg"] / gen for r in rows],
                 "decode_tokens_per_s": batch * 1000 / step_ms, "n_batch": rows[0]["n_batch"],
                 "n_ubatch": rows[0]["n_ubatch"], "flash_attn": rows[0]["flash_attn"]}
        command = " ".join(["llama-batched-bench", *cmd[1:]]).replace(str(gguf), gguf.name) + f" (x{reps})"
    return {
        "system": "llama.cpp", "model": str(gguf), "threads": threads, "batch": batch, "reps": reps,
        "prompt_len": prompt_len, "gen": gen, "load_s": None, "time_to_first_token_s": prefill_s,
        "prefill_tokens_per_s": batch * prompt_len / prefill_s, "decode_ms_per_token": step_ms,
        # Whole-process high-water marks (llama.cpp maps the GGUF; touched pages count), loading included.
        "generate_peak_rss_mb": max(rss), "peak_rss_mb": max(rss), "files_mb": gguf.stat().st_size / 1e6,
        "llama_cpp_python": LLAMA_CPP_PYTHON, "llama_cpp_commit": LLAMA_CPP_COMMIT, "tool_command": command,
        **extra,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("build")
    a.add_argument("work", type=Path)
    a = sub.add_parser("gguf")
    a.add_argument("ckpt", type=Path)
    a.add_argument("out", type=Path)
    a.add_argument("--type", dest="qtype", default="q8_0", choices=sorted(QTYPES))
    a.add_argument("--work", type=Path, default=DEFAULT_WORK)
    a = sub.add_parser("run")
    a.add_argument("gguf", type=Path)
    a.add_argument("--prompt-len", type=int, default=128)
    a.add_argument("--gen", type=int, default=64)
    a.add_argument("--threads", type=int, default=2)
    a.add_argument("--batch", type=int, default=1)
    a.add_argument("--reps", type=int, default=2, help="Repetitions (llama-bench -r); their mean is reported.")
    a.add_argument("--work", type=Path, default=DEFAULT_WORK)
    a.add_argument("--out", type=Path)
    args = ap.parse_args()
    tools = build(args.work)
    if tools is None:
        return  # the reason is printed; exit status 0
    if args.cmd == "build":
        print(tools)
    elif args.cmd == "gguf":
        print(write_gguf(args.ckpt, args.out, args.qtype, tools))
    else:
        emit(run(args.gguf, args.prompt_len, args.gen, args.threads, tools, args.batch, args.reps), args.out)


if __name__ == "__main__":
    main()
