"""A dose sweep: where does a vector move the trait while the model stays coherent?

Before distilling a vector, look at it across doses (gate 1 and Q0 of docs/method.md). For each
coefficient c (c = 0, the unsteered model, is the reference every row is compared with):

- every vignette probe on the model steered by c * v: the foundation profile in nats and
  the coherence (probability mass on the allowed answers);
- `n` completions sampled at c over the prompt pool and judged by the filter: the kept
  fraction, perplexity and drop reasons (one `FilterReport` row);
- greedy samples of a few prompts at c, to read next to the numbers.

`operating_dose` picks the largest c whose coherence (the lowest over probes) stays at or
above `coherence_floor` x the unsteered coherence: the dose beyond which the vector breaks the probe.
It says nothing about whether the trait moved; read the profile for that.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import InputError
from ..evaluate import EvalResult, Samples, foundation_key, min_coherence, shift_table, stage_table
from ..evaluate.items import FOUNDATIONS
from ..filters import FilterLike, FilterReport
from ..sampling import SAMPLED, Sampling
from ..steering.generation import generate
from ..steering.hooks import check_coeff
from ..steering.vector import SteeringVector
from ..vocab import Number


@dataclass(frozen=True)
class SweepPoint:
    coeff: float
    results: dict[str, EvalResult]  # per probe name
    filter: dict[str, Any] | None  # the FilterReport row at this dose (None without a filter)
    samples: list[dict[str, str]]  # greedy {prompt, text}

    def to_dict(self) -> dict[str, Any]:
        return {
            "coeff": self.coeff,
            "results": {k: v.to_dict(rows=True) for k, v in self.results.items()},
            "filter": self.filter,
            "samples": self.samples,
        }

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> SweepPoint:
        results = {k: EvalResult.from_dict(v) for k, v in record["results"].items()}
        return cls(float(record["coeff"]), results, record.get("filter"), list(record.get("samples", [])))


def check_sweep(coeffs: Sequence[Number], coherence_floor: float = 0.95) -> None:
    """Every sweep setting that can be checked before a model loads: the doses (finite, in
    float32, one of them 0) and the coherence floor of the operating-dose rule."""
    if not coeffs or 0.0 not in [float(c) for c in coeffs]:
        raise InputError(f"coeffs must include 0 (the unsteered reference), got {list(coeffs)}")
    for c in coeffs:
        check_coeff(c)
    if not 0 < float(coherence_floor) <= 1:
        raise InputError(
            f"the coherence floor is a fraction of the unsteered coherence in (0, 1], got {coherence_floor} (--floor)"
        )


def dose_sweep(
    model: nn.Module,
    tok: Any,
    vec: SteeringVector,
    coeffs: Sequence[Number],
    probes: Mapping[str, Any],  # name -> Evaluator: AnswerLogOdds and/or Vignettes
    prompts: Sequence[str] = (),
    filt: FilterLike | None = None,
    n: int = 16,
    sampling: Sampling = SAMPLED,
    sample_prompts: Sequence[str] = (),
    seed: int = 0,
    allow_other_model: bool = False,
) -> list[SweepPoint]:
    """One `SweepPoint` per coefficient, in the order given (include 0 for the reference).

    `sampling` decodes the `n` filtered completions per dose; the greedy samples use its
    `max_new_tokens`.
    """
    check_sweep(coeffs)
    if filt is not None and (n < 1 or not prompts):
        raise InputError("filtering needs n >= 1 completions per dose and a prompt pool")
    pool = list(prompts)
    random.Random(seed).shuffle(pool)
    gen_prompts = [pool[i % len(pool)] for i in range(n)] if pool else []
    points = []
    log = logging.getLogger("steer_heal")
    started = time.perf_counter()
    for k, c in enumerate(coeffs):
        c = float(c)
        eta = "" if k == 0 else f", about {(time.perf_counter() - started) / k * (len(coeffs) - k):.0f} s left"
        log.info("sweep: dose %d of %d, coeff %g (%s%s)", k + 1, len(coeffs), c, ", ".join(probes), eta)
        with vec.apply(model, c, allow_other_model):
            results = {name: probe(model, tok) for name, probe in probes.items()}
            rows = (
                Samples(sample_prompts, max_new_tokens=sampling.max_new_tokens)(model, tok).rows
                if sample_prompts
                else []
            )
        row = None
        if filt is not None:  # generate steers inside the call; the filter then scores unsteered
            outs = generate(
                model,
                tok,
                gen_prompts,
                steering=vec,
                coeff=c,
                sampling=sampling,
                seed=seed,
                allow_other_model=allow_other_model,
            )
            row = FilterReport.from_verdicts(outs, filt(outs)).rows[0].to_dict()
        points.append(SweepPoint(c, results, row, [{"prompt": r["prompt"], "text": r["text"]} for r in rows]))
    return points


def _coherence(point: SweepPoint) -> float:
    """The lowest 7-way coherence over the probes that report one (the log-odds probe does not)."""
    value = min_coherence(point.results.values())
    if value is None:
        raise InputError("the sweep has no probe that reports coherence; add a vignette probe")
    return value


def operating_dose(points: Sequence[SweepPoint], coherence_floor: float = 0.95) -> float:
    """The largest coefficient whose coherence is >= coherence_floor x the coherence at c = 0."""
    floor = coherence_floor
    if not 0 < floor <= 1:
        raise InputError(f"coherence_floor is a fraction of the unsteered coherence in (0, 1], got {floor}")
    reference = next((p for p in points if p.coeff == 0.0), None)
    if reference is None:
        raise InputError("the sweep has no c = 0 point to compare coherence with")
    ok = [p.coeff for p in points if _coherence(p) >= floor * _coherence(reference)]
    return max(ok)


def profile_table(points: Sequence[SweepPoint], probe: str) -> str:
    """One row per dose: all foundations in nats, coherence, and the filter's row if any."""
    short = [f.split()[0] for f in FOUNDATIONS]
    head = ["coeff", *short, "coherence", "unscorable", "label bias", "kept %", "mean ppl", "drops"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * (len(head) - 1) + "---|"]
    for p in sorted(points, key=lambda p: p.coeff):
        m = p.results[probe].metrics
        cells = [
            f"{p.coeff:g}",
            *(f"{m[f'{foundation_key(f)}_nats']:.3f}" for f in FOUNDATIONS),
            f"{m['coherence']:.3f}",
            f"{m['frac_unscorable']:.2f}",
            f"{m.get('label_bias', float('nan')):.3f}",
        ]
        f = p.filter
        if f:
            ppl = "-" if f.get("mean_ppl") is None else f"{f['mean_ppl']:.1f}"
            drops = ", ".join(f"{k} {v}" for k, v in f["drops"].items()) or "-"
            cells += [f"{100 * f['kept'] / f['n']:.0f}", ppl, drops]
        else:
            cells += ["-", "-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep_report(points: Sequence[SweepPoint], target: str, direction: int, coherence_floor: float = 0.95) -> str:
    """Markdown: per probe the profile and the paired stage table vs c = 0; then samples."""
    stages = {p.coeff: p for p in sorted(points, key=lambda p: p.coeff)}
    floor = coherence_floor
    parts = [f"Operating dose (coherence >= {floor:g} x unsteered): c = {operating_dose(points, floor):g}"]
    for probe in sorted(points[0].results, key=lambda name: name != "logodds"):
        named = {("base" if c == 0.0 else f"c={c:g}"): p.results[probe] for c, p in stages.items()}
        if "stance" in points[0].results[probe].metrics:  # the answer log-odds probe
            parts.append(f"### {probe}: stance, wording and off-axis shifts vs c = 0 (paired)\n\n{shift_table(named)}")
            continue
        parts.append(f"### {probe}: profile (nats) and filter\n\n{profile_table(points, probe)}")
        parts.append(
            f"### {probe}: {target} vs c = 0 (paired)\n\n"
            f"{stage_table(named, base='base', steered=None, target=target, direction=direction)}"
        )
    if any(p.samples for p in points):
        rows = [
            f"#### c = {p.coeff:g}\n\n"
            + "\n\n".join(f"> **{s['prompt']}**\n\n{s['text'].strip() or '(empty)'}" for s in p.samples)
            for p in stages.values()
        ]
        parts.append("### Greedy samples\n\n" + "\n\n".join(rows))
    return "\n\n".join(parts) + "\n"
