"""One run per output folder: an exclusive lock file held for the run's lifetime."""

from __future__ import annotations

import atexit
import errno
import fcntl
import os
import socket
from pathlib import Path

LOCK_NAME = ".lock"


class OutputLocked(RuntimeError):
    """Another live run holds the output folder."""


class RunLock:
    """``folder/.lock`` locked with ``flock`` and holding ``"<pid> <host>"`` of the run that owns the folder.

    The kernel drops an ``flock`` when its process dies, however it dies (SIGKILL included), so a lock file
    left by a dead run is recognised (it can be locked) and taken over; a live holder keeps it. The file is
    deleted on release.
    """

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / LOCK_NAME
        self.descriptor: int | None = None
        self.previous_owner: str | None = None

    def acquire(self) -> RunLock:
        """Take the lock, or raise :class:`OutputLocked` naming the pid and host that hold it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                owner = _read(descriptor) or "unknown pid"
                os.close(descriptor)
                if error.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise OutputLocked(f"{self.path.parent} is in use by another run (pid {owner})") from None
            try:
                same_file = os.fstat(descriptor).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:  # the holder released and deleted it meanwhile
                same_file = False
            if same_file:
                break
            os.close(descriptor)
        self.previous_owner = _read(descriptor) or None
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        os.fsync(descriptor)
        self.descriptor = descriptor
        return self

    def release(self) -> None:
        """Delete the lock file and drop the lock (nothing when not held)."""
        if self.descriptor is None:
            return
        try:
            if os.fstat(self.descriptor).st_ino == os.stat(self.path).st_ino:
                self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self.descriptor)
        self.descriptor = None


def _read(descriptor: int) -> str:
    return os.pread(descriptor, 256, 0).decode(errors="replace").strip()


def hold_output_lock(folder: str | os.PathLike) -> RunLock:
    """Lock ``folder`` for the rest of this process (released at exit), saying so when a dead run's lock is
    taken over; raise :class:`OutputLocked` when a live run holds it."""
    lock = RunLock(folder).acquire()
    atexit.register(lock.release)
    if lock.previous_owner:
        print(
            f"taking over the lock of {folder} left by a run that is no longer running (pid "
            f"{lock.previous_owner})",
            flush=True,
        )
    return lock
