"""One daemon per state folder: an exclusive ``flock`` on ``<state>/daemon.lock``, and start-up checks
of the folders the daemon writes in.

The lock is taken before the journal's recovery touches anything: a second daemon on the same folder
would otherwise requeue the first one's running job and delete its temporary files. The kernel drops
the lock when the process ends, however it ends (kill -9 included), so a stale lock file is harmless;
the file holds the holder's PID for the message the next one prints.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path

from .errors import ConfigError

LOCK_NAME = "daemon.lock"


class StateLock:
    """``with StateLock(folder):`` holds the folder's lock, or raises ConfigError naming the holder."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> StateLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(f"daemon.state_dir: {self.path.parent} is in use by another edge-imagegen daemon "
                              f"(PID {holder}); stop it, or give this one another daemon.state_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        # the file stays: unlinking it would let a third daemon lock a new file while a second one
        # still waits on the old
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> StateLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def writable_dir(path: Path, key: str) -> Path:
    """Create ``path`` if it is missing and check that files can be made in it; otherwise raise a
    one-line ConfigError naming the folder and the config key that sets it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot create the folder {path} ({exc.strerror})") from None
    if not path.is_dir():
        raise ConfigError(f"{key}: {path} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:  # read-only (EROFS), no permission (EACCES), ...
        raise ConfigError(f"{key}: cannot write in the folder {path} ({exc.strerror})") from None
    return path
