"""`Sampling`: how completions are decoded, one record for every place that decodes.

`generate`, `walk_dose`, `collect`, `dose_sweep` and the config's `[generate]` section all
take this one record, so a decoding setting is named, defaulted and validated once.
`Sampling()` is greedy; `Sampling.sampled()` (or `do_sample=True`) draws tokens with
`temperature`, then keeps the `top_k` most likely and the smallest set of them holding
`top_p` of the probability.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .errors import InputError


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = 64
    batch_size: int = 8  # prompts decoded together (left-padded)
    # steering.graphs: the same tokens without the per-token Python; on other devices no effect
    cuda_graphs: bool = False  # capture each batch's decode step as a CUDA graph (one CUDA device, eager)

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "batch_size", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"Sampling: batch_size, max_new_tokens and top_k must be >= 1, got {name}={value!r}")
        for name in ("do_sample", "cuda_graphs"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"Sampling.{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InputError(f"Sampling.{name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if not self.temperature > 0:
            raise InputError(f"Sampling.temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"Sampling.top_p must be in (0, 1], got {self.top_p}")

    def sampled(self) -> Sampling:
        """The same settings, drawing tokens instead of taking the most likely."""
        return replace(self, do_sample=True)

    def hf_settings(self) -> dict:
        """Keyword arguments for transformers' `GenerationConfig`."""
        out: dict = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample}
        if self.do_sample:
            out.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return out


GREEDY = Sampling()
SAMPLED = Sampling(do_sample=True)
