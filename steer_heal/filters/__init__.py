"""Cheap filters that keep coherent, trait-enacting completions and log why others go.

- `base`: the `Filter` protocol, `Verdict`, `Reason`, `AllOf`;
- `text`: `Repetition`, `Narration`, `Refusal` (no model needed);
- `babble`: `Babble`, word salad judged by the text's grammar (no model needed);
- `perplexity`: `Perplexity`, tail perplexity under the original model, absolute threshold;
- `calibrated`: `Calibrated` and `calibrate`, tail perplexity and token surprise under the
  original model, with thresholds measured on its own unsteered completions;
- `report`: `FilterReport`, what a filter kept and dropped per steering coefficient;
- `dose`: `walk_dose`, the largest steering dose whose kept share meets a target, and `collect` at it.

`default_text_filter`, `calibrated_filter` and `default_filter` below are the combinations
the loop and the sweep use.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import InputError
from ..sampling import SAMPLED, Sampling
from ..steering.generation import generate
from ..vocab import Number
from .babble import Babble, babble_scores
from .base import AllOf, Filter, FilterLike, Reason, Verdict, reason_name
from .calibrated import SURPRISE, Calibrated, Calibration, calibrate
from .dose import Collection, DoseResult, collect, walk_dose
from .perplexity import PPL, BaseModel, Perplexity, base_context, tail_perplexity
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
    "Collection",
    "DoseResult",
    "collect",
    "walk_dose",
    "SURPRISE",
    "Calibrated",
    "Calibration",
    "calibrate",
    "calibrate_on_pool",
    "calibrated_filter",
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


def calibrated_filter(
    model: BaseModel,
    tok,
    calibration: Calibration,
    tail: Number = 0.25,
    batch_size: int = 8,
    narration_patterns: Sequence[str] | None = None,
) -> AllOf:
    """The calibrated model-based filter (thresholds from the unsteered model's own text, see
    `calibrate`) plus the text-only filters: what the loop uses."""
    return AllOf(
        Calibrated(model, tok, calibration, tail=tail, batch_size=batch_size),
        *default_text_filter(narration_patterns).filters,
    )


def calibrate_on_pool(
    model: BaseModel,
    tok,
    prompts: Sequence[str],
    n: int = 16,
    sampling: Sampling = SAMPLED,
    seed: int = 0,
    k: Number = 3.0,
    percentile: Number = 5.0,
    tail: Number = 0.25,
    narration_patterns: Sequence[str] | None = None,
    sampler: BaseModel | None = None,
) -> tuple[AllOf, Calibration]:
    """Sample `n` unsteered completions of the prompt pool from the ORIGINAL model (a model,
    or e.g. `history.base`), calibrate on them, and return the calibrated filter with its
    calibration.

    `sampler` (default: `model`) writes the completions the thresholds come from; they are
    always scored under `model`. A healed student as the sampler sets the bar at its own
    unsteered text, so the filter then judges what the steering adds, not how far the
    student has already moved from the original model (`filter.calibrate_on = "student"`).
    """
    if not prompts:
        raise InputError("calibration needs a prompt pool; pass the axis's prompts")
    pool = [prompts[i % len(prompts)] for i in range(n)]
    with base_context(model if sampler is None else sampler) as writer:
        unsteered = generate(writer, tok, pool, sampling=sampling, seed=seed, progress=False)
    calibration = calibrate(model, tok, unsteered, k=k, percentile=percentile, tail=tail)
    return calibrated_filter(model, tok, calibration, tail=tail, narration_patterns=narration_patterns), calibration
