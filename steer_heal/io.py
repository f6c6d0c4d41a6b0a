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

import json
import os
import re
import shutil
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


_TEMP = re.compile(r"^\.(?P<target>.+)\.[A-Za-z0-9_]{8}$")  # what `atomic_write` names a temp file


def remove_stale_temps(root: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a killed writer left anywhere under `root`: dot-files named
    `.<existing or expected name>.<8 random characters>` as `atomic_write` makes them, and the
    `.config-*` staging folders of `Adapter.save`. Returns what was removed."""
    removed = []
    for path in sorted(Path(root).rglob(".*")):
        if path.is_file() and _TEMP.match(path.name):
            path.unlink()
            removed.append(path)
        elif path.is_dir() and path.name.startswith(".config-") and path.parent != Path(root):
            shutil.rmtree(path)
            removed.append(path)
    return removed


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its JSON header's keys sorted (tensor entries and
    `__metadata__`). safetensors writes the header from a hash map, so two saves of equal
    tensors can differ in byte order; this makes equal content equal bytes. The header keeps
    its length (padded with spaces, as the format allows) so the data offsets stay valid."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(text) > size:  # cannot happen for a reordering of the same keys; keep the original then
        return data
    return data[:8] + text + b" " * (size - len(text)) + data[8 + size :]


def save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    """Write tensors as safetensors, atomically and byte-for-byte reproducibly."""
    from safetensors.torch import save

    data = canonical_safetensors(save(tensors, metadata=metadata))
    return atomic_write_bytes(path, data)


def read_safetensors(path: str | os.PathLike, what: str) -> tuple[dict[str, str], dict]:
    """(metadata, tensors on CPU) of a safetensors file; a corrupt or truncated one is one
    `FileFormatError` line naming the file and `what` to re-save."""
    from safetensors import safe_open

    from .errors import FileFormatError

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return f.metadata() or {}, {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for truncated headers
        raise FileFormatError(f"{path} is not readable (corrupt or truncated: {exc}); re-save the {what}") from None
