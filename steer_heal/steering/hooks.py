"""What steering is active on a model: the one place that knows.

Steering reaches a model in three ways, and each leaves a mark this module can read:

- `SteeringVector.apply` registers an `AddDelta` forward hook per block (`how="hooks"`);
- `SteeringSlot` registers `AddDelta` hooks once and rewrites their buffers (`how="slot"`);
- `SteeringVector.bake` adds to a residual writer's bias and tags that linear with a
  `Baked` record (attribute `BAKED_ATTR`) until it is restored (`how="bias"`).

`active_steering(model)` lists every mark that currently changes the model's numbers (a
hook or slot whose delta is all zeros adds exactly nothing and is not listed). The
perplexity filter asks it before scoring under "the original model", and `generate` asks
it which coefficient its completions were made at.

`Steering` is what a steering direction must offer to be used by `generate` and `steer`
(`SteeringVector` is the one this library makes); code that only runs steered models
depends on this protocol, not on the vector class.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ..errors import InputError
from ..vocab import Number, SteerHow, check_choice

How = Literal["hooks", "slot", "bias"]
BAKED_ATTR = "_steer_heal_baked"


class SteeringHook:
    """A forward hook that changes a block's hidden-state output; `active_steering` finds every
    one (so a filter that scores "under the original model" refuses a steered one)."""

    coeff: float
    how: How = "hooks"

    def active(self) -> bool:
        return self.coeff != 0


class AddDelta(SteeringHook):
    """A forward hook adding `delta` to a block's hidden-state output (tensor or tuple)."""

    def __init__(self, delta: Tensor, coeff: float, how: How = "hooks") -> None:
        self.delta, self.coeff, self.how = delta, coeff, how

    def __call__(self, module: nn.Module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if self.delta.dim() == 3 and self.delta.shape[0] != hidden.shape[0]:
            # per-row coefficients: a batch of 1 would broadcast to len(coeff) rows, not fail
            raise InputError(
                f"per-row coefficients are for {self.delta.shape[0]} rows but the batch has {hidden.shape[0]}; "
                "pass one coefficient per row, or one number for all"
            )
        if isinstance(output, tuple):
            return (output[0] + self.delta, *output[1:])
        return output + self.delta

    def active(self) -> bool:
        return bool((self.delta != 0).any())


@dataclass(frozen=True)
class Baked:
    """A vector folded into this linear's bias at `coeff` (set by `bake`, removed on exit)."""

    coeff: float


@dataclass(frozen=True)
class Active:
    """One piece of steering that changes the model's output now."""

    how: How
    module: str  # the module's name inside the model
    coeff: float


def active_steering(model: nn.Module) -> list[Active]:
    """Every active steering mark on `model` (hooks, slots and baked biases)."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    out = []
    for name, module in base.named_modules():
        for hook in module._forward_hooks.values():
            if isinstance(hook, SteeringHook) and hook.active():
                out.append(Active(hook.how, name, hook.coeff))
        for baked in getattr(module, BAKED_ATTR, ()):
            if baked.coeff != 0:
                out.append(Active("bias", name, baked.coeff))
    return out


def steering_coeff(model: nn.Module) -> float:
    """The coefficient the model is steered at now: 0.0 when nothing is active, the shared
    coefficient when every active mark has the same one, NaN when marks disagree (two
    vectors at different strengths: no single number describes that)."""
    coeffs = {a.coeff for a in active_steering(model)}
    if not coeffs:
        return 0.0
    return coeffs.pop() if len(coeffs) == 1 else math.nan


def check_coeff(coeff: Number) -> float:
    coeff = float(coeff)
    if not math.isfinite(coeff):
        raise InputError(f"coeff must be a finite number, got {coeff}")
    if abs(coeff) > torch.finfo(torch.float32).max:  # vectors are float32: coeff * v would be inf
        raise InputError(f"coeff {coeff:g} is not finite in float32 (largest {torch.finfo(torch.float32).max:.3g})")
    return coeff


def finite_delta(delta: Tensor, coeff: object, layer: int) -> Tensor:
    """`delta` (`coeff * v` cast to the dtype it is added in), refused if the cast overflowed: a
    coefficient finite as a double can be inf in float32, bfloat16 or float16."""
    if not bool(torch.isfinite(delta).all()):
        top = torch.finfo(delta.dtype).max
        raise InputError(
            f"coeff {coeff} times the vector at layer {layer} is not finite in {str(delta.dtype).removeprefix('torch.')} "
            f"(largest finite value {top:.3g}); use a smaller coeff"
        )
    return delta


def per_row_coeffs(coeff: Number | Sequence[Number]) -> list[float] | None:
    """A list or tuple of per-row coefficients, checked (None for one shared number)."""
    if not isinstance(coeff, (list, tuple)):
        return None
    if not coeff:
        raise InputError("per-row coefficients are empty; pass one number per batch row")
    return [check_coeff(c) for c in coeff]


@runtime_checkable
class Steering(Protocol):
    """Something that steers a model at a coefficient, by hooks or by a baked bias: per-layer
    `directions`, a compatibility check, and the two ways to apply it."""

    directions: dict

    @property
    def layers(self) -> tuple[int, ...]: ...

    def check_compatible(self, model: nn.Module, allow_other_model: bool = False) -> None: ...

    def apply(
        self, model: nn.Module, coeff: Number | Sequence[Number] = 1.0, allow_other_model: bool = False
    ) -> AbstractContextManager[nn.Module]: ...

    def bake(
        self, model: nn.Module, coeff: Number = 1.0, allow_other_model: bool = False
    ) -> AbstractContextManager[nn.Module]: ...


@contextmanager
def steer(
    model: nn.Module, vector: Steering | None, coeff: Number, how: str = "hooks", allow_other_model: bool = False
) -> Iterator[nn.Module]:
    """Steer with `vector` if given (hooks or bias), else run the model as it is."""
    check_choice("steering mode", how, SteerHow)
    if vector is None:
        yield model
        return
    manager = vector.apply if how == "hooks" else vector.bake
    with manager(model, coeff, allow_other_model):
        yield model
