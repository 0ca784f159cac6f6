"""Property-based tests: every CLI command, driven with generated option values and paths.

For any input a user can type, a command must: exit 0 (success), 1 (a ParScaleError: one line) or 2
(a usage error from typer/click, e.g. an option that wants a number got text); never raise anything
else (which `parscale.cli.main` would show as a Python traceback); finish within TIME_LIMIT; and,
unless it succeeded in writing its own output folder, leave every file as it was.

Commands run in-process through typer's CliRunner (fast); exit codes model `main()`, which turns a
ParScaleError into exit 1 and lets anything else through as a traceback. A few cases run as real
subprocesses (non-UTF-8 argv bytes, absurd thread counts) to check the console path end to end.
Values a real argv cannot hold are not generated: NUL characters.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from parscale.cli import app
from parscale.errors import ParScaleError

TIME_LIMIT = 60  # seconds for one command; every case here takes well under 5 s
PROPS = settings(
    deadline=timedelta(seconds=TIME_LIMIT), database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
runner = CliRunner()
counter = itertools.count()

# ---------------------------------------------------------------------------- generated values

no_nul = st.characters(exclude_characters="\x00")
junk = st.one_of(
    st.text(no_nul, max_size=8),
    st.binary(max_size=6).filter(lambda b: b"\x00" not in b).map(lambda b: b.decode("utf-8", "surrogateescape")),
)
ints = st.one_of(
    st.integers(-3, 600), st.integers(-(10**30), 10**30),
    st.sampled_from([0, 1, 2**31, 2**63 - 1, 2**63, -(2**63), 10**6]),
).map(str)
floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(str), st.sampled_from(["nan", "inf", "-inf", "1e308", "-0.0"]),
)


def num(kind: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Mostly well-formed numbers, sometimes anything at all."""
    return st.one_of(kind, kind, kind, junk)


# Paths: the names are resolved against the fixture world below.
MODEL_PATHS = ["export", "export", "export", "export-p1", "missing", "file", "ckpt", "link-to-export",
               "dangling", "user-dir", "empty-dir"]
TEXT_PATHS = ["text", "text", "latin1", "empty.txt", "missing", "user-dir", "binary"]
OUT_PATHS = ["new", "new", "file", "user-dir", "empty-dir", "under-file", "link-to-export", "dangling",
             "ro/out", "old-export", "old-ckpt"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tiny_exports) -> Path:  # type: ignore[no-untyped-def]
    """A folder holding every kind of path a command may be given (exports copied: they may be replaced)."""
    root = tmp_path_factory.mktemp("world")
    shutil.copytree(tiny_exports[4][1], root / "export")
    shutil.copytree(tiny_exports[1][1], root / "export-p1")
    shutil.copytree(tiny_exports[4][0], root / "ckpt")
    (root / "file").write_text("just a file")
    (root / "text").write_text("def f(x):\n    return x + 1\n" * 40)
    (root / "latin1").write_bytes("caf\xe9 ".encode("latin-1") * 20)
    (root / "empty.txt").write_text("")
    (root / "binary").write_bytes(bytes(range(256)) * 4)
    (root / "link-to-export").symlink_to(root / "export")
    (root / "dangling").symlink_to(root / "nowhere")
    (root / "user-dir" / "sub").mkdir(parents=True)
    (root / "user-dir" / "thesis.txt").write_text("years of work")
    (root / "empty-dir").mkdir()
    (root / "ro").mkdir(mode=0o555)
    return root


def resolve(world: Path, name: str, *, fresh: bool = False) -> str:
    """A generated path name as a real path; OUT folders that may be replaced are fresh copies."""
    if name == "new":
        return str(world / f"out{next(counter)}")
    if name == "under-file":
        return str(world / "file" / "out")
    if name in ("old-export", "old-ckpt") and fresh:
        dst = world / f"{name}{next(counter)}"
        shutil.copytree(world / ("export" if name == "old-export" else "ckpt"), dst)
        return str(dst)
    return str(world / name)


def snapshot(root: Path) -> dict[str, tuple[bool, int, int]]:
    """Every entry under root (links not followed): kind, and for files size and mtime."""
    found = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            st_ = p.lstat()
            is_dir = p.is_dir() and not p.is_symlink()  # a folder's own mtime changes with its entries: not kept
            found[str(p.relative_to(root))] = (is_dir, 0 if is_dir else st_.st_size, 0 if is_dir else st_.st_mtime_ns)
    return found


