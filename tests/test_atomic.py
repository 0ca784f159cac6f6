"""parscale.atomic: output folders are replaced only when they are ours, under a lock, and atomically."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parscale.atomic import MARKER, AtomicFolder, foreign_in_checkpoint, foreign_in_export
from parscale.errors import ParScaleError


def writer(out: Path, force: bool = False, log=None) -> AtomicFolder:
    return AtomicFolder(out, force=force, is_replaceable=foreign_in_export, log=log)


def fake_export(folder: Path, extra: str | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"graph")
    (folder / "parscale.json").write_text(json.dumps({"files": {"model.onnx": {"bytes": 5}}}))
    if extra:
        (folder / extra).write_text("user data")
    return folder


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_writes_a_new_folder_and_leaves_nothing_else(tmp_path):
    with writer(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("new")
    assert tree(tmp_path) == ["out", "out/a.txt"]  # no partial folder, no lock file


def test_non_empty_folder_needs_force(tmp_path):
    out = fake_export(tmp_path / "out")
    with pytest.raises(ParScaleError, match="not empty; pass --force"):
        writer(out).open()
    assert tree(tmp_path) == ["out", "out/model.onnx", "out/parscale.json"]


def test_force_replaces_an_earlier_export_and_an_empty_folder(tmp_path):
    out = fake_export(tmp_path / "out")
    with writer(out, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert tree(tmp_path) == ["out", "out/new.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with writer(empty) as tmp:  # an empty folder needs no --force
        (tmp / "x").write_text("x")
    assert (empty / "x").is_file()


@pytest.mark.parametrize("layout", ["user-files", "export-plus-user-file"])
def test_force_refuses_foreign_content_and_names_it(tmp_path, layout):
    out = tmp_path / "d"
    if layout == "user-files":
        (out / "sub").mkdir(parents=True)
        (out / "thesis.txt").write_text("years of work")
        words = ["thesis.txt", "sub/"]
    else:
        fake_export(out, extra="notes.txt")
        words = ["notes.txt"]
    before = tree(tmp_path)
    with pytest.raises(ParScaleError, match="refusing to replace") as e:
        writer(out, force=True).open()
    for w in words:
        assert w in str(e.value)
    assert "model.onnx" not in str(e.value)  # only what is foreign is named
    assert tree(tmp_path) == before


def test_a_second_writer_fails_at_once_naming_the_first(tmp_path):
    first = writer(tmp_path / "out")
    first.open()
    try:
        started = time.perf_counter()
        with pytest.raises(ParScaleError, match=rf"another parscale process is writing .*out \(pid {os.getpid()}\)"):
            writer(tmp_path / "out").open()
        assert time.perf_counter() - started < 1  # no waiting
    finally:
        first.close()
    assert tree(tmp_path) == []


def test_what_appears_at_out_meanwhile_is_never_replaced(tmp_path):
    out = tmp_path / "out"
    w = writer(out, force=True)
    tmp = w.open()
    (tmp / "a.txt").write_text("new")
    out.mkdir()
    (out / "mine.txt").write_text("created by someone else during the export")
    with pytest.raises(ParScaleError, match="refusing to replace"):
        w.commit()
    w.close()
    assert tree(tmp_path) == ["out", "out/mine.txt"]


def test_failure_inside_leaves_nothing(tmp_path):
    out = fake_export(tmp_path / "out")
    before = tree(tmp_path)
    with pytest.raises(RuntimeError), writer(out, force=True) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("boom")
    assert tree(tmp_path) == before


def _leftover(folder: Path, pid: int, token: str, *, marked: bool = True) -> Path:
    """A leftover folder as an interrupted run leaves it: our marker names its pid and token."""
    folder.mkdir()
    (folder / "out").mkdir()
    if marked:
        (folder / MARKER).write_text(f"{pid}-{token}\n")
    return folder


def test_dead_partials_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        stale = _leftover(tmp_path / f".out.partial-{dead_pid}-abcd1234", dead_pid, "abcd1234")
        stale_old = _leftover(tmp_path / f".out.old-{dead_pid}-abcd1235", dead_pid, "abcd1235")
        live = _leftover(tmp_path / f".out.partial-{sleeper.pid}-ffff0000", sleeper.pid, "ffff0000")
        other = _leftover(tmp_path / f".other.partial-{dead_pid}-abcd1234", dead_pid, "abcd1234")  # another NAME
        unmarked = _leftover(tmp_path / f".out.partial-{dead_pid}-abcd1236", dead_pid, "abcd1236", marked=False)
        wrong_tag = _leftover(tmp_path / f".out.old-{dead_pid}-abcd1237", dead_pid, "abcd9999")
        logged: list[str] = []
        with writer(tmp_path / "out", log=logged.append) as tmp:
            (tmp / "x").write_text("x")
        assert not stale.exists() and not stale_old.exists()
        assert live.exists() and other.exists() and unmarked.exists() and wrong_tag.exists()
        assert any("removed" in m and str(dead_pid) in m for m in logged)
        assert any("still running" in m and str(sleeper.pid) in m for m in logged)
        assert any("marker" in m and unmarked.name in m for m in logged)
    finally:
        sleeper.kill()
        sleeper.wait()


DEAD_PID = 2**22 + 12345  # above the default pid_max: no such process


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["partial", "old", "lock", "tmp"]),
       tail=st.one_of(st.just(f"{DEAD_PID}-abcd1234"), st.just("2024-12-01"), st.just(f"{DEAD_PID}-"),
                      st.text("0123456789abcdef-", max_size=20)),
       sub=st.booleans())
def test_folders_that_only_look_like_leftovers_are_never_removed(tmp_path_factory, kind, tail, sub):
    """A user's folder beside OUT, named like ours but without our marker, survives every write (and a
    failed one): `.x.old-2024-12-01`, `.x.partial-<dead pid>-<hex>`, ..."""
    root = tmp_path_factory.mktemp("looks")
    mine = root / f".x.{kind}-{tail}"
    if kind == "lock":
        mine = root / ".x.lockdir"
    mine.mkdir()
    (mine / ("x" if sub else "thesis.txt")).write_text("mine")
    before = tree(root)
    with writer(root / "x", log=lambda _m: None) as tmp:
        (tmp / "a").write_text("a")
    assert tree(root) == sorted([*before, "x", "x/a"])
    again = AtomicFolder(root / "x", force=True, is_replaceable=lambda _p: None, log=lambda _m: None)
    with again as tmp:  # a replacement moves the old OUT aside into a marked folder, then removes that
        (tmp / "b").write_text("b")
    failing = AtomicFolder(root / "x", force=True, is_replaceable=lambda _p: None, log=lambda _m: None)
    with pytest.raises(RuntimeError), failing:
        raise RuntimeError("boom")
    assert tree(root) == sorted([*before, "x", "x/b"])


def _hard_link(lock: Path, precious: Path) -> None:
    os.link(precious, lock)


LOCK_PATH_CASES = {  # what a user may have at .x.lock: each is refused and left as it was
    "symlink to a file": lambda lock, precious: lock.symlink_to(precious.name),
    "dangling symlink": lambda lock, precious: lock.symlink_to(lock.parent / "would-be-created"),
    "symlink to a folder": lambda lock, precious: lock.symlink_to(lock.parent),
    "hard link": _hard_link,
    "user's text file": lambda lock, precious: lock.write_text("notes about x\n"),
    "a folder": lambda lock, precious: lock.mkdir(),
}


@pytest.mark.parametrize("case", sorted(LOCK_PATH_CASES))
def test_nothing_at_the_lock_path_is_followed_or_truncated(tmp_path, case):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    lock = tmp_path / ".x.lock"
    LOCK_PATH_CASES[case](lock, precious)
    before = {p.name: (p.is_symlink(), p.read_bytes() if p.is_file() and not p.is_symlink() else None)
              for p in tmp_path.iterdir()}
    with pytest.raises(ParScaleError, match=r"is not a parscale lock file.*left untouched"):
        writer(tmp_path / "x").open()
    after = {p.name: (p.is_symlink(), p.read_bytes() if p.is_file() and not p.is_symlink() else None)
             for p in tmp_path.iterdir()}
    assert after == before and precious.read_text() == "keep me"


def test_a_stale_lock_of_ours_is_reused(tmp_path):
    (tmp_path / ".x.lock").write_text("12345\n")  # left by a killed run
    with writer(tmp_path / "x") as tmp:
        (tmp / "a").write_text("a")
    assert tree(tmp_path) == ["x", "x/a"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_cleans_up_like_sigint(tmp_path, sig):
    """A real process killed while writing: no partial folder, no lock left; SIGTERM exits 143."""
    code = ("import sys, time; from parscale.atomic import AtomicFolder, foreign_in_checkpoint\n"
            "from parscale.cli import main\n"
            f"w = AtomicFolder({str(tmp_path / 'out')!r}, force=False, is_replaceable=foreign_in_checkpoint)\n"
            "with w as tmp:\n    (tmp / 'half').write_text('x'); print('open', flush=True); time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "open"
        assert any(p.name.startswith(".out.partial-") for p in tmp_path.iterdir())
        proc.send_signal(sig)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert proc.returncode != 0


def test_sigterm_in_the_cli_exits_143_leaving_nothing(tmp_path):
    code = ("import sys, time\nfrom parscale.atomic import AtomicFolder, foreign_in_checkpoint\n"
            "import parscale.cli as cli\n"
            "def slow():\n"
            f"    with AtomicFolder({str(tmp_path / 'out')!r}, force=False, is_replaceable=foreign_in_checkpoint):\n"
            "        print('open', flush=True); time.sleep(600)\n"
            "cli.app = slow\ncli.main()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "open"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 143 and "terminated" in stderr and "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []


def test_paths_that_cannot_be_written(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ParScaleError, match="is a file, not a folder"):
        writer(tmp_path / "file" / "out").open()
    with pytest.raises(ParScaleError, match="exists and is not a folder"):
        writer(tmp_path / "file").open()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ParScaleError, match="symbolic link"):
        writer(tmp_path / "link").open()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "link"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_parent(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(ParScaleError, match="cannot write into"):
            writer(ro / "out").open()
    finally:
        ro.chmod(0o755)


def test_checkpoint_rule(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "config.json").write_text("{}")
    (ck / "model.safetensors").write_bytes(b"")
    assert foreign_in_checkpoint(ck) is None
    (ck / "notes.md").write_text("mine")
    assert foreign_in_checkpoint(ck) == ["notes.md"]


def test_concurrent_cli_writer_fails_clearly(tmp_path):
    """A real second process (`parscale init`) into an OUT being written: exit 1, one line, no traceback."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from parscale.atomic import AtomicFolder, foreign_in_checkpoint;"
         f"w = AtomicFolder({str(tmp_path / 'ck')!r}, force=False, is_replaceable=foreign_in_checkpoint); w.open();"
         "print('locked', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        r = subprocess.run([sys.executable, "-m", "parscale", "init", str(tmp_path / "ck")],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 1
        assert f"another parscale process is writing {tmp_path / 'ck'} (pid {holder.pid})" in r.stderr
        assert "Traceback" not in r.stderr
    finally:
        holder.kill()
        holder.wait()
