"""Log-probs under a frozen view, computed once per example during a heal.

A heal reads two models that do not change while it runs: the reference of its barrier
(`prev`, `base` or `last_good`) on the training completions, and the base on the anchor's
completions. Each training completion comes back once an epoch (six times at the default
six epochs) and each anchor completion about as often, and every visit paid a forward of
the frozen model that gave the same numbers. `FrozenLogprobs` keeps them.

Which numbers are kept matters, because a forward's rounding depends on the batch it runs
in (its padding and its neighbours). An example's log-probs are always the ones computed in
its *home* micro-batch, the first it is drawn in. A micro-batch whose examples all have
theirs is served from memory; one that lacks some computes the home batches it needs. In
one process the first sight of an example is its home batch itself, so the first epoch
computes exactly what it computed without the store (the first step's KL to `prev` stays
exactly 0) and later epochs reuse those numbers. Spread over ranks (`steer_heal.shards`),
a rank that meets an example whose home batch another rank ran recomputes that home batch,
so every rank serves the numbers one process serves, bit for bit.

Memory: tokens x vocab x 4 bytes per example (SmolLM2's full preset: about 1.4 GB for its
42 training completions and 64 anchor completions). When all of a heal's examples would need more
than the budget, the store is off for the whole heal (decided before the first step, the
same on every rank) and each micro-batch runs its forward as before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from ..models.logprobs import Batch, Example
from ..vocab import Number

__all__ = ["FrozenLogprobs"]


class FrozenLogprobs:
    """`logprobs(examples, batch)` = `compute(batch)`, served per example from its home batch.

    `compute(batch)` runs the frozen view on a `Batch` and returns its `[n, vocab]` log-probs
    (row-major over the batch's target positions); `make(examples)` builds a `Batch`.
    `expected`: every example the heal will ask about (for the budget); `vocab`: the
    output width; `budget_bytes`: the most the store may hold (0: off)."""

    def __init__(
        self,
        compute: Callable[[Batch], Tensor],
        make: Callable[[Sequence[Example]], Batch],
        expected: Iterable[Example],
        vocab: int,
        budget_bytes: Number,
    ) -> None:
        self.compute, self.make = compute, make
        self.need = sum(len(e.ids) - e.n_prompt for e in set(expected)) * vocab * 4  # bytes, all kept
        self.on = 0 < self.need <= budget_bytes
        self.home: dict[Example, tuple[Example, ...]] = {}
        self.values: dict[Example, Tensor] = {}
        self.forwards = 0  # frozen forwards run (for tests and benchmarks)

    def see(self, examples: Sequence[Example]) -> None:
        """Record a micro-batch in the order the heal draws it (on every rank, computed or not):
        the first micro-batch an example is drawn in is its home."""
        batch = tuple(examples)
        for e in batch:
            self.home.setdefault(e, batch)

    def logprobs(self, examples: Sequence[Example], batch: Batch) -> Float[Tensor, "n vocab"]:
        if not self.on:
            self.forwards += 1
            return self.compute(batch)
        examples = tuple(examples)
        for e in examples:
            if e in self.values:
                continue
            home = self.home.get(e, examples)  # an example never `see`n is its own batch's
            out = self.compute(batch if home == examples else self.make(home))
            self.forwards += 1
            counts = [len(x.ids) - x.n_prompt for x in home]
            for x, part in zip(home, torch.split(out, counts)):
                self.values.setdefault(x, part)
        return torch.cat([self.values[e] for e in examples])
