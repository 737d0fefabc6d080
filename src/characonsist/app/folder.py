"""The output folder: one run at a time, nothing written outside it, nothing deleted that the run did not write.

- **Lock.** ``open()`` takes an exclusive ``flock`` on ``DIR/.characonsist.lock`` (held until ``close()``). The
  kernel drops it when the process ends, however it ends, so a crashed or killed run never leaves it stuck; a
  second run into the same folder stops at once and names the run holding it.
- **Owned temporaries.** Every file is written to a temporary name in its folder and renamed into place
  (``os.replace`` is atomic), so a crash leaves the old file or the new one, never a torn one. Each temporary's
  path is first appended to ``DIR/.characonsist-temporaries``; the next run that takes the lock deletes exactly
  the files listed there (a killed run's leftovers) and nothing else, whatever their names look like.
- **Inside DIR only.** ``path()`` refuses names that are absolute, contain ``..`` or lead through a link out of
  the folder.
- **One line per file-system problem.** OS errors become a ``FolderError`` naming the path and what to do.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: the lock is msvcrt's
    fcntl = None

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)   # our own files are never links (a planted link is refused)
LOCK_NAME = ".characonsist.lock"
JOURNAL_NAME = ".characonsist-temporaries"
TMP_MARK = ".tmp-characonsist-"


class FolderError(Exception):
    """A file-system problem, in one line naming the path and what to do."""

    def __init__(self, message: str, path: str | Path | None = None):
        super().__init__(message)
        self.path = None if path is None else str(path)


_ADVICE = {
    errno.ENOENT: ("does not exist", "check the path"),
    errno.ENOTDIR: ("lies under a file, not a folder", "choose a path whose parents are folders"),
    errno.EISDIR: ("is a folder, not a file", "give a file path"),
    errno.EACCES: ("permission denied", "choose a place you can write to, or change its permissions"),
    errno.EPERM: ("operation not permitted", "choose a place you can write to, or change its permissions"),
    errno.EROFS: ("is on a read-only file system", "choose a writable place"),
    errno.ENOSPC: ("no space left on the device", "free some space and rerun the same command to resume"),
    errno.EDQUOT: ("disk quota exceeded", "free some space and rerun the same command to resume"),
    errno.ENAMETOOLONG: ("name too long", "choose a shorter path"),
    errno.EEXIST: ("already exists", "choose another path"),
}


def describe_os_error(error: OSError, path: str | Path, doing: str = "writing") -> str:
    """``doing PATH: what happened; what to do``, from an OSError's errno (one line)."""
    what, advice = _ADVICE.get(error.errno, (error.strerror or str(error), "check the path and rerun"))
    return f"{doing} {path}: {what}; {advice}"


def nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists."""
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path(".")


def check_writable_target(path: str | Path, kind: str = "folder", flag: str = "--out") -> None:
    """Problems knowable before any work for a folder (``kind="folder"``) or file to be written: an existing
    thing of the other kind, a file among its parents, no permission to create it. Raises FolderError."""
    path = Path(path).expanduser()
    if kind == "folder" and path.exists() and not path.is_dir():
        raise FolderError(f"{flag} {path} is a file, not a folder: choose a folder path", path)
    if kind == "file" and path.is_dir():
        raise FolderError(f"{flag} {path} is a folder: give a file path", path)
    base = nearest_existing(path.parent if kind == "file" else path)
    if not base.is_dir():
        raise FolderError(f"{flag} {path}: {base} is a file, so nothing can be created under it; choose another "
                          "path", path)
    if kind == "folder" and path.is_dir():
        return   # an existing output folder may be read-only: a run with nothing to do succeeds there; whether
                 # work remains is known once its plan is (OutputFolder.open, then the run's plan)
    _probe(base, path, flag)   # the kernel's own answer: read-only file system, no permission, ...
    if not os.access(base, os.W_OK | os.X_OK):
        raise FolderError(f"{flag} {path}: {base} is not writable (permission denied); choose a place you can "
                          "write to, or change its permissions", path)


def _probe(folder: Path, path: Path, flag: str) -> None:
    """Create and remove an empty file of our own in ``folder``: what ``os.access`` cannot tell (root on a
    read-only or special file system such as /proc) shows up before any work, not after it."""
    probe = folder / f".characonsist-probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600)
    except OSError as e:
        raise FolderError(f"{flag} {path}: {describe_os_error(e, folder, 'creating a file in')}", path) from None
    os.close(fd)
    probe.unlink(missing_ok=True)


def safe_name(name: str) -> str | None:
    """Why ``name`` cannot be one folder or file name inside the output folder, or None."""
    if name in ("", ".", ".."):
        return f"{name!r} is not a folder name"
    if any(c in name for c in "/\\\0"):
        return f"{name!r} contains a path separator"
    if name.startswith("."):
        return f"{name!r} starts with '.' (hidden names are kept for characonsist's own files)"
    return None


def write_file(path: str | Path, data: bytes) -> None:
    """Atomically write one file that is not part of a run folder (a converted story, an eval report): through an
    exclusive temporary beside it (never someone else's file, removed on failure), fsync'd, then renamed. Callers
    check first that ``path`` is not a file they must not replace. Raises FolderError with one clear line."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")
    try:
        _replace_with(path, tmp, data)
    except OSError as e:
        raise FolderError(describe_os_error(e, path), path) from None


