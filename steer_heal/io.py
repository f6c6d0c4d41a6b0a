"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every file this project writes goes through `atomic_write`:

1. write to a temporary name in the same folder (`.<name>.steer-heal-tmp-<random>`), so
   the rename below stays on one file system (the marker lets a later cleanup prove the
   file is ours: a user's `.report.md.previous` is never taken for one);
2. flush and fsync the temporary file, so its bytes are on disk before its name is;
3. `os.replace` it over the target (atomic on POSIX);
4. fsync the folder, so the rename itself survives a power loss.

Without step 2 a crash after the rename can leave an empty or short file under the final
name; without step 4 the rename can be lost while a later, fsynced log line (e.g. a
checkpoint event) survives. Files get mode 0644 less the umask, whatever wrote them, and
folders made through `temp_dir` 0755 less the umask (not `mkdtemp`'s 0700).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

TEMP_PREFIX = "."  # temporary names are ".<target name>.steer-heal-tmp-<random>"
TEMP_MARK = "steer-heal-tmp-"


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
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.{TEMP_MARK}", dir=path.parent)
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


def temp_dir(parent: str | os.PathLike, kind: str, name: str = "") -> Path:
    """A new staging folder `.<name>.steer-heal-<kind>-<random>` in `parent`, mode 0755 less the
    umask (a folder renamed into place keeps the mode it was made with)."""
    folder = Path(tempfile.mkdtemp(prefix=f".{name + '.' if name else ''}steer-heal-{kind}-", dir=parent))
    os.chmod(folder, 0o755 & ~_umask())
    return folder


def normal_modes(root: str | os.PathLike) -> None:
    """Give every file under `root` 0644 and every folder 0755, less the umask (links untouched)."""
    mask = _umask()
    for folder, _dirs, files in os.walk(root):
        os.chmod(folder, 0o755 & ~mask)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, 0o644 & ~mask)


_RANDOM = r"[A-Za-z0-9_]{8}"  # what tempfile appends
_TEMP = re.compile(rf"^\..+\.{TEMP_MARK}{_RANDOM}$")  # what `atomic_write` names a temp file
_STAGING = re.compile(rf"^\.(.+\.)?steer-heal-[a-z]+-{_RANDOM}$")  # what `temp_dir` names a folder


def is_our_temp(name: str) -> bool:
    """Whether a file name is one `atomic_write` gives its temp files."""
    return bool(_TEMP.match(name))


def remove_stale_temps(folders: list[Path]) -> list[Path]:
    """Delete what a killed writer of ours left directly in `folders` (not below them): files
    named as `atomic_write` names its temp files and folders named as `temp_dir` names its
    staging folders, both carrying the `steer-heal-` mark. Nothing else is touched, and no
    link is followed. Returns what was removed."""
    removed = []
    for folder in folders:
        if folder.is_symlink() or not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.is_symlink():
                continue
            if path.is_file() and _TEMP.match(path.name):
                path.unlink()
                removed.append(path)
            elif path.is_dir() and _STAGING.match(path.name):
                shutil.rmtree(path)
                removed.append(path)
    return removed


RUN_FILES = ("config.toml", "events.jsonl")  # both present: a run directory (steer_heal.run.runlog)


def run_dir_holding(path: str | os.PathLike) -> Path | None:
    """The run directory `path` is in (or is), if any: the nearest folder with both RUN_FILES."""
    target = Path(path).resolve()
    return next((f for f in (target, *target.parents) if all((f / n).is_file() for n in RUN_FILES)), None)


def check_output(path: str | os.PathLike, inputs: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Refuse (one `InputError` line) an output path that is a link, that is or holds one of
    the command's `inputs`, or that lies inside a run directory (its files are the run's:
    replacing `round_N/vector.safetensors` breaks resume). For every export and every file a
    command writes at a path the user gave, before any slow work. Writes nothing."""
    from .errors import InputError

    path = Path(path)
    if path.is_symlink():
        raise InputError(f"refusing to write through the link {path} (-> {os.readlink(path)}); give the real path")
    target = path.resolve()
    for given in inputs:
        source = Path(given).resolve()
        if target == source or target in source.parents:
            raise InputError(f"refusing to write {path}: it would replace the input {given}; choose another output")
        if source.exists() and target.exists() and os.path.samefile(source, target):
            raise InputError(f"refusing to write {path}: it is the input {given} (a hard link); choose another output")
    run = run_dir_holding(path)
    if run is not None:
        raise InputError(
            f"refusing to write {path}: it is inside the run directory {run}, whose files the run owns; "
            "choose an output outside it"
        )
    return path


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
