"""Data-parallel runs: the same `steer-heal run` in every process of a launcher.

    torchrun --nproc-per-node 4 -m runners run --preset full --axis love
    accelerate launch --multi_gpu --num_processes 4 -m runners run --preset full --axis love

Both launchers start N copies (accelerate through torchrun; its `--cpu` starts one process
unless MPI is set up, so on CPUs use torchrun) of the command with RANK, WORLD_SIZE, LOCAL_RANK and a
rendezvous address in the environment; `launch()` reads them and joins the process group
(NCCL for CUDA tensors and gloo for CPU ones, or gloo alone without CUDA). Outside a
launcher it returns None and nothing here runs.

What is split. Every batch of every stage goes through `steer_heal.shards.map_batches`;
under a launch, rank k computes batches k, k + N, k + 2N, ... and the results are gathered
over a gloo group in batch order, so each batch is formed, seeded and computed as in one
process and every rank holds the whole result. Loops that stop early ask for a wave of N
batches and keep the prefix one process would have made (a collection), or decode the next
probes of both outcomes at once and take the one the walk takes (the dose walk). The heal
splits each optimiser step's micro-batches (`heal.grad_accum` of them) over the ranks; each
micro-batch's gradients are broadcast by the rank that computed them and every rank adds them
up in micro-batch order, as one process does. So the kept set, the dose decisions, every
metric and the adapter equal the single-process run's bit for bit on CPUs with the same
thread count (tests/test_parallel.py); on GPUs, as far as one process's run repeats itself
on that GPU (cuBLAS and attention kernels are deterministic for fixed shapes; a few backward
kernels use atomics). Broadcasting per micro-batch moves grad_accum x the adapter's size per step
where an all-reduce would move about twice it: the price of an order-independent sum is
small for a LoRA and buys a run whose result does not depend on how many GPUs it had.

What is not split: loading the model (each rank holds a replica on its own GPU), the few
small reductions after a stage (a vector's mean, a metric's bootstrap, the register-shift
classifier), and a heal with one micro-batch per step: for an N-way heal set heal.grad_accum
to a multiple of N (with heal.batch_size B/N the optimiser sees the same B rows a step; that
is another run than batch_size B with grad_accum 1, whose loss is one token mean over B rows).

Who writes. Rank 0 alone opens the run directory (lock, config, events, checkpoints,
adapters, report); the other ranks keep the same events in memory (`Follower`), since they
compute the same results, and read the finished rounds' files on resume (the run directory
must be on a filesystem every rank sees: always so on one machine).

Failures. An exception inside a batch on one rank is raised on every rank: the same type
when it is one of the library's errors (rebuilt from its message), else `RankFailed` naming
the rank and the error's line. A rank that dies
(`kill -9`) breaks the next collective; the others raise `RankFailed` with one line naming
the dead rank and its pid (found through /proc when it ran on the same machine), and the run
continues from its last checkpoint with `--resume`, under the launcher or in one process.

Trust: results travel between the ranks pickled (torch.distributed's object collectives).
The ranks are processes of this one launch, started by the user; no file is ever unpickled.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from .. import errors
from ..errors import ConfigError, RankFailed
from .config import RunConfig
from .runlog import RunDir, jsonable

T = TypeVar("T")
log = logging.getLogger("steer_heal")

__all__ = ["Follower", "Launch", "env_rank", "launch", "local_config", "lost_ranks", "on_writer", "open_run"]

_ACTIVE: Launch | None = None  # the launch this process joined (for `lost_ranks` after a signal)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _alive(host: str, pid: int) -> bool | None:
    """Whether process `pid` on `host` still runs (a zombie does not); None off this machine."""
    if host != socket.gethostname():
        return None
    stat = Path(f"/proc/{pid}/stat")
    if stat.parent.parent.exists():  # Linux: read the state letter after the command name
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except (OSError, IndexError):
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Launch:
    """This process's place in a launch: its rank among `world` processes."""

    rank: int
    world: int
    local_rank: int
    objects: Any  # a gloo process group for gathering Python objects
    peers: list[tuple[str, int]]  # (host, pid) of every rank
    run_path: str = "<run dir>"  # the run directory, once open (for the line after a lost rank)

    @property
    def writer(self) -> bool:
        return self.rank == 0

    @property
    def width(self) -> int:  # `steer_heal.shards.Sharder`
        return self.world

    # ------------------------------------------------------------ steer_heal.shards.Sharder

    def share(self, n: int) -> list[int]:
        return list(range(self.rank, n, self.world))

    def map(self, fn: Callable[[int], T], n: int) -> list[T]:
        mine: dict[int, T] = {}
        failed: Exception | None = None
        for b in self.share(n):
            try:
                mine[b] = fn(b)
            except Exception as exc:  # sent to every rank, so none waits for the others forever
                failed = exc
                break
        parts = self.gather((mine, None if failed is None else _portable(failed)))
        for rank, (_, error) in enumerate(parts):
            if error is not None:
                if failed is not None:
                    raise failed
                raise _rebuilt(error, rank)  # the library's error one process would have raised
        return [parts[b % self.world][0][b] for b in range(n)]

    def send(self, b: int, tensors: Sequence[Tensor]) -> None:
        groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
        for t in tensors:
            groups.setdefault((t.dtype, t.device), []).append(t)
        for parts in groups.values():  # one collective per dtype and device
            flat = torch.cat([t.reshape(-1) for t in parts])
            self._collective(dist.broadcast, flat, src=b % self.world)
            offset = 0
            for t in parts:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()

    # ------------------------------------------------------------ objects

    def gather(self, value: Any) -> list[Any]:
        """`value` from every rank, in rank order."""
        out: list[Any] = [None] * self.world
        self._collective(dist.all_gather_object, out, value, group=self.objects)
        return out

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` on every rank."""
        box = [value]
        self._collective(dist.broadcast_object_list, box, src=0, group=self.objects)
        return box[0]

    def _collective(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RuntimeError as exc:  # gloo / NCCL: a peer closed its connection or timed out
            raise RankFailed(
                lost_ranks(self) or f"a collective with the other ranks failed ({_first_line(exc)})"
            ) from None


def _portable(exc: Exception) -> tuple[str | None, str]:
    """What travels of an exception: the name of the library's error type, when it is one (so
    every rank raises the same type, rebuilt from the message by `_rebuilt`), and its line.
    Never the exception object: a peer's bytes are not unpickled into exceptions here."""
    name = type(exc).__name__
    ours = getattr(errors, name, None) is type(exc) and isinstance(exc, errors.SteerHealError)
    return (name if ours else None), _first_line(exc)


def _rebuilt(error: tuple[str | None, str], rank: int) -> errors.SteerHealError:
    name, line = error
    if name is not None:
        return getattr(errors, name)(line.split(": ", 1)[1] if ": " in line else line)
    return RankFailed(f"rank {rank} failed: {line}")


def lost_ranks(launch: Launch | None = None) -> str | None:
    """One line naming the ranks of this launch that have died, or None (none, or not known)."""
    launch = launch or _ACTIVE
    if launch is None:
        return None
    dead = [
        f"rank {rank} (pid {pid})"
        for rank, (host, pid) in enumerate(launch.peers)
        if rank != launch.rank and _alive(host, pid) is False
    ]
    if not dead:
        return None
    return (
        f"{', '.join(dead)} died mid-stage; the run keeps its last checkpoint: continue it with "
        f"`steer-heal run --resume {launch.run_path}` (under the launcher or in one process)"
    )


def env_rank() -> int:
    """This process's rank as the launcher set it (0 outside a launcher), before any group is joined."""
    return int(os.environ.get("RANK", "0") or 0)


def _leave() -> None:
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a peer that died already: nothing left to leave
            pass


def launch() -> Launch | None:
    """Join the launch this process belongs to (torchrun, accelerate launch), or None outside one."""
    global _ACTIVE
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None
    if _ACTIVE is not None:
        return _ACTIVE
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if cuda else "gloo")
        atexit.register(_leave)
    objects = dist.new_group(backend="gloo")
    peers: list[Any] = [None] * world
    dist.all_gather_object(peers, (socket.gethostname(), os.getpid()), group=objects)
    _ACTIVE = Launch(rank, world, local_rank, objects, [tuple(p) for p in peers])
    if rank == 0:
        log.info("a launch of %d processes: every stage's batches are spread over them", world)
    return _ACTIVE


def local_config(config: RunConfig, where: Launch | None) -> RunConfig:
    """The config this rank loads its replica with: its own GPU (LOCAL_RANK) under a launch."""
    if where is None:
        return config
    if config.run.device_map:
        raise ConfigError(
            "run.device_map splits one model over several GPUs; a launch runs one replica per GPU: drop "
            "--device-map, or run in one process"
        )
    if config.heal.reg == "spectral":
        raise ConfigError(
            "heal.reg = spectral keeps its power iteration per process, so its ranks would drift apart; run it in "
            "one process"
        )
    if config.run.device in ("auto", "cuda") and torch.cuda.is_available():
        return replace(config, run=replace(config.run, device=f"cuda:{torch.cuda.current_device()}"))
    return config


def on_writer(where: Launch | None, fn: Callable[[], T]) -> T:
    """`fn()` on rank 0 alone (a check of the filesystem, before anything is written); its
    result, or its exception, on every rank."""
    if where is None:
        return fn()
    outcome: tuple[Any, Any] = (None, None)
    failed: Exception | None = None
    if where.writer:
        try:
            outcome = (fn(), None)
        except Exception as exc:
            failed, outcome = exc, (None, _portable(exc))
    value, error = where.broadcast(outcome)
    if failed is not None:
        raise failed
    if error is not None:
        raise _rebuilt(error, 0)
    return value


class Follower(RunDir):
    """A run directory as rank > 0 sees it: the events rank 0 had when it opened the run, and
    after them the events this rank computes (the same as rank 0's), kept in memory; nothing
    is written. Finished rounds' files are read from the shared folder on resume."""

    def __init__(self, path: Path, config: RunConfig, events: list[dict[str, Any]]) -> None:
        super().__init__(path, config)
        self._events = list(events)

    @property
    def writable(self) -> bool:
        return True

    def log(self, event: str, round: int, **payload: Any) -> dict[str, Any]:
        # as rank 0 writes it: through JSON (tuples become lists, numpy numbers floats)
        record = json.loads(json.dumps({"event": event, "round": round, **jsonable(payload)}))
        self._events.append(record)
        return record

    def events(self) -> list[dict[str, Any]]:
        return list(self._events)

    def save_round(self, round: int, vector: Any, history: Any) -> None:
        pass  # rank 0 writes the round's files


def open_run(where: Launch | None, opener: Callable[[], RunDir]) -> RunDir:
    """The run directory: opened by `opener` (create or resume) on rank 0 alone; a `Follower`
    of it on the other ranks."""
    if where is None:
        return opener()
    opened: list[RunDir] = []

    def open_here() -> tuple[str, RunConfig, list[dict[str, Any]]]:
        opened.append(opener())
        return str(opened[0].path), opened[0].config, opened[0].events()

    path, config, events = on_writer(where, open_here)
    where.run_path = path
    return opened[0] if where.writer else Follower(Path(path), config, events)
