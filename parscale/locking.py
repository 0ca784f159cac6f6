"""One writer per folder: the lock file beside it, and SIGTERM turned into a clean-up.

`FolderLock` is taken by every command that writes a folder (through `parscale.atomic`) or changes
files inside one (`train-heads`); `SigtermGuard` makes a terminated run clean up as an interrupted
one does.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import stat
import threading
from pathlib import Path

from parscale.errors import ParScaleError


class FolderLock:
    """The lock of one folder: `.NAME.lock` beside it, fcntl.flock'ed, not waited for.

    Created with O_EXCL|O_NOFOLLOW. An existing lock file (one left by a killed run) is reused only
    if it is a plain file with a single link holding at most a pid: anything else at that path (a
    symlink, a hard link to another file, a user's file, a folder) is refused and left untouched.
    Released by unlinking it while still holding it (only if the path is still that same file).
    Used by `AtomicFolder` and, alone, by commands that change files inside a folder (`train-heads`).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder.parent / f".{self.folder.name}.lock"
        self._fd: int | None = None

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock or raise ParScaleError (held by another process: its pid is named)."""
        while True:  # the holder unlinks the lock file on release: retry if we opened a stale one
            fd = self._open()
            if fd is None:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise ParScaleError(
                    f"another parscale process is writing {self.folder} (pid {pid}); wait for it to finish "
                    "or choose another output folder"
                ) from None
            try:
                same = os.path.samestat(os.fstat(fd), os.lstat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as e:
            os.close(fd)
            raise ParScaleError(f"cannot write the lock file {self.path}: {e.strerror}") from None
        self._fd = fd

    def release(self) -> None:
        """Unlink and close the lock file; safe to call twice."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            if os.path.samestat(os.fstat(self._fd), os.lstat(self.path)):
                os.unlink(self.path)  # while still holding it, so nobody locks a file we then remove
        os.close(self._fd)
        self._fd = None

    def _open(self) -> int | None:
        """A descriptor of our lock file, creating it if absent; None to retry (it vanished meanwhile)."""
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            return os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            pass
        except OSError as e:
            raise ParScaleError(f"cannot create the lock file {self.path}: {e.strerror}") from None
        try:
            fd = os.open(self.path, flags)
        except FileNotFoundError:
            return None
        except OSError as e:  # ELOOP: a symlink; EISDIR: a folder
            raise self._foreign(e.strerror) from None
        st = os.fstat(fd)
        content = os.pread(fd, 64, 0) if stat.S_ISREG(st.st_mode) else b""
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or not re.fullmatch(rb"\d{0,20}\n?", content):
            os.close(fd)
            raise self._foreign("not a plain file holding a pid" if stat.S_ISREG(st.st_mode) else "not a file")
        return fd

    def _foreign(self, why: str | None) -> ParScaleError:
        return ParScaleError(
            f"{self.path} exists and is not a parscale lock file ({why}); it was left untouched. Remove or "
            f"rename it, or choose another output folder"
        )


class Terminated(KeyboardInterrupt):
    """SIGTERM while an output folder is open: cleans up as Ctrl-C does (the CLI exits 143)."""


class SigtermGuard:
    """Turns SIGTERM into `Terminated` while a folder is open (main thread, default handler only)."""

    def __init__(self) -> None:
        self._previous: object = None
        self._installed = False

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return  # someone (a server) handles SIGTERM already: theirs decides
        self._previous = signal.signal(signal.SIGTERM, _raise_terminated)
        self._installed = True

    def hold(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def restore(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)  # type: ignore[arg-type]
            self._installed = False


def _raise_terminated(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the clean-up that follows runs to its end
    raise Terminated()
