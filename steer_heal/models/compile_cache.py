"""torch.compile's artefacts kept under the steer-heal cache folder, so that a second process
on the same machine loads the compiled decoding graphs instead of compiling them again.

torch caches what inductor makes (FX graphs, AOT-autograd graphs, Triton kernels) on disk by
itself, in /tmp/torchinductor_<user>: a folder that many machines clear at boot and that a
container loses with its /tmp. `use_compile_cache()` points those caches at

    <steer-heal cache>/compile/torch-<version>_triton-<version>_<device>/

(`models.loading.cache_dir()`, `STEER_HEAL_CACHE` moves it) before the first compile of the
process, unless the user chose a folder with TORCHINDUCTOR_CACHE_DIR (then theirs is used as
it is; torch's own default in that variable does not count as a choice). Inductor keys every entry by the graph it compiled: the model's shapes, the
dtype, the bucketed prompt width and batch size, the code and torch's own version, so one
folder serves every model and bucket; the folder's name adds torch, Triton and the device, so
another torch or GPU never reads this folder's entries (it gets a folder of its own; the old
one stays where it is).

Integrity: when the process ends, every file's SHA-256 goes into the folder's manifest
(written atomically). At the next start a file that no longer matches it (a disk error,
garbage written into the cache) means the folder cannot be trusted: one warning, the folder
is emptied and rebuilt by the next compile. A folder without our marker file is not ours: it
is neither used nor deleted (the cache goes to a sibling folder). The entries are torch's own
pickles, as in its default /tmp folder; steer-heal never unpickles them itself, and it
creates the folder readable by its owner alone.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import re
import shutil
import warnings
from pathlib import Path

import torch

from ..io import atomic_write_text
from .loading import cache_dir

__all__ = ["compile_cache_folder", "use_compile_cache"]

MARKER = "steer-heal-compile-cache"  # a file naming the folder ours
MANIFEST = "steer-heal-manifest.json"
_IN_USE: Path | None = None
log = logging.getLogger("steer_heal")


def _device_tag() -> str:
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        major, minor = torch.cuda.get_device_capability()
        return f"cuda-{name}-sm{major}{minor}"
    return "cpu"


def compile_cache_folder() -> Path:
    """This process's folder: keyed by torch, Triton and the device."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    tag = f"torch-{torch.__version__}_triton-{triton_version}_{_device_tag()}"
    return cache_dir() / "compile" / re.sub(r"[^A-Za-z0-9._+-]+", "-", tag)


def _files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and not p.is_symlink() and p.name not in (MARKER, MANIFEST)
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _damaged(folder: Path) -> list[str]:
    """Files the last manifest lists whose bytes have changed since (or an unreadable manifest)."""
    manifest = folder / MANIFEST
    if not manifest.exists():
        return []
    try:
        listed = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        assert isinstance(listed, dict)
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        return [MANIFEST]
    bad = []
    for name, digest in listed.items():
        path = folder / name
        if path.is_file() and not path.is_symlink():
            try:
                if _sha256(path) != digest:
                    bad.append(name)
            except OSError:
                bad.append(name)
    return bad


def _write_manifest(folder: Path) -> None:
    try:
        files = {str(p.relative_to(folder)): _sha256(p) for p in _files(folder)}
        atomic_write_text(folder / MANIFEST, json.dumps({"torch": torch.__version__, "files": files}, indent=0))
    except OSError as exc:  # a full disk at exit: the next start just cannot verify
        log.warning("could not record the compile cache's manifest in %s (%s)", folder, exc)


def _ours(folder: Path) -> bool:
    return folder.is_dir() and not folder.is_symlink() and (folder / MARKER).is_file()


def _fresh(folder: Path) -> Path:
    """`folder`, created and marked as ours; or, if someone else's folder has that name, a sibling."""
    candidate, n = folder, 1
    while candidate.exists() and not _ours(candidate):
        candidate, n = folder.with_name(f"{folder.name}.{n}"), n + 1
    if not candidate.exists():
        candidate.mkdir(parents=True, mode=0o700)
        (candidate / MARKER).write_text("made by steer-heal: torch.compile's caches for this torch and device\n")
    return candidate


def _users_choice() -> bool:
    """Whether TORCHINDUCTOR_CACHE_DIR names a folder the user chose: torch writes its own
    default (/tmp/torchinductor_<user>) into the variable the first time it asks for it."""
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not chosen:
        return False
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    return os.path.abspath(chosen) != os.path.abspath(default_cache_dir())


def use_compile_cache() -> Path | None:
    """Point torch's compile caches at the steer-heal folder (once per process; the folder in
    use, or None when the user's TORCHINDUCTOR_CACHE_DIR is in charge)."""
    global _IN_USE
    if _IN_USE is not None:
        return _IN_USE
    if _users_choice():
        return None
    folder = _fresh(compile_cache_folder())
    bad = _damaged(folder)
    if bad:
        warnings.warn(
            f"the compile cache {folder} is damaged ({len(bad)} file(s) changed since it was written, e.g. "
            f"{bad[0]}); it is emptied and rebuilt by this run's first compile",
            RuntimeWarning,
            stacklevel=2,
        )
        shutil.rmtree(folder)  # ours (marker checked, not a link); rmtree does not follow links inside
        folder = _fresh(folder)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    os.environ.setdefault("TRITON_CACHE_DIR", str(folder / "triton"))
    atexit.register(_write_manifest, folder)
    _IN_USE = folder
    log.debug("torch.compile caches in %s", folder)
    return folder
