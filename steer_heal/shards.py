"""Where a stage's batches run: in this process, or spread over the processes of a launcher.

Every stage of the loop processes its inputs in batches it forms itself (generation sorts
prompts by length, the log-prob engine sorts examples, a collection rotates through the
pool). Those loops go through `map_batches(fn, n)`: `fn(b)` computes batch `b` alone and
returns what the loop keeps of it, and `map_batches` returns the n results in batch order.
In one process that is `[fn(b) for b in range(n)]`. Under a `Sharder` (installed with
`sharded(...)` by `steer_heal.run.parallel`, the one module that knows about ranks) each
process computes its share of the batches and the results are gathered, so every batch is
formed and computed exactly as in one process and the caller sees the same list.

The primitives never see ranks: they ask for `map_batches`, `width()` (how many batches are
computed at once, for loops that stop early: a collection asks for one wave of `width()`
batches and keeps the prefix a single process would have made) and, in the heal,
`send(b, tensors)` (micro-batch b's
gradients from the process that computed them to every other, so each process adds them up
in micro-batch order, as one process does, and the adapter comes out bitwise the same). Inside a mapped batch everything is local again: a generation inside a
collection's batch decodes that batch here, never spreads it further.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol, TypeVar, runtime_checkable

from torch import Tensor

T = TypeVar("T")

__all__ = ["Sharder", "map_batches", "send", "sharded", "width"]


@runtime_checkable
class Sharder(Protocol):
    width: int  # processes computing batches at once

    def map(self, fn: Callable[[int], T], n: int) -> list[T]: ...  # every batch's result, in batch order

    def send(self, b: int, tensors: Sequence[Tensor]) -> None: ...  # batch b's tensors, from its process to all


_current: ContextVar[Sharder | None] = ContextVar("steer_heal_sharder", default=None)


@contextmanager
def sharded(sharder: Sharder | None) -> Iterator[None]:
    """Run the stages inside under `sharder` (None: in this process alone)."""
    token = _current.set(sharder)
    try:
        yield
    finally:
        _current.reset(token)


def _local(fn: Callable[[int], T]) -> Callable[[int], T]:
    def run(b: int) -> T:
        with sharded(None):  # a batch is computed where it was sent, nested loops included
            return fn(b)

    return run


def map_batches(fn: Callable[[int], T], n: int) -> list[T]:
    """[fn(0), ..., fn(n - 1)], each batch computed by one process (see the module docstring)."""
    sharder = _current.get()
    if sharder is None:
        return [fn(b) for b in range(n)]
    return sharder.map(_local(fn), n)


def width() -> int:
    """How many batches are computed at once (1 in one process)."""
    sharder = _current.get()
    return 1 if sharder is None else sharder.width


def send(b: int, tensors: Sequence[Tensor]) -> None:
    """Batch b's tensors, computed by one process, copied into the same-shaped `tensors` of every
    other (nothing to do in one process)."""
    sharder = _current.get()
    if sharder is not None:
        sharder.send(b, tensors)
