"""One writer per folder: a lock file that a training run holds on its run folder and a sampling command on its
output, so that two commands never prune or overwrite each other's files.

The lock is the kernel's (`flock` on the lock file), so it ends with the process that holds it, however it ends: the
file a killed process leaves never blocks anyone. The file records who holds it (pid, host, command, since when),
for the error of the command that finds it held, and is removed when its holder ends normally. On a file system without locks (some cluster file systems), the
command says so once and goes on unlocked.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from accelerate import Accelerator

from sprint_mm.parallelize import agreed

# errnos of a file system that does not implement flock
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class FolderLocked(ValueError):
    """Another live process holds the lock of a folder this command would write."""


def holder_description(path: Path) -> str:
    """Who holds a lock, as its file records it."""
    try:
        holder = json.loads(path.read_text())
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["since"]))
        return f"pid {holder['pid']} on {holder['host']} since {since}: {holder['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its name yet"


class FolderLock:
    """The lock file `path`; `what` names the folder in errors (e.g. "run folder runs/x")."""

    def __init__(self, path: Path, what: str) -> None:
        self.path, self.what = Path(path), what
        self._fd: Optional[int] = None

    def acquire(self, say: Callable[[str], None] = print) -> None:
        """Hold the lock, or raise FolderLocked naming the process that holds it."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise FolderLocked(self.locked_message()) from None
            except OSError as err:
                if err.errno not in NO_LOCKS:
                    os.close(fd)
                    raise
                say(f"the file system of {self.path.parent} has no file locks ({err.strerror}); nothing stops another "
                    f"command from writing {self.what} at the same time")
            if self._still_the_file(fd):
                break
            os.close(fd)  # the holder removed the file as we opened it: lock the one that is there now
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                                 "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])}).encode())
        self._fd = fd

    def locked_message(self) -> str:
        return (f"{self.what} is in use by another command ({holder_description(self.path)}); wait for it to end or "
                f"use another folder (the lock, {self.path}, ends with that process)")

    def _still_the_file(self, fd: int) -> bool:
        """Whether the locked descriptor is still the file at `path` (not one a releasing holder just removed)."""
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        """Remove the lock file and let go of the lock (in this order: whoever locks the removed file next sees that
        it is gone and locks the new one)."""
        if self._fd is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def lock_for_all(accelerator: Accelerator, path: Path, what: str, say: Callable[[str], None] = print) -> FolderLock:
    """The main process takes the lock; every process learns whether it got it, and all raise the same FolderLocked
    when it did not. Returns the lock (held by the main process only)."""
    lock = FolderLock(path, what)
    error: Optional[Exception] = None
    if accelerator.is_main_process:
        try:
            lock.acquire(say)
        except (FolderLocked, OSError) as err:
            error = err
    (refused,) = agreed(accelerator, error is not None)
    if error is not None:
        raise error
    if refused:
        raise FolderLocked(lock.locked_message())
    return lock
