"""Writing files so that nothing a user does loses a checkpoint or history: atomic writes (temporary
file, fsync, rename), writability checked before any work, OSError turned into one line naming the
path and the cause, and the lock that keeps a second process out of a run directory
(docs/GUARANTEES.md)."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

from motfusion.errors import CheckpointError, WriteError

TMP_PREFIX = ".tmp-"  # what a write in progress is named: a crash leaves only these behind

LOCK_FILE = ".lock"  # RUN/.lock: the PID of the process that trains the run (RunLock)


def write_error(e: OSError, what: str, then: str = "") -> WriteError:
    """An OSError while writing -> one line naming the path and the cause ("no space left on device")."""
    cause = (e.strerror or str(e)).lower() if e.errno is not None else str(e)
    where = f" {e.filename}" if e.filename else ""
    return WriteError(f"cannot write {what}{where}: {cause}{then}")


def write_atomic(path: Path, write: Any) -> None:
    """Write a file whole or not at all: `write(f)` fills a temporary sibling, which is fsynced and renamed
    over `path`. A kill at any moment leaves the old file or the new one, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}")
    try:
        write_file(tmp, write, fsync=True)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync(path.parent)


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def check_writable_dir(path: Path, what: str) -> None:
    """Create `path` (a directory) if needed and prove a file can be written there, before any work:
    a read-only or full file system, or a file in the way, is one CheckpointError naming the path."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{what} {path} is a file, not a directory; choose another path")
    _check_ancestors(path, what)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f"{TMP_PREFIX}probe-{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"\0")
        probe.unlink()
    except OSError as e:
        raise write_error(e, what) from None


def check_writable_file(path: Path, what: str) -> None:
    """`path` can be (re)written as a file: it is not a directory and its folder takes new files."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{what} {path} is a directory; name a file")
    _check_ancestors(path, what)
    check_writable_dir(path.parent, f"the folder of {what}")


def _check_ancestors(path: Path, what: str) -> None:
    """A file where `path` needs a folder, e.g. --out notes.txt/run."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CheckpointError(
                    f"{what} {path} lies under {parent}, which is a file; choose another path"
                )
            return


class RunLock:
    """The one writer of a run directory: an exclusive flock on RUN/.lock, holding the writer's PID.

    The OS drops a flock when its process ends, however it ends (SIGKILL and power loss included),
    so the lock of a crashed run is never in the way: the next writer takes it, and `stale` names the
    PID that left it (the file still holds it; a clean exit empties it). While a process holds it, a
    second writer gets a CheckpointError naming that PID. The file is never deleted, so two processes
    cannot each lock a different file of the same name.
    """

    def __init__(self, run_dir: Path):
        self.run_dir, self.path = Path(run_dir), Path(run_dir) / LOCK_FILE
        self.fd: int | None = None
        self.stale: str | None = None  # the PID a crashed writer left in the file

    def acquire(self) -> RunLock:
        check_writable_dir(self.run_dir, "run directory")
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise write_error(e, "run lock") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd) or "unknown"
            os.close(fd)
            raise CheckpointError(
                f"{self.run_dir} is in use: process {holder} is training it (lock {self.path}); "
                "wait for it or stop it, or choose another --out"
            ) from None
        except OSError as e:  # a file system without flock
            os.close(fd)
            raise write_error(e, "run lock") from None
        previous = _read_pid(fd)
        self.stale = previous if previous and previous != str(os.getpid()) else None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # a clean exit: nothing stale for the next writer to report
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_pid(fd: int) -> str | None:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return text if text.isdigit() else None


def fsync(path: Path) -> None:
    """Flush a file's (or a directory's) contents to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Sink:
    """A file's write() that remembers the OSError it raised. torch.save swallows a failed write of the
    file object it is given (then reports a position mismatch, or nothing at all)."""

    def __init__(self, f: Any):
        self.f, self.error = f, None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()

    def __getattr__(self, name: str) -> Any:  # name, fileno, tell...: the file's
        return getattr(self.f, name)


def write_file(path: Path, write: Any, fsync: bool = False) -> None:
    """`write(sink)` into a new file, raising the OSError of any failed write with its errno and file
    ("no space left on device"). torch.save to a path reports a full disk as an inline_container.cc
    RuntimeError, and safetensors' save_file can drop the error and leave a short file: here both
    write through Python file objects."""
    with open(path, "wb") as f:
        sink = _Sink(f)
        try:
            write(sink)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        except Exception:
            if sink.error is not None:
                raise sink.error from None
            raise
        if sink.error is not None:
            raise sink.error