def options(data: st.DataObject, spec: dict[str, st.SearchStrategy[str] | None]) -> list[str]:
    """A random subset of the options in spec, with generated values (None: a flag)."""
    chosen = data.draw(st.lists(st.sampled_from(sorted(spec)), unique=True, max_size=len(spec)))
    args: list[str] = []
    for name in chosen:
        value = spec[name]
        args += [name] if value is None else [name, data.draw(value)]
    return args


def _timeout(signum, frame):  # type: ignore[no-untyped-def]
    raise TimeoutError(f"command did not finish within {TIME_LIMIT} s")


def invoke(args: list[str]) -> int:
    """Run `parscale ARGS` in-process; assert the no-traceback, bounded-time contract; returns the exit code."""
    old = signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(TIME_LIMIT)
    try:
        result = runner.invoke(app, args, catch_exceptions=True)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    exc = result.exception
    if exc is not None and not isinstance(exc, (SystemExit, ParScaleError)):
        raise AssertionError(f"parscale {args!r} would print a traceback: {type(exc).__name__}: {exc}") from exc
    assert result.exit_code in (0, 1, 2), (args, result.exit_code, result.output)
    assert "Traceback" not in result.output
    if isinstance(exc, ParScaleError):
        assert str(exc).strip() and "\n" not in str(exc).strip(), str(exc)  # one line
    return result.exit_code


def check_read_only(world: Path, args: list[str]) -> None:
    """A command that only reads: whatever the outcome, nothing under the world changes."""
    before = snapshot(world)
    invoke(args)
    assert snapshot(world) == before, args


def check_writer(world: Path, args: list[str], out: str) -> None:
    """A command that writes OUT: on failure nothing changes; on success only OUT, and no leftovers."""
    before = snapshot(world)
    code = invoke(args)
    after = snapshot(world)
    assert not [k for k in after if ".partial-" in k or k.endswith(".lock") or ".old-" in k], after
    if code != 0:
        assert after == before, args
        return
    rel = str(Path(out).relative_to(world))
    outside = {k: v for k, v in after.items() if k != rel and not k.startswith(rel + "/")}
    assert outside == {k: v for k, v in before.items() if k != rel and not k.startswith(rel + "/")}, args
    for k in before:  # user files are never among what was replaced
        assert not k.startswith("user-dir/") or after.get(k) == before[k]


# ---------------------------------------------------------------------------- one property per command

ids_text = st.one_of(
    st.lists(st.integers(0, 600), min_size=1, max_size=6).map(lambda v: ",".join(map(str, v))),
    st.sampled_from(["1 2 3", "1,,2", "1.5", "-1", "", " 1 , 2 "]), junk,
)


def runtime_options(bad_providers: list[str]) -> dict:
    """Options every command that loads an export takes (`generate`, `bench`), with some bad providers."""
    return {"--threads": num(ints), "--provider": st.sampled_from(["auto", "cpu", *bad_providers]), "--json": None,
            "--no-verify": None}


@settings(PROPS, max_examples=25)
@given(data=st.data())
def test_generate(world, data):
    model = resolve(world, data.draw(st.sampled_from(MODEL_PATHS)))
    prompt = data.draw(st.one_of(st.tuples(st.just("--prompt-ids"), ids_text), st.tuples(st.just("--prompt"), junk)))
    args = ["generate", model, *prompt, *options(data, {
        "--max-new-tokens": num(ints), "--temperature": num(floats), "--top-k": num(ints), "--top-p": num(floats),
        "--repetition-penalty": num(floats), "--seed": num(ints), "--stop": junk, **runtime_options(["cuda", "tpu"]),
    })]
    check_read_only(world, args)


@settings(PROPS, max_examples=10)
@given(data=st.data())
def test_bench(world, data):
    model = resolve(world, data.draw(st.sampled_from(MODEL_PATHS)))
    args = ["bench", model, *options(data, {
        "--prompt-len": num(st.integers(-2, 600).map(str)), "--gen": num(st.integers(-2, 600).map(str)),
        **runtime_options(["gpu"]),
    })]
    check_read_only(world, args)


@settings(PROPS, max_examples=10)
@given(data=st.data())
def test_inspect(world, data):
    model = resolve(world, data.draw(st.sampled_from(MODEL_PATHS)))
    check_read_only(world, ["inspect", model, *options(data, {"--no-verify": None})])


@settings(PROPS, max_examples=15)
@given(data=st.data())
def test_compare(world, data):
    a, b = (resolve(world, data.draw(st.sampled_from(MODEL_PATHS))) for _ in range(2))
    windows = st.one_of(st.integers(-2, 8).map(str), st.sampled_from(["1025", "1000000000", str(2**63)]), junk)
    args = ["compare", a, b, *options(data, {
        "--text": st.sampled_from(TEXT_PATHS).map(lambda n: resolve(world, n)),
        "--window": num(ints), "--windows": windows, "--decode-steps": num(ints), "--threads": num(ints),
        "--json": None, "--no-verify": None,
    })]
    check_read_only(world, args)


