"""SteeringSlot: steering that survives compiled (static-cache) decoding without recompiles.

`vec.apply` registers new hook closures on every call. A compiled decode step guards on
the hooks it traced, so each new `apply` (and each coefficient, captured as a new tensor)
can cost a recompile. A slot installs its hooks once, each adding a per-layer buffer
`delta_l` to the block output; `set(vector, coeff)` rewrites the buffers in place, so the
traced graph, its guards and the buffers' addresses never change. A zero buffer adds
exactly nothing (`h + 0 == h`), so an idle slot leaves the model's numbers untouched.

    with SteeringSlot(model, vec.layers) as slot:
        for coeff in (0.5, 1.0, 2.0):
            slot.set(vec, coeff)
            generate(model, tok, prompts, compiled=True)

Hooks are removed on exit, also on exceptions.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch
from torch import Tensor, nn

from ..errors import InputError, StateError
from ..models.model import decoder_blocks, hidden_size, n_layers, placement
from ..vocab import Number
from .hooks import AddDelta, Steering, check_coeff, finite_delta


class SteeringSlot:
    def __init__(self, model: nn.Module, layers: tuple[int, ...] | list[int]):
        depth = n_layers(model)
        bad = [layer for layer in layers if not 0 <= layer < depth]
        if not layers or bad:
            raise InputError(f"slot layers must be a non-empty subset of 0..{depth - 1}, got {list(layers)}")
        self.model = model
        self.layers = tuple(sorted(set(layers)))
        self.deltas: dict[int, Tensor] = {}
        self._hooks: list[AddDelta] = []
        self._stack: ExitStack | None = None

    def __enter__(self) -> SteeringSlot:
        if self._stack is not None:
            raise StateError("this SteeringSlot is already installed; use it in one `with` block at a time")
        blocks = decoder_blocks(self.model)
        size = hidden_size(self.model)
        stack = ExitStack()
        try:
            for layer in self.layers:
                device, dtype = placement(blocks[layer])
                self.deltas[layer] = torch.zeros(size, device=device, dtype=dtype)
                hook = AddDelta(self.deltas[layer], 0.0, "slot")
                self._hooks.append(hook)
                stack.callback(blocks[layer].register_forward_hook(hook).remove)
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc) -> None:
        stack, self._stack = self._stack, None
        self.deltas, self._hooks = {}, []
        if stack is not None:
            stack.close()

    @torch.no_grad()
    def set(self, vector: Steering | None, coeff: Number = 1.0, allow_other_model: bool = False) -> None:
        """Steer with `coeff * vector` from now on (None or coeff 0: no steering)."""
        if self._stack is None:
            raise StateError("use the slot inside `with SteeringSlot(model, layers) as slot:`")
        coeff = check_coeff(coeff)
        if vector is not None:
            vector.check_compatible(self.model, allow_other_model)
            missing = sorted(set(vector.layers) - set(self.layers))
            if missing:
                raise InputError(
                    f"vector layers {missing} are not in this slot {self.layers}; make the slot with vec.layers"
                )
        for layer, delta in self.deltas.items():
            if vector is None or layer not in vector.directions:
                delta.zero_()
            else:
                delta.copy_(finite_delta((coeff * vector.directions[layer]).to(delta.dtype), coeff, layer))
        for hook in self._hooks:  # what `steering.active_steering` reports
            hook.coeff = 0.0 if vector is None else coeff
