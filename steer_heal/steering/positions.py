"""Where to steer: which token positions a hook changes.

    all        every position (the default; the only choice a bias can make)
    prompt     the prompt's tokens only: the first forward of a `generate` call (its prefill)
    generated  the generated tokens only: every later forward, one new token each
    slice(a, b)  tokens a <= i < b of each row, i counted over the row's real tokens (left
               padding excluded), prompt and generated alike: steering-vectors' token-index control

A forward pre-hook on the model numbers the tokens of each call: by the call's `position_ids`
(what `generate` passes: the index among the row's real tokens), else by its attention mask,
else 0.. across the call. A call whose positions start at 0 starts a sequence; a row's
prompt is what that call holds. The steering hook then changes only the selected positions:
h' = where(selected, op(h), h).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InputError
from ..vocab import Positions, choices
from .hooks import SteeringHook

NAMED = choices(Positions)


def check_positions(positions: Any) -> Any:
    if isinstance(positions, slice):
        if positions.step not in (None, 1) or any(
            x is not None and (not isinstance(x, int) or x < 0) for x in (positions.start, positions.stop)
        ):
            raise InputError(f"a positions slice takes non-negative ints and no step, got {positions}")
        return positions
    if positions not in NAMED:
        raise InputError(f"positions must be one of {', '.join(NAMED)} or a slice, got {positions!r}")
    return positions


class PositionTracker:
    """The forward pre-hook that numbers the tokens of each call (the module docstring)."""

    def __init__(self) -> None:
        self.index: Tensor | None = None  # (rows, tokens of this call): each token's index among its row's real tokens
        self.prompt: Tensor | None = None  # (rows,): real tokens in the call that started the sequence

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        rows, width = ids.shape[0], ids.shape[1]
        index = kwargs.get("position_ids")  # generate numbers real tokens (left padding excluded) this way
        if index is None:
            mask = kwargs.get("attention_mask")
            if mask is not None and mask.dim() == 2:
                index = (mask.long().cumsum(-1) - 1)[:, -width:]
            else:  # one call over whole unpadded rows
                index = torch.arange(width, device=ids.device)
        index = index.expand(rows, width)
        if self.prompt is None or bool((index.min(-1).values == 0).any()):  # a call that starts a sequence
            self.prompt = index.max(-1).values + 1
        self.index = index


class Positioned(SteeringHook):
    """A steering hook restricted to the selected positions: h' = where(selected, inner(h), h)."""

    def __init__(self, inner: SteeringHook, positions: Any, tracker: PositionTracker) -> None:
        self.inner, self.positions, self.tracker = inner, positions, tracker
        self.coeff, self.how = inner.coeff, inner.how

    def active(self) -> bool:
        return self.inner.active()

    def selected(self, index: Tensor, prompt: Tensor) -> Tensor:
        if self.positions == "prompt":
            return index < prompt[:, None]
        if self.positions == "generated":
            return index >= prompt[:, None]
        start = self.positions.start or 0
        stop = self.positions.stop
        chosen = index >= start
        return chosen if stop is None else chosen & (index < stop)

    def __call__(self, module: nn.Module, args, output):
        changed = self.inner(module, args, output)
        old = output[0] if isinstance(output, tuple) else output
        new = changed[0] if isinstance(changed, tuple) else changed
        if self.tracker.index is None:
            raise InputError("positional steering needs the model's own forward (its pre-hook numbers the tokens)")
        keep = self.selected(self.tracker.index, self.tracker.prompt).to(old.device)[..., None]
        mixed = torch.where(keep, new, old)
        return (mixed, *output[1:]) if isinstance(output, tuple) else mixed