def _replace_with(path: Path, tmp: Path, data: bytes, track=None) -> None:
    """Write ``data`` to the temporary ``tmp`` (created exclusively, never through a link, fsync'd; ``track(tmp)``
    first records it) and rename it over ``path``; a temporary this call created is removed if anything fails."""
    created = False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if track is not None:
            track(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644)   # never someone else's
        created = True
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        created = False
    finally:
        if created:
            tmp.unlink(missing_ok=True)


class OutputFolder:
    """A run's output folder (see the module docstring). Use as a context manager, or ``open()``/``close()``."""

    def __init__(self, root: str | Path, flag: str = "--out"):
        self.root = Path(root).expanduser()
        self.flag = flag
        self.read_only = False
        self.read_only_why = "read-only or no permission"   # the kernel's reason once open() knows it
        self._lock_fd: int | None = None
        self._journal = None
        self._token = f"{os.getpid()}-{secrets.token_hex(4)}"

    # ------------------------------------------------------------------ lock
    def check(self) -> None:
        """Problems knowable before any work, without creating anything (FolderError)."""
        check_writable_target(self.root, "folder", self.flag)

    def open(self) -> OutputFolder:
        """Create the folder, take its lock, delete what a killed run left in the temporaries journal."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise FolderError(f"{self.flag} {describe_os_error(e, self.root, 'creating')}", self.root) from None
        if not self.root.is_dir():
            raise FolderError(f"{self.flag} {self.root} is a file, not a folder: choose a folder path", self.root)
        lock = self.root / LOCK_NAME
        if lock.is_symlink() or (lock.exists() and not lock.is_file()):
            raise FolderError(f"{lock} is not a plain file (characonsist's lock file): move it away", lock)
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o644)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise FolderError(f"{self.flag} {describe_os_error(e, lock, 'opening the lock file')}", lock) from None
            self.read_only = True   # nothing can be written: fine for a run with nothing to do
            self.read_only_why = "read-only file system" if e.errno == errno.EROFS else "permission denied"
            try:
                fd = os.open(lock, os.O_RDONLY | _NOFOLLOW)
            except OSError:
                return self
        if not _lock(fd):
            holder = _read_holder(fd)
            os.close(fd)
            raise FolderError(f"{self.flag} {self.root} is in use by another characonsist run{holder}; wait for it "
                              "to finish or choose another folder", self.root)
        foreign = _foreign_file(fd, lock, self.root / JOURNAL_NAME)
        if foreign is not None:
            os.close(fd)
            raise FolderError(f"{foreign} was not written by characonsist (its name is one characonsist uses for its "
                              "own bookkeeping): move it away or choose another folder", foreign)
        self._lock_fd = fd
        if not self.read_only:
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
            except OSError:
                pass
            self._clean_journal()
        return self

    def close(self) -> None:
        """Forget this run's temporaries (all renamed or deleted by now) and release the lock."""
        if self._journal is not None:
            try:
                self._journal.close()
                (self.root / JOURNAL_NAME).unlink()   # every temporary it lists is renamed or deleted by now
            except OSError:
                pass
            self._journal = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)   # closing the descriptor drops the flock
            self._lock_fd = None

    def __enter__(self) -> OutputFolder:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ paths
    def path(self, relative: str | Path) -> Path:
        """``root / relative``, refusing anything that would lie outside the folder (FolderError)."""
        rel = Path(relative)
        if rel.is_absolute() or any(part in ("", ".", "..") for part in rel.parts):
            raise FolderError(f"refusing to write {relative!r}: it would lie outside {self.flag} {self.root}",
                              relative)
        full = self.root / rel
        root = self.root.resolve()
        if not full.resolve().is_relative_to(root):
            raise FolderError(f"refusing to write {full}: it leads through a link out of {self.flag} {self.root}; "
                              "remove the link or choose another folder", full)
        return full

    # ------------------------------------------------------------------ writing
    def write_bytes(self, relative: str | Path, data: bytes) -> bool:
        """Atomically write ``data`` (fsync'd) through an owned temporary; False if the file already held it."""
        path = self.path(relative)
        try:
            if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
                return False
        except OSError:
            pass
        if self.read_only:
            raise FolderError(f"{self.flag} {self.root} is not writable ({self.read_only_why}), and this run "
                              f"must write {relative}; make it writable or choose another folder", self.root)
        tmp = path.with_name(f".{path.name}{TMP_MARK}{self._token}")
        try:
            _replace_with(path, tmp, data, track=self._track)
        except OSError as e:
            name = str(getattr(e, "filename", None) or "")
            where = Path(name) if name and TMP_MARK not in name else path
            raise FolderError(describe_os_error(e, where), where) from None
        return True

    def remove(self, relative: str | Path) -> None:
        """Delete a file inside the folder (callers check it is one this tool wrote)."""
        path = self.path(relative)
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            raise FolderError(describe_os_error(e, path, "deleting"), path) from None

    def _track(self, tmp: Path) -> None:
        """Record a temporary before it exists, so a killed run's leftover is found and only it is deleted."""
        if self._journal is None:
            fd = os.open(self.root / JOURNAL_NAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW, 0o644)
            self._journal = os.fdopen(fd, "a", encoding="utf-8")
        self._journal.write(tmp.relative_to(self.root).as_posix() + "\n")
        self._journal.flush()

    def _clean_journal(self) -> list[Path]:
        """Delete the temporaries an earlier run listed and left behind (only those); return them."""
        journal = self.root / JOURNAL_NAME
        try:
            lines = journal.read_text(encoding="utf-8").splitlines() \
                if journal.is_file() and not journal.is_symlink() else []
        except OSError:
            return []
        removed = []
        root = self.root.resolve()
        for line in lines:
            rel = Path(line)
            if rel.is_absolute() or ".." in rel.parts or TMP_MARK not in rel.name:
                continue     # not one of ours: never touched
            path = self.root / rel
            if path.is_symlink() or not path.is_file() or not path.resolve().is_relative_to(root):
                continue
            try:
                path.unlink()
                removed.append(path)
            except OSError:
                pass
        try:
            journal.unlink(missing_ok=True)
        except OSError:
            pass
        return removed


