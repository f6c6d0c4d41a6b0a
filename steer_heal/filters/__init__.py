"""Cheap filters that keep coherent, trait-enacting completions and log why others go.

- `base`: the `Filter` protocol, `Verdict`, `Reason`, `AllOf`;
- `text`: `Repetition`, `Narration`, `Refusal` (no model needed);
- `babble`: `Babble`, word salad judged by the text's grammar (no model needed);
- `perplexity`: `Perplexity`, tail perplexity under the original model;
- `report`: `FilterReport`, what a filter kept and dropped per steering coefficient.

`default_text_filter` and `default_filter` below are the combinations the loop uses.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..vocab import Number
from .babble import Babble, babble_scores
from .base import AllOf, Filter, FilterLike, Reason, Verdict, reason_name
from .perplexity import PPL, BaseModel, Perplexity, tail_perplexity
from .report import CoeffStats, FilterReport
from .text import (
    NARRATION_PATTERNS,
    REFUSAL_PHRASES,
    Narration,
    Refusal,
    Repetition,
    ngram_share,
    repetition_scores,
)

__all__ = [
    "NARRATION_PATTERNS",
    "PPL",
    "REFUSAL_PHRASES",
    "AllOf",
    "Babble",
    "BaseModel",
    "CoeffStats",
    "Filter",
    "FilterLike",
    "FilterReport",
    "Narration",
    "Perplexity",
    "Reason",
    "Refusal",
    "Repetition",
    "Verdict",
    "babble_scores",
    "default_filter",
    "default_text_filter",
    "ngram_share",
    "reason_name",
    "repetition_scores",
    "tail_perplexity",
]


def default_text_filter(narration_patterns: Sequence[str] | None = None) -> AllOf:
    """The text-only filters: repetition, babble, narration, refusal (no model needed).

    For another persona pair pass its patterns, e.g. `load_axis("love").narration_patterns`;
    None means `NARRATION_PATTERNS`.
    """
    return AllOf(Repetition(), Babble(), Narration(narration_patterns), Refusal())


def default_filter(
    model: BaseModel,
    tok,
    tau: Number = 50.0,
    tail: Number = 0.25,
    batch_size: int = 8,
    narration_patterns: Sequence[str] | None = None,
) -> AllOf:
    """Perplexity under the ORIGINAL model (a model, or e.g. `history.base`) plus the text-only filters."""
    return AllOf(
        Perplexity(model, tok, tau=tau, tail=tail, batch_size=batch_size),
        *default_text_filter(narration_patterns).filters,
    )
