"""The compile cache (`steer_heal.models.compile_cache`): a second process loads the compiled
graphs; garbage in the cache costs one warning and a rebuild, never a crash or another
output; a folder that is not ours, or another torch's, is left alone.

Inductor compiles on the CPU too (C++ kernels), so this runs in CI: each cold compile of the
tiny model takes tens of seconds on two cores, hence `slow`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tolerance import assert_close_rounding

from steer_heal.models import compile_cache

ROOT = Path(__file__).resolve().parents[1]


def compile_once(cache: Path, **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHINDUCTOR_", "TRITON_"))}
    environ.update(STEER_HEAL_CACHE=str(cache), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **env)
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "helpers" / "compile_once.py")],
        env=environ,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_second_process_loads_the_graphs_and_garbage_is_rebuilt_with_one_warning(tmp_path):
    cold = compile_once(tmp_path)
    folder = Path(cold["folder"])
    assert folder.is_relative_to(tmp_path / "compile") and torch.__version__ in folder.name
    assert cold["misses"] >= 1 and cold["hits"] == 0 and not cold["warnings"]
    assert (folder / compile_cache.MANIFEST).is_file() and (folder / compile_cache.MARKER).is_file()
    assert oct(folder.stat().st_mode & 0o777) == oct(0o700)
    # compiled == eager in fp32 up to reordered sums
    assert_close_rounding(cold["compiled"], cold["eager"])

    warm = compile_once(tmp_path)
    assert warm["folder"] == cold["folder"] and warm["hits"] >= 1 and warm["misses"] == 0
    assert warm["compiled"] == cold["compiled"]  # the same kernels, loaded

    entries = [
        p for p in folder.rglob("*") if p.is_file() and p.name not in (compile_cache.MARKER, compile_cache.MANIFEST)
    ]
    for path in entries:
        path.write_bytes(b"garbage, not a cache entry\n")
    rebuilt = compile_once(tmp_path)
    assert len(rebuilt["warnings"]) == 1 and "is damaged" in rebuilt["warnings"][0], rebuilt["warnings"]
    assert rebuilt["misses"] >= 1 and rebuilt["hits"] == 0
    assert_close_rounding(rebuilt["compiled"], cold["eager"])
    assert not any(p.read_bytes() == b"garbage, not a cache entry\n" for p in folder.rglob("*") if p.is_file())


def test_a_folder_that_is_not_ours_is_neither_used_nor_deleted(tmp_path, monkeypatch):
    monkeypatch.setenv("STEER_HEAL_CACHE", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setattr(compile_cache, "_IN_USE", None)
    monkeypatch.setattr(compile_cache.atexit, "register", lambda *a: None)
    theirs = compile_cache.compile_cache_folder()
    theirs.mkdir(parents=True)
    (theirs / "notes.txt").write_text("someone else's\n")
    try:
        folder = compile_cache.use_compile_cache()
        assert folder == theirs.with_name(theirs.name + ".1") and (folder / compile_cache.MARKER).is_file()
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(folder)
    finally:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        os.environ.pop("TRITON_CACHE_DIR", None)
    assert (theirs / "notes.txt").read_text() == "someone else's\n"


def test_another_torch_gets_another_folder_and_the_users_choice_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("STEER_HEAL_CACHE", str(tmp_path))
    mine = compile_cache.compile_cache_folder()
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    other = compile_cache.compile_cache_folder()
    assert other != mine and other.parent == mine.parent and "torch-9.9.9" in other.name
    monkeypatch.setattr(compile_cache, "_IN_USE", None)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "users"))
    assert compile_cache.use_compile_cache() is None  # the user's folder is in charge
    assert not (tmp_path / "compile").exists()


def test_a_damaged_manifest_or_file_is_found(tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "a").write_bytes(b"one")
    compile_cache._write_manifest(folder)
    assert compile_cache._damaged(folder) == []
    (folder / "a").write_bytes(b"two")
    assert compile_cache._damaged(folder) == ["a"]
    (folder / "a").unlink()
    assert compile_cache._damaged(folder) == []  # gone is not damaged: torch recompiles what is missing
    (folder / compile_cache.MANIFEST).write_text("{not json")
    assert compile_cache._damaged(folder) == [compile_cache.MANIFEST]
