"""Run directory: resolved config, an append-only event log, atomic files, resume points.

Layout of `out/<timestamp>_<model>_<reg>_s<seed>/`:

    config.toml            the resolved config
    events.jsonl           one JSON object per line, flushed and fsynced per event
    inputs.json            what the finished rounds were computed from: config.toml as the run
                           last wrote it and the axis file's SHA-256 (resume refuses a change)
    round_<r>/             vector.safetensors, adapter/ (peft format)
    trajectory.png, stages.md, report.md   rendered from events.jsonl alone

Every file is written to a temporary name in the same folder and renamed, so a killed run
leaves either the old or the new file, never half of one. A `checkpoint` event closes each
unit of work (the base evaluation is unit -1, then one per round); on resume, events after
the last checkpoint are dropped and that unit is redone from its saved inputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from ..data import axis_path
from ..errors import ConfigError, InputError, RunDirError
from ..io import RUN_FILES, atomic_write_text, is_our_temp, remove_stale_temps
from . import config as config_mod
from .config import RunConfig
from .lock import LOCK_FILE, FolderLock

__all__ = ["RunDir", "atomic_write_text", "is_run_dir", "read_events", "run_name"]


def jsonable(value: Any) -> Any:
    """NaN/inf are not JSON: write them as strings so the log stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def read_events(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Events in order; a torn last line (killed mid-write) is ignored. A missing log that was
    archived beside itself as `events.jsonl.gz` (run records under docs/runs) is read from that."""
    path = Path(path)
    archived = path.with_name(path.name + ".gz")
    if not path.exists() and not archived.exists():
        return []
    events = []
    if path.exists():
        lines = path.read_text(encoding="utf-8").splitlines()
    else:
        import gzip

        with gzip.open(archived, "rt", encoding="utf-8") as f:
            lines = f.read().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise InputError(f"{path}:{number} is not valid JSON; the event log is damaged") from None
    return events


def run_name(config: RunConfig, when: float | None = None) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(when))
    model = Path(config.run.model).name.replace("/", "-")
    return f"{stamp}_{model}_{config.heal.reg}_s{config.run.seed}"


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


INPUTS = "inputs.json"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_inputs(path: Path, config: RunConfig) -> None:
    """Record what finished rounds are computed from: the config text and the axis file's hash."""
    record = {
        "config_toml": config_mod.to_toml(config),
        "axis": str(config.run.axis),
        "axis_sha256": _sha256(axis_path(config.run.axis).read_bytes()),
    }
    atomic_write_text(path / INPUTS, json.dumps(record, indent=2, sort_keys=True) + "\n")


def check_inputs(path: Path, saved: RunConfig) -> None:
    """Refuse a run whose config.toml was edited by hand, or whose axis file changed, since the
    run last wrote them: its finished rounds were computed from the old ones. Runs made before
    the record existed are not checked."""
    record_file = path / INPUTS
    if not record_file.is_file():
        return
    try:
        record = json.loads(record_file.read_text(encoding="utf-8"))
        recorded = config_mod.from_toml_text(record["config_toml"], str(record_file))
    except (ValueError, KeyError, TypeError) as exc:
        raise RunDirError(f"{record_file} is damaged ({exc}); the run cannot prove what its rounds used") from None
    if recorded != saved:
        changes = "; ".join(config_mod.diff(recorded, saved))
        raise ConfigError(
            f"{path / 'config.toml'} was edited since the run wrote it ({changes}): finished rounds used the old "
            "values; put them back, or start a new run (resume options change rounds, coherence floor and drift bounds)"
        )
    try:
        now = _sha256(axis_path(saved.run.axis).read_bytes())
    except (ValueError, OSError) as exc:
        raise ConfigError(f"the run's axis {saved.run.axis} cannot be read ({exc}); restore it to resume") from None
    if now != record.get("axis_sha256"):
        raise ConfigError(
            f"the axis file {axis_path(saved.run.axis)} changed since {path} started (its SHA-256 differs): finished "
            "rounds used the old prompts and answers; restore it, or start a new run"
        )


def _only_leftovers(path: Path) -> bool:
    """A folder with nothing but what a failed creation of ours leaves: the lock, the inputs
    record, and temp files named as `atomic_write` names them."""
    return all(
        not e.is_symlink() and e.is_file() and (e.name in (LOCK_FILE, INPUTS) or is_our_temp(e.name))
        for e in path.iterdir()
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
        self._sinks: list = []

    def add_sink(self, sink) -> None:
        """Also send every event, once it is on disk, to `sink(record)` (an experiment tracker:
        `steer_heal.run.sinks`). A sink that raises is dropped with one warning; the run goes on."""
        if not callable(sink):
            raise InputError(f"a sink is a callable taking one event dict, got {type(sink).__name__}")
        self._sinks.append(sink)

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
        directory replaced. A folder that is not a run directory is never deleted.

        The folder's lock is taken before anything in it is deleted or written, so a second
        `--overwrite` of the same folder is refused, not interleaved. Creation is all or
        nothing: if writing fails (a full disk), what this call wrote goes again, and a
        folder that holds only our own leftovers (the lock, temp files) is reused."""
        path = Path(path)
        replace_old = cls.check_target(path, overwrite)
        made = not path.exists()
        path.mkdir(parents=True, exist_ok=True)
        try:
            lock = FolderLock(path).acquire()
        except BaseException:
            if made:
                shutil.rmtree(path, ignore_errors=True)
            raise
        try:
            if replace_old:
                _refuse_to_delete(path)  # again, under the lock: it may have changed since the check
            for entry in path.iterdir():  # an old run, or our own leftovers; never the lock we hold
                if entry.name == LOCK_FILE:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            write_inputs(path, config)
            atomic_write_text(path / "config.toml", config_mod.to_toml(config))
            atomic_write_text(path / "events.jsonl", "")  # last: with it the folder is a run directory
        except BaseException:
            for name in ("events.jsonl", "config.toml", INPUTS):
                (path / name).unlink(missing_ok=True)
            lock.release()
            if made:
                shutil.rmtree(path, ignore_errors=True)
            raise
        return cls(path, config, lock)

    @staticmethod
    def check_target(path: str | os.PathLike, overwrite: bool = False) -> bool:
        """Whether `create` would have to delete a run directory at `path` first; raises if it may
        not (a link, a folder of something else, the current folder, a live run, or no
        `overwrite`). A folder holding only our own leftovers (a lock, temp files of a creation
        that failed) counts as empty. Writes nothing."""
        path = Path(path)
        if path.is_symlink():
            raise RunDirError(f"{path} is a link (-> {os.readlink(path)}); give the real folder as --out")
        if path.exists() and not path.is_dir():
            raise RunDirError(f"{path} exists and is not a folder; choose another --out")
        if not path.exists() or _only_leftovers(path):
            if path.exists():
                with FolderLock(path):  # a live creation holds it
                    pass
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
        check_inputs(path, saved)
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
        done = [e["round"] for e in read_events(path / "events.jsonl") if e["event"] == "checkpoint"]
        finished = max(done, default=-1) + 1  # rounds finished (the base evaluation is unit -1)
        if overrides and "rounds" in overrides.get("run", {}) and wanted.run.rounds < finished:
            raise ConfigError(
                f"{path} has finished {finished} round(s); --rounds {wanted.run.rounds} would run nothing and undo "
                f"nothing: ask for more than {finished}, or leave --rounds out"
            )
        if not write:
            return cls(path, wanted)
        lock = FolderLock(path).acquire()
        try:
            if wanted != saved:
                write_inputs(path, wanted)
                atomic_write_text(path / "config.toml", config_mod.to_toml(wanted))
            run = cls(path, wanted, lock)
            remove_stale_temps(run.written_folders())  # only where we write, only names we give
            run._drop_unfinished()
        except BaseException:
            lock.release()
            raise
        return run

    # ------------------------------------------------------------ events

    def log(self, event: str, round: int, **payload: Any) -> dict[str, Any]:
        if not self.writable:
            raise RunDirError(f"{self.path} was opened read-only (a dry run) or closed; nothing is logged")
        record = {"event": event, "round": round, "time": time.time(), **jsonable(payload)}
        with open(self.events_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        for sink in list(self._sinks):
            try:
                sink(record)
            except Exception as exc:  # a tracker's failure must not end the run
                self._sinks.remove(sink)
                logging.getLogger("steer_heal").warning("event sink %r failed (%s); it gets no more events", sink, exc)
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

    def written_folders(self) -> list[Path]:
        """The folders this project writes in a run: the run itself, `round_<r>/` and their
        `adapter/` (a user's own subfolder, or a link, is not among them)."""
        rounds = [p for p in self.path.iterdir() if re.fullmatch(r"round_\d+", p.name) and not p.is_symlink()]
        return [self.path, *sorted(rounds), *sorted(p / "adapter" for p in rounds)]

    def round_dir(self, round: int) -> Path:
        return self.path / f"round_{round}"

    def save_round(self, round: int, vector: Any, history: Any) -> None:
        """Round r's vector and adapter into `round_<r>/` (a `SteeringVector`, a `History`)."""
        out = self.round_dir(round)
        vector.save(out / "vector.safetensors")
        history.save_round(round, out / "adapter")
