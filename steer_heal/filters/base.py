"""The filter protocol, its verdicts, and `AllOf`.

A `Filter` has a `name` and maps completions to one `Verdict` each (`keep`, `scores`,
`reasons`). Every filter scores every completion, so `AllOf` can report overlapping
reasons. A `Reason` names the filter that dropped a completion and says why; it is also
the string `"filter: detail"`, which is how it is written to events.jsonl.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from ..errors import InputError
from ..steering.generation import Completion
from ..vocab import Number


class Reason(str):
    """Why a completion was dropped: `filter` (the filter's name) and `detail`.

    A `str` subclass whose text is `"filter: detail"`, so it logs, prints and compares as
    that text; `filter` and `detail` are read directly, never parsed back out.
    """

    filter: str
    detail: str

    def __new__(cls, filter: str, detail: str) -> Reason:
        self = super().__new__(cls, f"{filter}: {detail}" if detail else filter)
        self.filter, self.detail = filter, detail
        return self

    @classmethod
    def parse(cls, text: str) -> Reason:
        """A reason from its text (a custom filter may return plain "name: detail" strings)."""
        if isinstance(text, Reason):
            return text
        name, _, detail = str(text).partition(":")
        return cls(name.strip(), detail.strip())

    def __reduce__(self):
        return (Reason, (self.filter, self.detail))


@dataclass(frozen=True)
class Verdict:
    """One completion's fate: kept or not, every score computed, why it was dropped."""

    keep: bool
    scores: dict[str, float] = field(default_factory=dict)
    reasons: list[Reason] | list[str] = field(default_factory=list)  # empty when kept; strings become Reasons

    def __post_init__(self) -> None:
        object.__setattr__(self, "reasons", [Reason.parse(r) for r in self.reasons])


def reason_name(reason: str) -> str:
    """The filter that gave a reason ("repetition: word 2-gram ..." -> "repetition")."""
    return Reason.parse(reason).filter


@runtime_checkable
class Filter(Protocol):
    """A named judge of completions: one `Verdict` per completion, in order."""

    name: str

    def __call__(self, completions: Sequence[Completion]) -> list[Verdict]: ...


# where a filter is taken, a bare callable works too (a lambda in a test, a quick check):
# reasons still carry the names they were given
FilterLike = Filter | Callable[[Sequence[Completion]], list[Verdict]]


def check_nonempty(completions: Sequence[Completion]) -> None:
    if len(completions) == 0:
        raise InputError("no completions to filter; generate some first (steer_heal.steering.generation)")


def check_positive(name: str, value: Number) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise InputError(f"{name} must be a finite number > 0, got {value}")
    return value


def check_fraction(name: str, value: Number) -> float:
    value = float(value)
    if not 0.0 < value <= 1.0:
        raise InputError(f"{name} must be in (0, 1], got {value}")
    return value


class AllOf:
    """Keep a completion only if every filter keeps it; scores merged, reasons concatenated."""

    name = "all_of"

    def __init__(self, *filters: FilterLike) -> None:
        if not filters:
            raise InputError("AllOf needs at least one filter, e.g. AllOf(Repetition(), Refusal())")
        self.filters = filters

    def __call__(self, completions: Sequence[Completion]) -> list[Verdict]:
        check_nonempty(completions)
        merged = [Verdict(True, {}, []) for _ in completions]
        for f in self.filters:
            verdicts = f(completions)
            if len(verdicts) != len(completions):
                raise InputError(f"filter {f!r} returned {len(verdicts)} verdicts for {len(completions)} completions")
            for i, v in enumerate(verdicts):
                clash = merged[i].scores.keys() & v.scores.keys()
                if clash:  # a silent overwrite would hide one filter's numbers
                    raise InputError(f"two filters in AllOf write the same score {sorted(clash)}; rename one")
                merged[i] = Verdict(
                    merged[i].keep and v.keep, {**merged[i].scores, **v.scores}, merged[i].reasons + list(v.reasons)
                )
        return merged

    def __repr__(self) -> str:
        return f"AllOf({', '.join(map(repr, self.filters))})"
