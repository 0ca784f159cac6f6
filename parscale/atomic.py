"""Write an output folder so that no user data is ever lost: build it aside, swap it in under a lock.

    with AtomicFolder(out, force=force, is_replaceable=is_export) as tmp:
        ...write files into tmp...
    # OUT now holds exactly what was written into tmp; on any error nothing is left behind

The rules, enforced here once for every command that writes a folder (`export`, `init`, `train`):

- An existing non-empty OUT is refused without `force`. With `force`, only an empty folder or one
  that `is_replaceable` accepts (our own earlier output) is replaced; anything else is refused with
  a message naming what is there.
- A lock file beside OUT (`.NAME.lock`, fcntl.flock) is held from start to finish and taken without
  waiting: a second writer to the same OUT fails at once, naming the first one's pid.
- The folder is built in `.NAME.partial-<pid>-<random>` beside OUT. Partial folders left by dead
  processes for the same NAME are removed when the next writer starts (it holds the lock, so no
  live writer can own them).
- At the end OUT is checked again under the lock; a replaceable old OUT is moved aside, the partial
  renamed into place (os.rename fails rather than replace a non-empty folder), the old one deleted.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType

from parscale.errors import ParScaleError

logger = logging.getLogger("parscale")
Log = Callable[[str], None]


def describe_entries(names: Iterable[str], limit: int = 5) -> str:
    """'a, b/ and c' for the first `limit` names, '... and N more' beyond."""
    names = sorted(names)
    shown, rest = names[:limit], len(names) - limit
    if rest > 0:
        return ", ".join(shown) + f" and {rest} more"
    return shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " and " + shown[-1]


def _entries(folder: Path) -> list[str]:
    return [p.name + ("/" if p.is_dir() and not p.is_symlink() else "") for p in folder.iterdir()]


def check_destination(
    out: Path, *, force: bool, is_replaceable: Callable[[Path], list[str] | None],
    protect: Iterable[Path] = (), what: str = "a parscale export",
) -> None:
    """Raise ParScaleError unless writing `out` is allowed; callable early, before expensive work.

    `is_replaceable(folder)` returns None when the folder is ours to replace, else the entries that
    make it foreign (named in the message). `protect`: folders that OUT must not be or contain.
    """
    out_abs = out.absolute()
    for p in protect:
        p = Path(p).resolve()
        if out.resolve() == p:
            raise ParScaleError(f"output folder {out} would overwrite the input folder {p}; choose another one")
        if out.resolve() in p.parents:  # e.g. `-o .` from the folder holding the checkpoint
            raise ParScaleError(f"output folder {out} contains the input folder {p} (replacing it would delete the "
                                "input); choose another one")
    if out.is_symlink():
        raise ParScaleError(f"{out} is a symbolic link; give a real folder (or remove the link)")
    if not out.exists():
        _check_parent(out)
        return
    if not out.is_dir():
        raise ParScaleError(f"{out} exists and is not a folder; choose another output folder")
    try:
        entries = _entries(out)
    except OSError as e:
        raise ParScaleError(f"cannot read {out}: {e.strerror}") from None
    if not entries:
        return
    if not force:
        raise ParScaleError(f"{out} exists and is not empty; pass --force to replace it")
    foreign = is_replaceable(out_abs)
    if foreign is not None:
        holds = describe_entries(foreign or entries)
        raise ParScaleError(
            f"refusing to replace {out}: it holds {holds}, which {'is' if len(foreign) == 1 else 'are'} not part "
            f"of {what}; --force only replaces an earlier output of this command. Choose another folder, or "
            "move those files away yourself"
        )


def _check_parent(out: Path) -> None:
    """The nearest existing ancestor of OUT must be a folder we can write into (checked before any work)."""
    parent = out.absolute().parent
    while not parent.exists() and parent != parent.parent:
        if parent.is_symlink():  # a dangling link: mkdir would fail on it
            raise ParScaleError(f"cannot create {out}: {parent} is a broken symbolic link")
        parent = parent.parent
    if not parent.is_dir():
        raise ParScaleError(f"cannot create {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ParScaleError(f"cannot write into {parent}: permission denied (or a read-only file system)")


class AtomicFolder:
    """A folder written beside OUT and swapped into place (see the module docstring).

    Use as a context manager (commit on success), or `open()` / `commit()` / `close()` by hand:
    `close()` after `commit()` only releases the lock; without it, it removes the partial folder.
    """

    def __init__(
        self, out: str | Path, *, force: bool, is_replaceable: Callable[[Path], list[str] | None],
        protect: Iterable[Path] = (), what: str = "a parscale export", log: Log | None = None,
    ) -> None:
        self.out = Path(out)
        self.force, self.is_replaceable, self.protect, self.what = force, is_replaceable, tuple(protect), what
        self.log = log or logger.warning
        self.tmp: Path | None = None
        self._lock_fd: int | None = None
        self._lock_path = self.out.parent / f".{self.out.name}.lock"
        self.committed = False

    # ------------------------------------------------------------------ public steps

    def open(self) -> Path:
        """Check OUT, take the lock, remove dead leftovers and create the partial folder; returns it."""
        self.check()
        self._make_parent()
        self._lock()
        try:
            self.check()  # again, now that no other parscale writer can change OUT
            self._remove_dead_partials()
            tmp = self.out.parent / f".{self.out.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
            tmp.mkdir(mode=0o755)
            self.tmp = tmp
        except OSError as e:
            self._unlock()
            raise ParScaleError(f"cannot write into {self.out.parent}: {e.strerror}") from None
        except BaseException:
            self._unlock()
            raise
        return tmp

    def commit(self) -> Path:
        """Move the partial folder to OUT, replacing only what the rules allow; returns OUT."""
        assert self.tmp is not None, "open() first"
        self.check()  # whatever appeared at OUT meanwhile is judged by the same rules
        old = None
        try:
            if self.out.is_dir() and any(self.out.iterdir()):
                old = self.out.parent / f".{self.out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
                os.rename(self.out, old)
            try:
                os.rename(self.tmp, self.out)  # replaces an empty folder; fails on a non-empty one
            except OSError as e:
                if old is not None:
                    with contextlib.suppress(OSError):
                        os.rename(old, self.out)
                    old = None
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                    raise ParScaleError(
                        f"{self.out} was created by another program while writing; it was left untouched and "
                        "nothing was written. Remove it or choose another output folder"
                    ) from None
                raise
        except OSError as e:
            raise ParScaleError(f"cannot move the new folder into place at {self.out}: {e.strerror}") from None
        self.committed, self.tmp = True, None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out

    def close(self) -> None:
        """Remove the partial folder (if not committed) and release the lock; safe to call twice."""
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
        self._unlock()

    def __enter__(self) -> Path:
        return self.open()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            if kind is None:
                self.commit()
            elif isinstance(exc, OSError) and not isinstance(exc, ParScaleError):
                raise ParScaleError(f"writing {self.out} failed: {exc.strerror or exc}") from exc
        finally:
            self.close()

    # ------------------------------------------------------------------ steps

    def check(self) -> None:
        """Raise ParScaleError unless OUT may be written (the rules above); no side effects."""
        check_destination(self.out, force=self.force, is_replaceable=self.is_replaceable,
                          protect=self.protect, what=self.what)

    def _make_parent(self) -> None:
        parent = self.out.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise ParScaleError(f"cannot create {self.out}: a part of {parent} is a file, not a folder") from None
        except OSError as e:
            raise ParScaleError(f"cannot create folder {parent}: {e.strerror}") from None
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ParScaleError(f"cannot write into {parent}: permission denied (or a read-only file system)")

    def _lock(self) -> None:
        while True:  # the holder unlinks the lock file on release: retry if we opened a stale one
            try:
                fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise ParScaleError(f"cannot create the lock file {self._lock_path}: {e.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                pid = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise ParScaleError(
                    f"another parscale process is writing {self.out} (pid {pid}); wait for it to finish "
                    "or choose another output folder"
                ) from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self._lock_path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self._lock_path)  # while still holding it, so nobody locks a file we then remove
        os.close(self._lock_fd)
        self._lock_fd = None

    def _remove_dead_partials(self) -> None:
        """Partial folders of NAME whose process is gone: removed (we hold the lock, so none is live)."""
        pattern = re.compile(rf"^\.{re.escape(self.out.name)}\.(?:partial|old)-(\d+)-")
        prefix = f".{self.out.name}."
        for p in self.out.parent.iterdir():
            if not p.name.startswith(prefix) or not p.is_dir() or p.is_symlink():
                continue
            m = pattern.match(p.name)
            if m is None:
                if p.name.startswith(prefix + "partial-"):
                    self.log(f"left {p} in place: a partial folder of an older parscale; remove it if no "
                             "export is running")
                continue
            if _alive(int(m.group(1))):
                self.log(f"left {p} in place: its process {m.group(1)} is still running")
                continue
            shutil.rmtree(p, ignore_errors=True)
            self.log(f"removed {p}, left by an interrupted run (process {m.group(1)} is gone)")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # exists but belongs to someone else (or an absurd number): leave it alone
    return True


def atomic_folder(
    out: str | Path, *, force: bool, is_replaceable: Callable[[Path], list[str] | None],
    protect: Iterable[Path] = (), what: str = "a parscale export", log: Log | None = None,
) -> AtomicFolder:
    """`with atomic_folder(out, force=..., is_replaceable=...) as tmp:` (see `AtomicFolder`)."""
    return AtomicFolder(out, force=force, is_replaceable=is_replaceable, protect=protect, what=what, log=log)


# ---------------------------------------------------------------------- what each command may replace

EXPORT_MANIFEST = "parscale.json"  # parscale.manifest.MANIFEST, repeated to keep this module standalone
CHECKPOINT_FILES = {
    "config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json",
    "training_report.json",
}


def foreign_in_export(folder: Path) -> list[str] | None:
    """None if `folder` is a parscale export holding only its own files; else the foreign entries."""
    import json

    manifest = folder / EXPORT_MANIFEST
    entries = _entries(folder)
    if not manifest.is_file():
        return entries
    try:
        listed = set(json.loads(manifest.read_text()).get("files", {}))
    except (ValueError, AttributeError, OSError, UnicodeDecodeError):
        return entries  # not a manifest we wrote: cannot tell what belongs to it
    foreign = [e for e in entries if e != EXPORT_MANIFEST and e not in listed]
    return foreign or None


def foreign_in_checkpoint(folder: Path) -> list[str] | None:
    """None if `folder` is a checkpoint (config.json + safetensors) with nothing else; else the foreign entries."""
    entries = _entries(folder)
    names = set(entries)
    if "config.json" not in names or not any(e.endswith(".safetensors") for e in names):
        return entries
    foreign = [e for e in entries if e not in CHECKPOINT_FILES and not e.endswith(".safetensors")]
    return foreign or None