_HOLDER = re.compile(r"pid \d+ since [0-9: -]+\n?")


def _foreign_file(lock_fd: int, lock: Path, journal: Path) -> Path | None:
    """The lock file or the temporaries journal when what it holds is not what characonsist writes there (a file of
    the user's that happens to have that name must be neither emptied nor deleted), else None."""
    try:
        text = os.pread(lock_fd, 4096, 0).decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return lock
    if text and not _HOLDER.fullmatch(text):
        return lock
    if journal.is_symlink() or (journal.exists() and not journal.is_file()):
        return journal
    if journal.is_file():
        try:
            text = journal.read_bytes().decode("utf-8", errors="replace")
        except OSError:
            return journal
        lines = text.split("\n")[:-1]      # a last line without its newline is a killed run's torn write: its
        if any(TMP_MARK not in line for line in lines):   # temporary was never created (recorded first)
            return journal
    return None


def _lock(fd: int) -> bool:
    """Take an exclusive non-blocking lock on ``fd``; False if another process holds it."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError:      # a file system without flock: run unlocked rather than not at all
            return True
        return True
    import msvcrt  # pragma: no cover

    try:  # pragma: no cover
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:  # pragma: no cover
        return False
    return True  # pragma: no cover


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        return ""
    return f" ({text})" if text else ""
