"""The Evaluator protocol and its result record.

An evaluator is any callable `(model, tok) -> EvalResult`. It runs the model exactly as
given: steering, baked biases and adapters are the caller's business, e.g.

    with vec.apply(model, 4.0):
        result = Vignettes()(model, tok)

`EvalResult.metrics` is a flat `dict[str, float]` (what goes into events.jsonl and
tables); `rows` are optional per-row records (one dict per scored prompt); `meta` holds
the settings that decide whether two results may be compared (item-set fingerprint,
think budget, protocol hash) as strings.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from torch import nn

from ..errors import InputError
from ..runtime import eval_mode

__all__ = ["EvalResult", "Evaluator", "eval_mode", "min_coherence"]


@dataclass(frozen=True)
class EvalResult:
    """What an evaluator returns: metrics, per-row records and comparability settings."""

    name: str
    metrics: Mapping[str, float | int]  # stored as dict[str, float]
    rows: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        clean = {}
        for key, value in self.metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InputError(f"metric {key!r} must be a number, got {type(value).__name__}")
            clean[str(key)] = float(value)
        object.__setattr__(self, "metrics", clean)

    def __getitem__(self, key: str) -> float:
        return self.metrics[key]

    def finite(self) -> bool:
        return all(math.isfinite(v) for v in self.metrics.values())

    def to_dict(self, rows: bool = False) -> dict[str, Any]:
        """JSON-ready; per-row records only when asked (they can be large)."""
        out: dict[str, Any] = {"name": self.name, "metrics": dict(self.metrics), "meta": dict(self.meta)}
        if rows:
            out["rows"] = list(self.rows)
        return out

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> EvalResult:
        missing = [key for key in ("name", "metrics") if key not in record]
        if missing:
            raise InputError(f"not an evaluation record: missing {', '.join(missing)}")
        return cls(
            name=record["name"], metrics=record["metrics"], rows=record.get("rows", []), meta=record.get("meta", {})
        )


@runtime_checkable
class Evaluator(Protocol):
    """Runs a model (as given) on fixed items and returns an `EvalResult`."""

    name: str

    def __call__(self, model: nn.Module, tok: Any) -> EvalResult: ...


def min_coherence(results: Iterable[EvalResult]) -> float | None:
    """The lowest `coherence` over the results that report one (the 7-way probes do; the
    answer log-odds probe does not); None when none does."""
    values = [r.metrics["coherence"] for r in results if "coherence" in r.metrics]
    return min(values) if values else None
