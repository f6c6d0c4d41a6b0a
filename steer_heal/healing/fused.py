"""Every folded round as one low-rank pass per layer, so a student's forward does not slow down
as rounds accumulate beyond the first fold's one pass (that pass itself still costs 1.27-1.38 x
a round on a host-bound H100: docs/benchmarks.md).

peft runs each active adapter as a pass of its own through a wrapped linear (two small matmuls,
a scale and an add, each an op the host dispatches). With the folded rounds active one by one,
a forward's host time grows with the number of rounds; on a GPU the loop is host-bound, so every
round was slower than the one before (measured on a 30-layer model, CPU, one thread: 9.4 ms a
decode step without adapters, 17.7 ms with one round, 38.4 ms with five; one H100: the eager
round after the first fold 1.18 x (SmolLM2's shape) and 1.31 x (4B) the first). Stacking the
rounds of a layer,

    A = [A_0; A_1; ...; A_{n-1}]                      (sum_i r_i) x in
    B = [s_0 B_0, s_1 B_1, ..., s_{n-1} B_{n-1}]      out x (sum_i r_i)

gives sum_i s_i B_i A_i x = B (A x): one pass for any n. A view of the history (the student,
the previous student, the first k rounds, the last round scaled by c) is the same A with its
own copy of B whose columns of inactive rounds are zero and whose last round's columns are
scaled: every view runs the same ops on the same shapes, so views whose updates are equal agree
bitwise (scaled(1) and the student; scaled(0), previous and first(n - 1)). Against peft's sum of
one pass per round the result agrees up to float rounding (the sum over rounds moves inside one
matmul). A view's B is made once and never written again: a heal's autograd graph may hold the
one its forward used while a reference view runs, and a compiled graph sees the same tensor
each time the view comes back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


@dataclass
class _Stack:
    """One layer's rounds: stacked A, the full scaled B, the view's B, each round's columns."""

    a: Tensor
    full: Tensor
    live: Tensor
    columns: dict[str, slice] = field(default_factory=dict)
    views: dict[tuple[str, ...], Tensor] = field(default_factory=dict)  # B of each unscaled view, kept

    def b_of(self, active: tuple[str, ...], last_scale: float | None) -> Tensor:
        if last_scale is None and all(r in active for r in self.columns):
            return self.full  # every round of this layer: the student, no copy
        if last_scale is None and active in self.views:
            return self.views[active]
        b = torch.zeros_like(self.full)
        for r in active:
            if r in self.columns:
                b[:, self.columns[r]] = self.full[:, self.columns[r]]
        if last_scale is not None and active and active[-1] in self.columns:
            b[:, self.columns[active[-1]]] *= last_scale
        if last_scale is None:  # a scaled view's factor is arbitrary: not kept
            self.views[active] = b
        return b


class FusedRounds:
    """Forward hooks adding the folded rounds of each LoRA layer in one pass (see the module)."""

    def __init__(self) -> None:
        self.on = False  # read by the hooks: off for the base and for views with no round
        self._stacks: list[_Stack] = []
        self._handles: list[RemovableHandle] = []

    @property
    def total_rank(self) -> dict[int, int]:
        """Rows of the stacked A per hooked layer (keyed by position): the rank one pass costs."""
        return {i: int(s.a.shape[0]) for i, s in enumerate(self._stacks)}

    def build(self, layers: Sequence[tuple[str, nn.Module]], rounds: Sequence[str]) -> None:
        """Stack `rounds` (folded adapter names, in order) of every LoRA layer holding any of them."""
        self.remove()
        # made outside inference mode: a heal later trains through these hooks
        with torch.inference_mode(False), torch.no_grad():
            for _, module in layers:
                present = [r for r in rounds if r in module.lora_A]
                if not present:
                    continue
                a = torch.cat([module.lora_A[r].weight.detach() for r in present], 0).clone()
                full = torch.cat([module.lora_B[r].weight.detach() * module.scaling[r] for r in present], 1)
                columns, start = {}, 0
                for r in present:
                    width = module.lora_A[r].weight.shape[0]
                    columns[r] = slice(start, start + width)
                    start += width
                stack = _Stack(a, full, full, columns)
                self._stacks.append(stack)
                self._handles.append(module.register_forward_hook(partial(self._add, stack), with_kwargs=True))

    def show(self, active: Sequence[str], last_scale: float | None = None, disabled: bool = False) -> None:
        """Make the hooks add the rounds in `active` (the last of them times `last_scale` if given)."""
        active = tuple(active)
        with torch.inference_mode(False), torch.no_grad():
            for stack in self._stacks:
                stack.live = stack.b_of(active, last_scale)
        self.on = bool(active) and not disabled and bool(self._stacks)

    def _add(self, stack: _Stack, module: nn.Module, args: tuple, kwargs: dict, out: Tensor) -> Tensor | None:
        if not self.on:
            return None
        x = args[0] if args else next(iter(kwargs.values()))
        delta = F.linear(F.linear(x.to(stack.a.dtype), stack.a), stack.live)
        return (out + delta).to(out.dtype)  # summed in the adapters' dtype, as peft sums its passes

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._stacks, self.on = [], [], False
