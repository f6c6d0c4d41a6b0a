"""Paired comparison of two Vignettes results and a stage table.

Absolute nats are not portable across item subsets or think budgets, so `compare` refuses
results whose item fingerprint, think budget or protocol differ (the persona system prompt
may differ: that is the prompted baseline). With `d_f = other.f_nats - base.f_nats`:

- `retain = d_target(stage) / d_target(steered)`: share of the steered shift a stage keeps
  (None without a steered result, or when the steered shift is below `min_effect`);
- `coh_cost = |d_coherence| / |d_target|`: coherence paid per nat of trait (None when
  |d_target| < `min_effect`, where the ratio is noise);
- `surgical = |d_target| > max_{f != target} |d_f|`;
- `ci`: paired bootstrap 95% interval of d_target over items (resample item ids, recompute
  `log mean p_target` for both stages on the same draw), from the per-row records; None when
  either result carries no rows (e.g. a record saved without them).

The verdict is decided in this order, so a collapsed model can never score "ok":
1. any non-finite metric -> "invalid"; 2. coherence < `broken_below` (an absolute coherence) -> "broken";
3. |d_target| < `min_effect` -> "flat"; 4. the interval contains 0 -> "noise";
5. sign(d_target) != direction -> "reversed"; 6. not surgical -> "diffuse"; otherwise "ok".

The stage table also shows `label_bias` (how much the answers follow label position rather
than content): a shift that arrives with a rising label bias is a change in which number
the model likes to say, not in which foundation it sees.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from .base import EvalResult
from .items import FOUNDATIONS, canonical_foundation, foundation_key

BROKEN_BELOW = 0.85
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
    ci: tuple[float, float] | None = None


def item_probs(result: EvalResult) -> dict[str, np.ndarray] | None:
    """Per item, the order-averaged answer distribution over FOUNDATIONS, rebuilt from the rows."""
    if not result.rows or any("id" not in r or "logp" not in r for r in result.rows):
        return None
    groups: dict[str, list[list[float]]] = {}
    for row in result.rows:
        groups.setdefault(row["id"], []).append([row["logp"][f] for f in FOUNDATIONS])
    out = {}
    for key, logps in groups.items():
        mean = np.mean(np.asarray(logps, dtype=np.float64), axis=0)
        weights = np.exp(mean - mean.max())
        out[key] = weights / weights.sum()
    return out


def paired_ci(
    base: EvalResult, other: EvalResult, target: str, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float] | None:
    """Bootstrap 95% interval of `d_target` resampling items, the same draw for both stages."""
    pb, po = item_probs(base), item_probs(other)
    if pb is None or po is None or set(pb) != set(po):
        return None
    ids, k = sorted(pb), FOUNDATIONS.index(canonical_foundation(target))
    b = np.array([pb[i][k] for i in ids])
    o = np.array([po[i][k] for i in ids])
    draws = np.random.default_rng(seed).integers(0, len(ids), size=(n_boot, len(ids)))
    with np.errstate(divide="ignore", invalid="ignore"):
        deltas = np.log(o[draws].mean(1)) - np.log(b[draws].mean(1))
    if not np.isfinite(deltas).all():
        return None
    low, high = np.percentile(deltas, [2.5, 97.5])
    return float(low), float(high)


def _check_paired(a: EvalResult, b: EvalResult) -> None:
    for result in (a, b):
        if result.meta.get("evaluator") != "vignettes":
            raise InputError(
                f"compare() takes Vignettes results; {result.name!r} came from {result.meta.get('evaluator')!r}"
            )
    for key in _PAIRED:
        if a.meta.get(key) != b.meta.get(key):
            raise InputError(
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
    broken_below: float = BROKEN_BELOW,
    min_effect: float = MIN_EFFECT,
) -> Comparison:
    """Paired deltas of `other` against `base` on the target foundation, and a verdict."""
    target = canonical_foundation(target)
    if direction not in (-1, 1):
        raise InputError(f"direction must be +1 (target should rise) or -1 (should fall), got {direction!r}")
    _check_paired(base, other)
    if steered is not None:
        _check_paired(base, steered)
    deltas = {f: other[f"{foundation_key(f)}_nats"] - base[f"{foundation_key(f)}_nats"] for f in FOUNDATIONS}
    d_target = deltas[target]
    d_coh = other["coherence"] - base["coherence"]
    coherence = other["coherence"]
    others = max(abs(d) for f, d in deltas.items() if f != target)
    surgical = bool(abs(d_target) > others)
    ci = paired_ci(base, other, target) if _finite(base) and _finite(other) else None

    if not (_finite(base) and _finite(other)):
        verdict, reason = "invalid", "non-finite metrics (NaN/inf): the model's outputs are unusable"
    elif coherence < broken_below:
        verdict, reason = "broken", f"coherence {coherence:.3f} < floor {broken_below} (absolute)"
    elif abs(d_target) < min_effect:
        verdict, reason = "flat", f"|d {target}| = {abs(d_target):.3f} < {min_effect} nats"
    elif ci is not None and ci[0] <= 0.0 <= ci[1]:
        verdict, reason = (
            "noise",
            f"d {target} {d_target:+.3f} nats, paired 95% CI [{ci[0]:+.3f}, {ci[1]:+.3f}] holds 0",
        )
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
    return Comparison(target, deltas, d_target, d_coh, coherence, retain, coh_cost, surgical, verdict, reason, ci)


def _fmt(value: float | None, spec: str = "+.3f") -> str:
    return "" if value is None else format(value, spec)


def stage_table(
    stages: Mapping[str, EvalResult],
    base: str = "base",
    steered: str | None = "steered",
    target: str = "Authority",
    direction: int = -1,
    broken_below: float = BROKEN_BELOW,
) -> str:
    """A markdown table: one row per stage, compared with the `base` stage (paired)."""
    if base not in stages:
        raise InputError(f"stage table needs the base stage {base!r}; stages: {', '.join(stages)}")
    target = canonical_foundation(target)
    ref = stages[base]
    steer_result = stages.get(steered) if steered else None
    key = f"{foundation_key(target)}_nats"
    lines = [
        f"| stage | {target} nats | d {target} | 95% CI | retain | coherence | d coh | coh cost | unscorable "
        "| prefill NLL | top1 | label bias | surgical | verdict |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for name, result in stages.items():
        m = result.metrics
        bias = _fmt(m.get("label_bias"), ".3f")  # absent from records made before it existed
        if name == base:
            cells = [
                f"{m[key]:.3f}",
                "",
                "",
                "",
                f"{m['coherence']:.3f}",
                "",
                "",
                f"{m['frac_unscorable']:.3f}",
                f"{m['prefill_nll']:.3f}",
                f"{m['top1_acc']:.3f}",
                bias,
                "",
                "base",
            ]
        else:
            c = compare(
                ref,
                result,
                target,
                direction,
                steered=steer_result if name != steered else None,
                broken_below=broken_below,
            )
            interval = "" if c.ci is None else f"[{c.ci[0]:+.3f}, {c.ci[1]:+.3f}]"
            cells = [
                f"{m[key]:.3f}",
                _fmt(c.d_target),
                interval,
                _fmt(c.retain, ".2f"),
                f"{c.coherence:.3f}",
                _fmt(c.d_coherence),
                _fmt(c.coh_cost, ".3f"),
                f"{m['frac_unscorable']:.3f}",
                f"{m['prefill_nll']:.3f}",
                f"{m['top1_acc']:.3f}",
                bias,
                "yes" if c.surgical else "no",
                c.verdict,
            ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
