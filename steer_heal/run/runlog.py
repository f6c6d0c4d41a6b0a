"""Run directory: resolved config, an append-only event log, atomic files, resume points.

Layout of `out/<timestamp>_<model>_<reg>_s<seed>/`:

    config.toml            the resolved config
    events.jsonl           one JSON object per line, flushed and fsynced per event
    round_<r>/             vector.safetensors, adapter/ (peft format)
    trajectory.png, stages.md, report.md   rendered from events.jsonl alone

Every file is written to a temporary name in the same folder and renamed, so a killed run
leaves either the old or the new file, never half of one. A `checkpoint` event closes each
unit of work (the base evaluation is unit -1, then one per round); on resume, events after
the last checkpoint are dropped and that unit is redone from its saved inputs.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError, RunDirError
from ..io import atomic_write_text, remove_stale_temps
from . import config as config_mod
from .config import RunConfig
from .lock import FolderLock

__all__ = ["RunDir", "atomic_write_text", "is_run_dir", "read_events", "run_name"]


def _jsonable(value: Any) -> Any:
    """NaN/inf are not JSON: write them as strings so the log stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def read_events(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Events in order; a torn last line (killed mid-write) is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    events = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number} is not valid JSON; the event log is damaged") from None
    return events


def run_name(config: RunConfig, when: float | None = None) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(when))
    model = Path(config.run.model).name.replace("/", "-")
    return f"{stamp}_{model}_{config.heal.reg}_s{config.run.seed}"


RUN_FILES = ("config.toml", "events.jsonl")  # both present: a folder this project made


def is_run_dir(path: str | os.PathLike) -> bool:
    """A folder written by `RunDir.create`: our config.toml (it parses) and events.jsonl."""
    path = Path(path)
    if not all((path / name).is_file() for name in RUN_FILES):
        return False
    try:
        config_mod.load(path / "config.toml")
    except (ValueError, OSError):
        return False
    return True


def _refuse_to_delete(path: Path) -> None:
    """Raise unless `path` is a run directory that may go (not ours, the cwd or a parent: refused)."""
    resolved, here = path.resolve(), Path.cwd().resolve()
    if resolved == here or resolved in here.parents:
        raise RunDirError(f"refusing to delete {path}: it holds the current folder; choose another --out")
    if not is_run_dir(path):
        raise RunDirError(
            f"refusing to delete {path}: it is not a steer-heal run directory (no config.toml and events.jsonl "
            "of ours); choose another --out"
        )


class RunDir:
    """An open run directory. Create with `RunDir.create` or `RunDir.resume`.

    A writable RunDir holds an exclusive lock on its folder (`steer_heal.run.lock`) until
    `close()` (or the end of a `with` block, or the process): a second writer is refused
    with the holder's pid.
    """

    def __init__(self, path: Path, config: RunConfig, lock: FolderLock | None = None):
        self.path = path
        self.config = config
        self.events_path = path / "events.jsonl"
        self._lock = lock

    @property
    def writable(self) -> bool:
        return self._lock is not None and self._lock.held

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @classmethod
    def create(cls, path: str | os.PathLike, config: RunConfig, overwrite: bool = False) -> RunDir:
        """A new run directory at `path` (created), or, with `overwrite`, an old run
        directory replaced. A folder that is not a run directory is never deleted."""
        path = Path(path)
        if cls.check_target(path, overwrite):
            FolderLock.forget(path)  # an old RunDir of this process on it stops holding it
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        lock = FolderLock(path).acquire()
        try:
            atomic_write_text(path / "config.toml", config_mod.to_toml(config))
            atomic_write_text(path / "events.jsonl", "")
        except BaseException:
            lock.release()
            raise
        return cls(path, config, lock)

    @staticmethod
    def check_target(path: str | os.PathLike, overwrite: bool = False) -> bool:
        """Whether `create` would have to delete `path` first; raises if it may not (a folder
        of something else, the current folder, a live run, or no `overwrite`). Writes nothing."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise RunDirError(f"{path} exists and is not a folder; choose another --out")
        if not (path.exists() and any(path.iterdir())):
            return False
        if not overwrite:
            raise RunDirError(
                f"output directory {path} exists; pass --resume {path} to continue it or --overwrite to replace it"
            )
        _refuse_to_delete(path)
        with FolderLock(path):  # a live run holds it: refused with its pid
            pass
        return True

    @classmethod
    def resume(
        cls,
        path: str | os.PathLike,
        config: RunConfig | None = None,
        overrides: dict[str, dict[str, Any]] | None = None,
        write: bool = True,
    ) -> RunDir:
        """Reopen a run. `config`, if given, must equal the saved one. `overrides` change keys
        of the saved config that do not alter finished rounds (`config.RESUMABLE`: more
        rounds, another coherence floor); the new config replaces config.toml.

        With `write=False` (a dry run) nothing on disk changes and no lock is taken: the
        returned RunDir carries the config the resumed run would use and cannot log.
        """
        path = Path(path)
        if not (path / "config.toml").exists():
            raise RunDirError(f"{path} is not a run directory (no config.toml)")
        saved = config_mod.load(path / "config.toml")
        if config is not None and config != saved:
            changes = "; ".join(config_mod.diff(saved, config))
            raise ConfigError(
                f"cannot resume {path} with a different config ({changes}); drop the options or start a new run"
            )
        wanted = saved
        if overrides:
            wanted = config_mod.override(saved, overrides, "resume options")
            fixed = [c for c in config_mod.diff(saved, wanted) if c.split(":", 1)[0] not in config_mod.RESUMABLE]
            if fixed:
                raise ConfigError(
                    f"cannot resume {path} with {'; '.join(fixed)}: finished rounds depend on it; only "
                    f"{', '.join(config_mod.RESUMABLE)} may change (start a new run for the rest)"
                )
        if not write:
            return cls(path, wanted)
        lock = FolderLock(path).acquire()
        try:
            if wanted != saved:
                atomic_write_text(path / "config.toml", config_mod.to_toml(wanted))
            run = cls(path, wanted, lock)
            remove_stale_temps(path)
            run._drop_unfinished()
        except BaseException:
            lock.release()
            raise
        return run

    # ------------------------------------------------------------ events

    def log(self, event: str, round: int, **payload: Any) -> dict[str, Any]:
        if not self.writable:
            raise RunDirError(f"{self.path} was opened read-only (a dry run) or closed; nothing is logged")
        record = {"event": event, "round": round, "time": time.time(), **_jsonable(payload)}
        with open(self.events_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return record

    def events(self) -> list[dict[str, Any]]:
        return read_events(self.events_path)

    def checkpoint(self, round: int) -> None:
        self.log("checkpoint", round)

    def last_checkpoint(self) -> int | None:
        """The last finished unit: -1 for the base evaluation, r for round r, None for none."""
        done = [e["round"] for e in self.events() if e["event"] == "checkpoint"]
        return max(done) if done else None

    def _drop_unfinished(self) -> None:
        events = self.events()
        last = max((i for i, e in enumerate(events) if e["event"] == "checkpoint"), default=-1)
        kept = events[: last + 1]
        if len(kept) != len(events) or self.events_path.exists():
            text = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in kept)
            atomic_write_text(self.events_path, text)

    # ------------------------------------------------------------ files

    def round_dir(self, round: int) -> Path:
        return self.path / f"round_{round}"
