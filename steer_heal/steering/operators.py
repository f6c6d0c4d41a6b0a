"""Steering operators: how a direction v changes block l's output h, per position, over the
hidden dimension (c is the coefficient):

    add        h' = h + c v                              the default; also exact as a bias (`bake`)
    ablate     h' = h - c (h . u) u,   u = v / |v|       c = 1 removes h's component along v (directional
                                                         ablation); 0 < c < 1 removes part of it
    norm_add   h' = (h + c v) |h| / |h + c v|            adds v and keeps each position's norm, so the
                                                         next layer norm sees the same scale

`ablate` and `norm_add` read h, so they are hooks only: a bias adds the same vector at every
position whatever h is, and `bake` refuses them. They are computed in float32 and cast back
to h's dtype. `SteeringVector.apply(model, coeff, operator=...)` installs them;
`vec.using("ablate")` is the same vector with another operator wherever a `Steering` goes
(`generate`, the loop's evaluators).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from ..errors import InputError
from ..vocab import Operator, choices
from .hooks import SteeringHook

OPERATORS = choices(Operator)


def check_operator(operator: str) -> str:
    if operator not in OPERATORS:
        raise InputError(f"unknown steering operator {operator!r}; choose from {', '.join(OPERATORS)}")
    return operator


def _hidden(output: Any) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace(output: Any, hidden: Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def ablated(h: Float[Tensor, "... hidden"], unit: Float[Tensor, " hidden"], coeff: float) -> Tensor:
    """h - c (h . u) u in float32, cast back to h's dtype."""
    x = h.float()
    u = unit.to(device=h.device, dtype=torch.float32)
    return (x - coeff * (x @ u)[..., None] * u).to(h.dtype)


def norm_added(h: Float[Tensor, "... hidden"], delta: Float[Tensor, " hidden"]) -> Tensor:
    """(h + delta) |h| / |h + delta| per position, in float32, cast back to h's dtype."""
    x = h.float()
    moved = x + delta.to(device=h.device, dtype=torch.float32)
    scale = x.norm(dim=-1, keepdim=True) / moved.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return (moved * scale).to(h.dtype)


class Ablate(SteeringHook):
    """The `ablate` operator as a forward hook (the module docstring)."""

    def __init__(self, unit: Tensor, coeff: float) -> None:
        self.unit, self.coeff = unit, coeff

    def __call__(self, module: nn.Module, args, output):
        return _replace(output, ablated(_hidden(output), self.unit, self.coeff))


class NormAdd(SteeringHook):
    """The `norm_add` operator as a forward hook (the module docstring)."""

    def __init__(self, delta: Tensor, coeff: float) -> None:
        self.delta, self.coeff = delta, coeff

    def __call__(self, module: nn.Module, args, output):
        return _replace(output, norm_added(_hidden(output), self.delta))


def operator_hook(operator: str, v: Tensor, coeff: float) -> SteeringHook:
    """The hook of a non-additive operator for direction v at coefficient c."""
    if operator == "ablate":
        norm = float(v.float().norm())
        if norm == 0:
            raise InputError("cannot ablate a zero direction (its unit vector is undefined)")
        return Ablate(v.float() / norm, coeff)
    if operator == "norm_add":
        return NormAdd(coeff * v.float(), coeff)
    raise InputError(f"operator {operator!r} has no hook of its own; add uses AddDelta")


class Operated:
    """A steering vector with another operator or positions: `vec.using("ablate")`,
    `vec.using(positions="generated")`. It goes wherever a `Steering` goes; `apply` installs
    its hooks and `bake` refuses all but add at every position (a bias adds everywhere)."""

    def __init__(self, vector: Any, operator: str = "add", positions: Any = "all") -> None:
        from .positions import check_positions

        self.vector, self.operator, self.positions = vector, check_operator(operator), check_positions(positions)

    @property
    def directions(self) -> dict:
        return self.vector.directions

    @property
    def layers(self) -> tuple[int, ...]:
        return self.vector.layers

    def check_compatible(self, model: nn.Module, allow_other_model: bool = False) -> None:
        self.vector.check_compatible(model, allow_other_model)

    def apply(self, model: nn.Module, coeff: Any = 1.0, allow_other_model: bool = False) -> AbstractContextManager:
        return self.vector.apply(model, coeff, allow_other_model, operator=self.operator, positions=self.positions)

    @contextmanager
    def bake(self, model: nn.Module, coeff: Any = 1.0, allow_other_model: bool = False) -> Iterator[nn.Module]:
        if self.operator != "add":
            raise InputError(f"a bias can only add; {self.operator} reads each position's state: steer with hooks")
        if self.positions != "all":
            raise InputError(f"a bias changes every position; positions={self.positions!r} needs hooks (how='hooks')")
        with self.vector.bake(model, coeff, allow_other_model):
            yield model
