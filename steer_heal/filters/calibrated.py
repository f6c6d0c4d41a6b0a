"""A model-based filter whose thresholds come from the unsteered model's own completions.

An absolute perplexity threshold does not transfer between models: SmolLM2-135M's word
salad scores under a tail perplexity of 50. So the thresholds are measured. `calibrate`
scores n >= 8 unsteered completions of the same prompt pool under the original model and
sets, with NLL_t the NLL of completion token t:

    tau       = k * median(tail ppl of the unsteered completions)      (k = 3 by default)
    low       = the `percentile`-th percentile of -NLL_t over every unsteered token
    surprise  = |{t : -NLL_t < low}| / n_tokens                       (per completion)
    max_share = max(share_factor * percentile / 100, q95 of the unsteered completions' surprise)

`Calibrated` drops a completion whose tail perplexity exceeds `tau` (the end of the text
broke) or whose surprise exceeds `max_share` (too many tokens the original model finds as
unlikely as the rarest `percentile`% of its own: word salad that reads fluent to the text
rules, anywhere in the text). Both scores come from one forward of the one log-prob engine.
`Calibration.coherence(verdicts)` is the share a batch keeps under these two rules alone,
the number the dose walk compares with the unsteered batch's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from torch import nn

from ..errors import InputError
from ..steering.generation import Completion
from ..vocab import Number
from .base import Reason, Verdict, check_fraction, check_nonempty, check_positive
from .perplexity import PPL, BaseModel, completion_logprobs, original_model, tail_ppl

SURPRISE = "surprise"  # the share of tokens below the calibrated log-prob
MIN_CALIBRATION = 8


@dataclass(frozen=True)
class Calibration:
    """The thresholds measured on the unsteered completions, and what they were measured on."""

    n: int  # unsteered completions
    n_tokens: int
    median_ppl: float  # of their tail perplexities
    k: float
    tau: float  # k * median_ppl
    percentile: float
    low_logprob: float  # the percentile-th percentile of their token log-probs
    max_share: float
    unsteered_coherence: float  # share of the unsteered completions kept by these rules

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}

    def describe(self) -> str:
        return (
            f"calibrated on {self.n} unsteered completions ({self.n_tokens} tokens): tail ppl tau = {self.k:g} x "
            f"median {self.median_ppl:.2f} = {self.tau:.2f}; surprise = share of tokens with log-prob < "
            f"{self.low_logprob:.2f} (their {self.percentile:g}th percentile), max {self.max_share:.3f}; "
            f"unsteered coherence {self.unsteered_coherence:.3f}"
        )

    def coherence(self, verdicts: Sequence[Verdict]) -> float:
        """The share of a batch within both calibrated thresholds (ignoring other filters)."""
        ok = [
            v.scores.get(PPL, math.inf) <= self.tau and v.scores.get(SURPRISE, 1.0) <= self.max_share for v in verdicts
        ]
        return sum(ok) / len(ok) if ok else 0.0


def _scores(model: nn.Module, tok, completions: Sequence[Completion], tail: float, batch_size: int):
    """Per completion: (token log-probs, tail ppl); empty completions: (empty, inf)."""
    prompts = [c.formatted_prompt(tok) for c in completions]
    values = completion_logprobs(model, tok, prompts, [c.text for c in completions], batch_size)
    return [(v, tail_ppl(v, tail)) for v in values]


def calibrate(
    model: BaseModel,
    tok,
    unsteered: Sequence[Completion],
    k: Number = 3.0,
    percentile: Number = 5.0,
    share_factor: Number = 3.0,
    tail: Number = 0.25,
    batch_size: int = 8,
) -> Calibration:
    """Measure the thresholds on the ORIGINAL model's own completions (see the module docstring)."""
    if len(unsteered) < MIN_CALIBRATION:
        raise InputError(
            f"filter calibration needs at least {MIN_CALIBRATION} unsteered completions, got {len(unsteered)}; "
            "generate more from the unsteered model"
        )
    k, share_factor = check_positive("k", k), check_positive("share_factor", share_factor)
    percentile = float(percentile)
    if not 0 < percentile < 50:
        raise InputError(f"percentile must be in (0, 50), got {percentile}")
    if any(c.coeff != 0 for c in unsteered):
        raise InputError("calibration needs unsteered completions (coeff 0); these were generated under steering")
    with original_model(model, "calibration") as base:
        scored = _scores(base, tok, unsteered, check_fraction("tail", tail), batch_size)
    ppls = [p for _, p in scored if math.isfinite(p)]
    pooled = np.concatenate([v for v, _ in scored if len(v)]) if ppls else np.empty(0)
    if len(ppls) < MIN_CALIBRATION:
        raise InputError(f"only {len(ppls)} unsteered completions are non-empty; calibration needs {MIN_CALIBRATION}")
    median = float(np.median(ppls))
    low = float(np.percentile(pooled, percentile))
    shares = [float((v < low).mean()) for v, _ in scored if len(v)]
    max_share = max(share_factor * percentile / 100.0, float(np.quantile(shares, 0.95)))
    tau = k * median
    kept = [p <= tau and float((v < low).mean()) <= max_share for v, p in scored if len(v)]
    return Calibration(
        n=len(unsteered),
        n_tokens=int(pooled.size),
        median_ppl=median,
        k=k,
        tau=tau,
        percentile=percentile,
        low_logprob=low,
        max_share=max_share,
        unsteered_coherence=sum(kept) / len(unsteered),
    )


class Calibrated:
    """Drop text the original model finds broken, by thresholds measured on its own text."""

    name = "calibrated"

    def __init__(
        self, model: BaseModel, tok, calibration: Calibration, tail: Number = 0.25, batch_size: int = 8
    ) -> None:
        self.model, self.tok, self.calibration = model, tok, calibration
        self.tail = check_fraction("tail", tail)
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size

    def __call__(self, completions: Sequence[Completion]) -> list[Verdict]:
        check_nonempty(completions)
        cal = self.calibration
        with original_model(self.model, "Calibrated") as base:
            scored = _scores(base, self.tok, completions, self.tail, self.batch_size)
        verdicts = []
        for values, ppl in scored:
            share = float((values < cal.low_logprob).mean()) if len(values) else 1.0
            reasons = []
            if ppl > cal.tau:
                reasons.append(Reason(self.name, f"tail ppl {ppl:.1f} > {cal.tau:.1f} ({cal.k:g} x unsteered median)"))
            if share > cal.max_share:
                reasons.append(
                    Reason(
                        self.name,
                        f"{share:.2f} of tokens below the unsteered {cal.percentile:g}th percentile > {cal.max_share:.2f}",
                    )
                )
            verdicts.append(Verdict(not reasons, {PPL: ppl, SURPRISE: share}, reasons))
        return verdicts

    def __repr__(self) -> str:
        return f"Calibrated(tau={self.calibration.tau:.2f}, max_share={self.calibration.max_share:.3f})"
