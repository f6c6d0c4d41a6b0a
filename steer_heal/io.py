"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every file this project writes goes through `atomic_write`:

1. write to a temporary name in the same folder (`.<name>.<random>`), so the rename
   below stays on one file system;
2. flush and fsync the temporary file, so its bytes are on disk before its name is;
3. `os.replace` it over the target (atomic on POSIX);
4. fsync the folder, so the rename itself survives a power loss.

Without step 2 a crash after the rename can leave an empty or short file under the final
name; without step 4 the rename can be lost while a later, fsynced log line (e.g. a
checkpoint event) survives. Files get mode 0644 less the umask, whatever wrote them.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

TEMP_PREFIX = "."  # temporary names are ".<target name>.<random>"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a folder's entries (renames, new files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Create or replace `path` by calling `write(temp_path)`, then fsync and rename.

    `write` may be any writer that takes a file name (e.g. safetensors' `save_file`). On
    any exception the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644 & ~_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def remove_stale_temps(folder: str | os.PathLike, names: tuple[str, ...]) -> list[Path]:
    """Delete temporary files a killed writer left for any of `names` in `folder`."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for name in names:
        for stale in folder.glob(f"{TEMP_PREFIX}{name}.*"):
            if stale.is_file():
                stale.unlink()
                removed.append(stale)
    return removed
