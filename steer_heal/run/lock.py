"""An exclusive lock on a folder for as long as one process works in it.

`FolderLock(folder)` opens `folder/.lock` and takes an advisory `fcntl.flock` on it,
without waiting: another process is refused with a `RunDirError` naming the holder's pid,
read from the file. The kernel drops a flock when its process dies, so a lock file left by
a killed run is stale by construction: the next process takes the lock and overwrites the
pid. Within one process the lock is shared (counted), so a script may reopen a run it
already holds. POSIX only (Linux, macOS).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from ..errors import RunDirError

LOCK_FILE = ".lock"

# a flock belongs to an open file, and one process should hold one per folder: this table
# maps each folder this process has locked to (fd, number of FolderLocks holding it)
_HELD: dict[Path, tuple[int, int]] = {}


class FolderLock:
    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder).resolve()
        self.path = self.folder / LOCK_FILE
        self._held = False

    @property
    def held(self) -> bool:
        return self._held

    def acquire(self) -> FolderLock:
        if self._held:
            return self
        if self.folder in _HELD:
            fd, count = _HELD[self.folder]
            _HELD[self.folder] = (fd, count + 1)
            self._held = True
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirError(
                f"{self.folder} is in use by process {holder}; wait for it to finish, or stop it, "
                "or choose another folder"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        _HELD[self.folder] = (fd, 1)
        self._held = True
        return self

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        if self.folder not in _HELD:  # forgotten: its folder was deleted by this process
            return
        fd, count = _HELD.pop(self.folder)
        if count > 1:
            _HELD[self.folder] = (fd, count - 1)
            return
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    @staticmethod
    def forget(folder: str | os.PathLike) -> None:
        """Drop this process's lock on a folder it is about to delete (every holder at once)."""
        entry = _HELD.pop(Path(folder).resolve(), None)
        if entry is not None:
            fcntl.flock(entry[0], fcntl.LOCK_UN)
            os.close(entry[0])

    def __del__(self) -> None:  # an abandoned RunDir does not keep its folder locked
        self.release()

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