@settings(PROPS, max_examples=10)
@given(data=st.data())
def test_eval(world, data):
    model = resolve(world, data.draw(st.sampled_from(MODEL_PATHS)))
    text = resolve(world, data.draw(st.sampled_from(TEXT_PATHS)))  # always given: the default is a large corpus
    args = ["eval", model, "--text", text, *options(data, {
        "--window": num(ints), "--stride": num(ints), "--max-tokens": num(ints), "--json": None, "--no-verify": None,
    })]
    check_read_only(world, args)


presets = st.one_of(st.just("tiny"), junk.filter(lambda s: not s.startswith("qwen")))  # never a large preset


@settings(PROPS, max_examples=10)
@given(data=st.data())
def test_init(world, data):
    out = resolve(world, data.draw(st.sampled_from(OUT_PATHS)), fresh=True)
    args = ["init", out, *options(data, {
        "--P": num(st.integers(-2, 100).map(str)), "--preset": presets, "--prefix": num(st.integers(-2, 5000).map(str)),
        "--seed": num(ints), "--dtype": st.sampled_from(["float32", "bfloat16", "float16", "int8"]),
        "--shards": num(st.integers(-2, 20).map(str)), "--force": None,
    })]
    check_writer(world, args, out)


@settings(PROPS, max_examples=4)
@given(data=st.data())
def test_export(world, data):
    ckpt = resolve(world, data.draw(st.sampled_from(["ckpt", "ckpt", "missing", "file", "export", "user-dir"])))
    out = resolve(world, data.draw(st.sampled_from(OUT_PATHS)), fresh=True)
    args = ["export", ckpt, "-o", out, "--no-validate", *options(data, {
        "--P": num(st.integers(-2, 6).map(str)), "--dtype": st.sampled_from(["fp32", "fp16", "bf16"]),
        "--int8": None, "--int4": None, "--block-size": num(ints), "--accuracy-level": num(ints),
        "--method": st.sampled_from(["rtn", "gptq", "best"]), "--force": None,
    })]
    check_writer(world, args, out)


@settings(PROPS, max_examples=5)
@given(data=st.data())
def test_train_refuses_bad_arguments_without_writing(world, data):
    """Only failing argument sets (a valid one would train for half an hour): --steps1 is always < 1."""
    out = resolve(world, data.draw(st.sampled_from(OUT_PATHS)))
    args = ["train", out, "--steps1", data.draw(st.integers(-(10**20), 0).map(str)), *options(data, {
        "--seed": num(ints), "--steps2": num(ints), "--threads": num(ints),
    })]
    before = snapshot(world)
    assert invoke(args) in (1, 2)
    assert snapshot(world) == before


# ---------------------------------------------------------------------------- real processes

NON_UTF8 = b"\xff\xfe"


@pytest.mark.parametrize("argv", [
    [b"init", b"%(world)s/" + NON_UTF8, b"--P", b"2", b"--prefix", b"2"],
    [b"generate", b"%(world)s/export", b"--prompt", NON_UTF8, b"--max-new-tokens", b"2"],
    [b"generate", b"%(world)s/export", b"--prompt-ids", NON_UTF8],
    [b"generate", b"%(world)s/" + NON_UTF8, b"--prompt-ids", b"1"],
    [b"generate", b"%(world)s/export", b"--prompt-ids", b"1,2", b"--threads", b"100000", b"--max-new-tokens", b"2"],
    [b"compare", b"%(world)s/export", b"%(world)s/export", b"--window", b"5000"],
    [b"inspect", b"%(world)s/file"],
], ids=["init-non-utf8-out", "prompt-non-utf8", "ids-non-utf8", "model-non-utf8", "threads-absurd",
        "compare-window-beyond-context", "inspect-a-file"])
def test_real_process(world, argv):
    args = [a.replace(b"%(world)s", os.fsencode(world)) for a in argv]
    env = {**os.environ, "LC_ALL": "C.UTF-8", "PYTHONIOENCODING": ""}
    r = subprocess.run([sys.executable.encode(), b"-m", b"parscale", *args], capture_output=True, timeout=TIME_LIMIT,
                       env=env)
    output = (r.stdout + r.stderr).decode(errors="replace")
    assert r.returncode in (0, 1, 2), output
    assert "Traceback" not in output, output
