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

The pass runs in the layer's compute dtype, as two kernels: `h = A x` and `addmm(out, h, B^T)`,
the add inside the second matmul. peft casts x to its float32 adapters, runs two matmuls, adds
and casts back (five kernels), and a host-bound GPU pays per kernel. So A and every kept view's
B are also kept in the compute dtype; in bfloat16 the result differs from peft's float32 sum by
the output's own rounding plus a few parts in 2**8 of the update (A, B and A x rounded), checked
layer by layer in tests/test_history.py. In float32 nothing is rounded differently but the add.
A layer whose input or output has another dtype takes peft's way.
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
    """One layer's rounds: stacked A, the full scaled B, each round's columns, and the B of the
    view shown (`live`); A and B also in the layer's compute dtype (`dtype`, `*_run`)."""

    a: Tensor
    full: Tensor
    dtype: torch.dtype
    columns: dict[str, slice] = field(default_factory=dict)
    views: dict[tuple[str, ...], tuple[Tensor, Tensor]] = field(default_factory=dict)  # unscaled views, kept
    a_run: Tensor | None = None
    live: Tensor | None = None
    live_run: Tensor | None = None

    def show(self, active: tuple[str, ...], last_scale: float | None) -> None:
        """Make `live` (and `live_run`) the B of this view."""
        if last_scale is None and all(r in active for r in self.columns):
            key = ("full",)  # every round of this layer: the student, no copy
            if key not in self.views:
                self.views[key] = (self.full, self.full.to(self.dtype))
        elif last_scale is None and active in self.views:
            key = active
        else:
            key = None if last_scale is not None else active
            b = torch.zeros_like(self.full)
            for r in active:
                if r in self.columns:
                    b[:, self.columns[r]] = self.full[:, self.columns[r]]
            if last_scale is not None and active and active[-1] in self.columns:
                b[:, self.columns[active[-1]]] *= last_scale
            if key is None:  # a scaled view's factor is arbitrary: not kept
                self.live, self.live_run = b, b.to(self.dtype)
                return
            self.views[key] = (b, b.to(self.dtype))
        self.live, self.live_run = self.views[key]  # the same tensors whenever the view comes back


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
                weight = getattr(module.get_base_layer(), "weight", None)
                dtype = weight.dtype if weight is not None and weight.is_floating_point() else a.dtype
                stack = _Stack(a, full, dtype, columns, a_run=a.to(dtype))
                stack.show(tuple(rounds), None)
                self._stacks.append(stack)
                self._handles.append(module.register_forward_hook(partial(self._add, stack), with_kwargs=True))

    def show(self, active: Sequence[str], last_scale: float | None = None, disabled: bool = False) -> None:
        """Make the hooks add the rounds in `active` (the last of them times `last_scale` if given)."""
        active = tuple(active)
        with torch.inference_mode(False), torch.no_grad():
            for stack in self._stacks:
                stack.show(active, last_scale)
        self.on = bool(active) and not disabled and bool(self._stacks)

    def _add(self, stack: _Stack, module: nn.Module, args: tuple, kwargs: dict, out: Tensor) -> Tensor | None:
        if not self.on:
            return None
        x = args[0] if args else next(iter(kwargs.values()))
        if x.dtype != stack.dtype or out.dtype != stack.dtype:  # an unusual layer: peft's way, in the adapters' dtype
            return (out + F.linear(F.linear(x.to(stack.a.dtype), stack.a), stack.live)).to(out.dtype)
        # two kernels, the add inside the second matmul; a host-bound GPU pays per kernel
        h = F.linear(x, stack.a_run)
        return torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), stack.live_run.t()).view(
            out.shape
        )

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._stacks, self.on = [], [], False
