"""Two context managers every stage uses, so each is written once.

- `eval_mode(model)`: dropout off for the duration (scores and reference forwards must be
  deterministic); the caller's train/eval mode is restored on exit, exceptions included.
- `seeded(seed, device)`: the global RNG forked (CPU, and the CUDA device when there is
  one) and seeded, so a stochastic step is reproducible and the caller's RNG stream is
  untouched afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextmanager
def seeded(seed: int | None, device: torch.device | str | None = None) -> Iterator[None]:
    """Fork the RNG; seed it with `seed` inside (None: fork only, e.g. to shield the caller
    from a library that draws random numbers)."""
    device = torch.device(device) if device is not None else None
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        if seed is not None:
            torch.manual_seed(seed)
        yield
