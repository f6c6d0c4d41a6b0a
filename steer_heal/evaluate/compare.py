"""Paired comparison of two Vignettes results and a stage table.

Absolute nats are not portable across item subsets or think budgets, so `compare` refuses
results whose item fingerprint, think budget or protocol differ (the persona system prompt
may differ: that is the prompted baseline). With `d_f = other.f_nats - base.f_nats`:

- `retain = d_target(stage) / d_target(steered)`: share of the steered shift a stage keeps
  (None without a steered result, or when the steered shift is below `min_effect`);
- `coh_cost = |d_coherence| / |d_target|`: coherence paid per nat of trait (None when
  |d_target| < `min_effect`, where the ratio is noise);
- `surgical = |d_target| > max_{f != target} |d_f|`.

The verdict is decided in this order, so a collapsed model can never score "ok":
1. any non-finite metric -> "invalid"; 2. coherence < `coherence_floor` -> "broken";
3. |d_target| < `min_effect` -> "flat"; 4. sign(d_target) != direction -> "reversed";
5. not surgical -> "diffuse"; otherwise "ok".

The stage table also shows `label_bias` (how much the answers follow label position rather
than content): a shift that arrives with a rising label bias is a change in which number
the model likes to say, not in which foundation it sees.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from .base import EvalResult
from .items import FOUNDATIONS, canonical_foundation, foundation_key

COHERENCE_FLOOR = 0.85
MIN_EFFECT = 0.05
_PAIRED = ("items", "think_tokens", "protocol")


@dataclass(frozen=True)
class Comparison:
    target: str
    deltas: dict[str, float]  # per foundation (nats), other minus base
    d_target: float
    d_coherence: float
    coherence: float
    retain: float | None
    coh_cost: float | None
    surgical: bool
    verdict: str
    reason: str


def _check_paired(a: EvalResult, b: EvalResult) -> None:
    for result in (a, b):
        if result.meta.get("evaluator") != "vignettes":
            raise ValueError(f"compare() takes Vignettes results; {result.name!r} came from {result.meta.get('evaluator')!r}")
    for key in _PAIRED:
        if a.meta.get(key) != b.meta.get(key):
            raise ValueError(
                f"cannot compare {a.name!r} and {b.name!r}: different {key} ({a.meta.get(key)} vs {b.meta.get(key)}); "
                "evaluate both stages with the same Vignettes settings and items"
            )


def _finite(result: EvalResult) -> bool:
    keys = [f"{foundation_key(f)}_nats" for f in FOUNDATIONS] + ["coherence", "prefill_nll"]
    return all(math.isfinite(result.metrics.get(key, math.nan)) for key in keys)


def compare(
    base: EvalResult,
    other: EvalResult,
    target: str = "Authority",
    direction: int = -1,
    steered: EvalResult | None = None,
    coherence_floor: float = COHERENCE_FLOOR,
    min_effect: float = MIN_EFFECT,
) -> Comparison:
    """Paired deltas of `other` against `base` on the target foundation, and a verdict."""
    target = canonical_foundation(target)
    if direction not in (-1, 1):
        raise ValueError(f"direction must be +1 (target should rise) or -1 (should fall), got {direction!r}")
    _check_paired(base, other)
    if steered is not None:
        _check_paired(base, steered)
    deltas = {f: other[f"{foundation_key(f)}_nats"] - base[f"{foundation_key(f)}_nats"] for f in FOUNDATIONS}
    d_target = deltas[target]
    d_coh = other["coherence"] - base["coherence"]
    coherence = other["coherence"]
    others = max(abs(d) for f, d in deltas.items() if f != target)
    surgical = bool(abs(d_target) > others)

    if not (_finite(base) and _finite(other)):
        verdict, reason = "invalid", "non-finite metrics (NaN/inf): the model's outputs are unusable"
    elif coherence < coherence_floor:
        verdict, reason = "broken", f"coherence {coherence:.3f} < floor {coherence_floor}"
    elif abs(d_target) < min_effect:
        verdict, reason = "flat", f"|d {target}| = {abs(d_target):.3f} < {min_effect} nats"
    elif math.copysign(1, d_target) != direction:
        verdict, reason = "reversed", f"{target} moved {d_target:+.3f} nats, against direction {direction:+d}"
    elif not surgical:
        verdict, reason = "diffuse", f"another foundation moved more ({others:.3f}) than {target} ({abs(d_target):.3f})"
    else:
        verdict, reason = "ok", f"{target} {d_target:+.3f} nats at coherence {coherence:.3f}"

    # ratios only once the inputs are known finite, and only over a real effect
    ok_numbers = verdict != "invalid"
    coh_cost = abs(d_coh) / abs(d_target) if ok_numbers and abs(d_target) >= min_effect else None
    retain = None
    if ok_numbers and steered is not None and _finite(steered):
        d_steered = steered[f"{foundation_key(target)}_nats"] - base[f"{foundation_key(target)}_nats"]
        if abs(d_steered) >= min_effect:
            retain = d_target / d_steered
    return Comparison(target, deltas, d_target, d_coh, coherence, retain, coh_cost, surgical, verdict, reason)


def _fmt(value: float | None, spec: str = "+.3f") -> str:
    return "" if value is None else format(value, spec)


def stage_table(
    stages: Mapping[str, EvalResult],
    base: str = "base",
    steered: str | None = "steered",
    target: str = "Authority",
    direction: int = -1,
    coherence_floor: float = COHERENCE_FLOOR,
) -> str:
    """A markdown table: one row per stage, compared with the `base` stage (paired)."""
    if base not in stages:
        raise ValueError(f"stage table needs the base stage {base!r}; stages: {', '.join(stages)}")
    target = canonical_foundation(target)
    ref = stages[base]
    steer_result = stages.get(steered) if steered else None
    key = f"{foundation_key(target)}_nats"
    lines = [
        f"| stage | {target} nats | d {target} | retain | coherence | d coh | coh cost | unscorable | prefill NLL "
        "| top1 | label bias | surgical | verdict |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for name, result in stages.items():
        m = result.metrics
        bias = _fmt(m.get("label_bias"), ".3f")  # absent from records made before it existed
        if name == base:
            cells = [f"{m[key]:.3f}", "", "", f"{m['coherence']:.3f}", "", "", f"{m['frac_unscorable']:.3f}",
                     f"{m['prefill_nll']:.3f}", f"{m['top1_acc']:.3f}", bias, "", "base"]
        else:
            c = compare(ref, result, target, direction, steered=steer_result if name != steered else None,
                        coherence_floor=coherence_floor)
            cells = [f"{m[key]:.3f}", _fmt(c.d_target), _fmt(c.retain, ".2f"), f"{c.coherence:.3f}", _fmt(c.d_coherence),
                     _fmt(c.coh_cost, ".3f"), f"{m['frac_unscorable']:.3f}", f"{m['prefill_nll']:.3f}",
                     f"{m['top1_acc']:.3f}", bias, "yes" if c.surgical else "no", c.verdict]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
