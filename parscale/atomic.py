"""Write an output folder so that no user data is ever lost: build it aside, swap it in under a lock.

    with AtomicFolder(out, force=force, is_replaceable=is_export) as tmp:
        ...write files into tmp...
    # OUT now holds exactly what was written into tmp; on any error nothing is left behind

The rules, enforced here once for every command that writes a folder (`export`, `init`, `train`):

- An existing non-empty OUT is refused without `force`. With `force`, only an empty folder or one
  that `is_replaceable` accepts (our own earlier output) is replaced; anything else is refused with
  a message naming what is there.
- A lock file beside OUT (`.NAME.lock`, fcntl.flock) is held from start to finish and taken without
  waiting: a second writer to the same OUT fails at once, naming the first one's pid. It is created
  with O_EXCL|O_NOFOLLOW; an existing one is reused only if it is a plain, unlinked-elsewhere file
  holding nothing but a pid (a stale lock of ours): a symlink, a hard link or a user's file at that
  path is refused and left untouched (`FolderLock`).
- The folder is built in `.NAME.partial-<pid>-<random>/NAME` beside OUT: the wrapper folder is
  created by us (mkdir fails on anything already there) and holds our marker file, `.parscale-owner`,
  with that pid and random token. A replaceable old OUT is moved into a marked `.NAME.old-<pid>-<random>`
  wrapper likewise. Leftovers of dead processes for the same NAME are removed when the next writer
  starts (it holds the lock, so no live writer can own them), and only if they carry that marker: a
  folder that merely looks like one (`.NAME.old-2024-12-01`) is never removed.
- At the end OUT is checked again under the lock; a replaceable old OUT is moved aside, the partial
  renamed into place (os.rename fails rather than replace a non-empty folder), the old one deleted.
- While the folder is open, SIGTERM (when its handler is the default one) raises `Terminated`, a
  KeyboardInterrupt, so a terminated run cleans up exactly as an interrupted one.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType

from parscale.errors import ParScaleError
from parscale.locking import FolderLock, SigtermGuard

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
        self._wrapper: Path | None = None  # the marked folder holding tmp
        self._lock = FolderLock(self.out)
        self._sigterm = SigtermGuard()
        self.committed = False

    # ------------------------------------------------------------------ public steps

    def open(self) -> Path:
        """Check OUT, take the lock, remove dead leftovers and create the partial folder; returns it."""
        self.check()
        self._make_parent()
        self._sigterm.install()
        try:
            self._lock.acquire()
            self.check()  # again, now that no other parscale writer can change OUT
            self._remove_dead_partials()
            self._wrapper = _marked_folder(self.out, "partial")
            tmp = self._wrapper / self.out.name
            tmp.mkdir(mode=0o755)
            self.tmp = tmp
        except OSError as e:
            self.close()
            raise ParScaleError(f"cannot write into {self.out.parent}: {e.strerror}") from None
        except BaseException:
            self.close()
            raise
        return tmp

    def commit(self) -> Path:
        """Move the partial folder to OUT, replacing only what the rules allow; returns OUT."""
        assert self.tmp is not None, "open() first"
        self.check()  # whatever appeared at OUT meanwhile is judged by the same rules
        old = old_wrapper = None
        try:
            if self.out.is_dir() and any(self.out.iterdir()):
                old_wrapper = _marked_folder(self.out, "old")
                old = old_wrapper / self.out.name
                try:
                    os.rename(self.out, old)
                except OSError:
                    _remove_marked(old_wrapper)
                    raise
            try:
                os.rename(self.tmp, self.out)  # replaces an empty folder; fails on a non-empty one
            except OSError as e:
                if old is not None and old_wrapper is not None:
                    with contextlib.suppress(OSError):
                        os.rename(old, self.out)
                        _remove_marked(old_wrapper)
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
        if old_wrapper is not None:
            shutil.rmtree(old_wrapper, ignore_errors=True)
        return self.out

    def close(self) -> None:
        """Remove the partial folder (if not committed) and release the lock; safe to call twice."""
        try:
            self._sigterm.hold()  # a second SIGTERM must not cut the clean-up short
            if self._wrapper is not None:
                shutil.rmtree(self._wrapper, ignore_errors=True)
                self._wrapper = self.tmp = None
            self._lock.release()
        finally:
            self._sigterm.restore()

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

    def _remove_dead_partials(self) -> None:
        """Marked leftovers of NAME whose process is gone: removed (we hold the lock, so none is live).

        Only folders carrying our marker (`_marked_folder`) are ever removed; look-alikes are kept."""
        pattern = re.compile(rf"^\.{re.escape(self.out.name)}\.(?:partial|old)-(\d+)-([0-9a-f]{{8}})$")
        for p in self.out.parent.iterdir():
            m = pattern.match(p.name)
            if m is None or not p.is_dir() or p.is_symlink():
                continue
            if not _is_marked(p, f"{m.group(1)}-{m.group(2)}"):
                self.log(f"left {p} in place: it does not carry parscale's marker (.parscale-owner), so it was "
                         "not made by this parscale; remove it yourself if it is a leftover")
                continue
            if _alive(int(m.group(1))):
                self.log(f"left {p} in place: its process {m.group(1)} is still running")
                continue
            shutil.rmtree(p, ignore_errors=True)
            self.log(f"removed {p}, left by an interrupted run (process {m.group(1)} is gone)")


MARKER = ".parscale-owner"  # inside every folder we create beside OUT: "<pid>-<token>\n"


def _marked_folder(out: Path, kind: str) -> Path:
    """Create `.NAME.<kind>-<pid>-<token>` beside `out` (mkdir: fails on anything already there) holding
    our marker; returns it."""
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    folder = out.parent / f".{out.name}.{kind}-{tag}"
    folder.mkdir(mode=0o755)
    fd = os.open(folder / MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        os.write(fd, f"{tag}\n".encode())
    finally:
        os.close(fd)
    return folder


def _is_marked(folder: Path, tag: str) -> bool:
    """True if `folder` holds our marker (a plain file, not a link) naming exactly `tag`."""
    marker = folder / MARKER
    try:
        if not stat.S_ISREG(os.lstat(marker).st_mode):
            return False
        return marker.read_bytes() == f"{tag}\n".encode()
    except OSError:
        return False


def _remove_marked(folder: Path) -> None:
    """Remove a wrapper we created whose content has been moved out: the marker, then the folder."""
    (folder / MARKER).unlink(missing_ok=True)
    folder.rmdir()


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
