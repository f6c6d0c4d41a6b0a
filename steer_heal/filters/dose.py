"""Dose control ("walk-C"): the largest steering coefficient whose output mostly survives.

Kept fraction on a probe batch at coefficient c:  f(c) = kept(c) / probe_size. It falls
as c grows (steering injects incoherence), so we bisect in log space for

    c* = max { c in [c_min, c_max] : f(c) >= target }

Probe c_min (must pass, else `DoseError`: there is nothing to train on), then c_max (if it
passes, it is the answer), then `steps` times  m = sqrt(lo * hi);  f(m) >= target ? lo = m
: hi = m. The result is the last passing probe `lo`, within a factor
(c_max / c_min) ** (1 / 2**steps) of the crossing. Log space because the useful doses span
orders of magnitude and incoherence grows roughly with log c. Each probe takes the next
`probe_size` prompts of the pool (rotating), so probes do not all see the same prompts,
and a fresh sampling seed. f is noisy, so the answer is a sample, not a guarantee:
`collect` then generates at c* (optionally at a few multiples) and filters until `n_keep`
completions survive.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from torch import nn

from ..errors import DoseError, InputError
from ..sampling import SAMPLED, Sampling
from ..shards import map_batches, width
from ..steering.generation import Completion, generate
from ..steering.slot import SteeringSlot
from ..steering.vector import SteeringVector
from ..vocab import Number, SteerHow
from .base import FilterLike, Verdict
from .calibrated import Calibration
from .report import FilterReport

__all__ = ["Collection", "DoseError", "DoseResult", "Probe", "bisection_levels", "collect", "walk_dose"]


@dataclass(frozen=True)
class Probe:
    coeff: float
    kept: int
    n: int
    passed: bool
    report: FilterReport
    coherence: float | None = None  # share within the calibrated thresholds (None: no calibration)
    why: str = ""  # why the probe was accepted or refused

    @property
    def kept_fraction(self) -> float:
        return self.kept / self.n


@dataclass(frozen=True)
class DoseResult:
    coeff: float  # the largest passing probe
    target: Number
    probes: tuple[Probe, ...]  # in the order they ran

    def table(self) -> str:
        lines = ["| probe | coeff | kept | kept % | coherence | pass | why |", "|---|---|---|---|---|---|---|"]
        for i, p in enumerate(self.probes):
            coherence = "-" if p.coherence is None else f"{p.coherence:.2f}"
            lines.append(
                f"| {i} | {p.coeff:.4g} | {p.kept}/{p.n} | {100 * p.kept_fraction:.0f} | {coherence} "
                f"| {'yes' if p.passed else 'no'} | {p.why} |"
            )
        lines.append(f"dose: {self.coeff:.4g} (target kept fraction {self.target:g})")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "coeff": self.coeff,
            "target": self.target,
            "probes": [
                {
                    "coeff": p.coeff,
                    "kept": p.kept,
                    "n": p.n,
                    "passed": p.passed,
                    "coherence": p.coherence,
                    "why": p.why,
                    "report": p.report.to_dict(),
                }
                for p in self.probes
            ],
        }


@dataclass(frozen=True)
class Collection:
    kept: list[Completion]  # the first n_keep survivors, in generation order
    completions: list[Completion]  # everything generated
    verdicts: list[Verdict]  # one per completion
    report: FilterReport  # per coefficient


def _check_prompts(prompts: Sequence[str]) -> None:
    if len(prompts) == 0:
        raise InputError("prompts is empty; pass a pool of user messages to generate from")


# rows a speculative walk decodes together: the full preset's 17 probes x 8 fit in one batch;
# larger plans (more steps, bigger probes) go in several, so the KV cache stays bounded
SPECULATIVE_ROWS = 256


class _Sampler:
    """Steered sampling for a walk or a collection. Eager: `generate` applies the vector per
    call. Compiled: one `SteeringSlot` is installed for the whole walk and rewritten per
    coefficient, so the compiled decoding graph is traced once, not once per dose."""

    def __init__(self, model: nn.Module, tok, vector: SteeringVector, settings: dict, compiled: bool) -> None:
        self.model, self.tok, self.vector, self.settings, self.compiled = model, tok, vector, settings, compiled
        self._slot: SteeringSlot | None = None

    def __enter__(self) -> _Sampler:
        if self.compiled:
            self._slot = SteeringSlot(self.model, self.vector.layers).__enter__()
        return self

    def __exit__(self, *exc) -> None:
        slot, self._slot = self._slot, None
        if slot is not None:
            slot.__exit__(*exc)

    def rows(self, prompts: list[str], coeffs: list[float], seed: int) -> list[Completion]:
        """One eager call, prompt i steered at coeffs[i], in batches of up to SPECULATIVE_ROWS."""
        batch = min(len(prompts), max(SPECULATIVE_ROWS, self.settings["sampling"].batch_size))
        settings = {**self.settings, "sampling": replace(self.settings["sampling"], batch_size=batch)}
        return generate(
            self.model, self.tok, prompts, steering=self.vector, coeff=coeffs, seed=seed, progress=False, **settings
        )

    def __call__(self, prompts: list[str], coeff: float, seed: int) -> list[Completion]:
        if self._slot is None:
            return generate(
                self.model,
                self.tok,
                prompts,
                steering=self.vector,
                coeff=coeff,
                seed=seed,
                progress=False,
                **self.settings,
            )
        settings = {k: v for k, v in self.settings.items() if k != "how"}  # a slot steers by hooks
        self._slot.set(self.vector, coeff)
        try:
            return generate(self.model, self.tok, prompts, seed=seed, progress=False, compiled=True, **settings)
        finally:
            self._slot.set(None)  # idle (adds exactly zero): the filter scores the unsteered model


def _filter(flt: FilterLike, completions: list[Completion]) -> list[Verdict]:
    verdicts = flt(completions)
    if len(verdicts) != len(completions):
        raise InputError(f"filter {flt!r} returned {len(verdicts)} verdicts for {len(completions)} completions")
    return verdicts


def _mid(lo: float, hi: float) -> float:
    return math.exp(0.5 * (math.log(lo) + math.log(hi)))


def bisection_levels(c_min: float, c_max: float, steps: int) -> list[list[float]]:
    """Every coefficient a walk can probe, by position: [c_min], [c_max], then the 2**d
    midpoints the d-th bisection step may take, computed as the walk computes them (so a
    speculative walk's lookups match its coefficients exactly)."""
    levels, intervals = [[c_min], [c_max]], [(c_min, c_max)]
    for _ in range(steps):
        mids = [_mid(lo, hi) for lo, hi in intervals]
        levels.append(mids)
        intervals = [part for (lo, hi), mid in zip(intervals, mids) for part in ((lo, mid), (mid, hi))]
    return levels


def _upcoming(
    key: tuple[int, float], lo: float, hi: float, c_min: float, c_max: float, steps: int, n: int
) -> list[tuple[int, float]]:
    """Probe `key` and the probes that may follow it, breadth first, `n` at most: the walk's
    tree from here (c_min, then c_max, then each bisection step's two possible midpoints).
    With n processes the walk decodes the next probes of both outcomes at once; the one it
    takes is the probe a single process would have decoded."""
    out, frontier = [], [(key, lo, hi)]
    while frontier and len(out) < n:
        ((index, coeff), a, b), frontier = frontier[0], frontier[1:]
        out.append((index, coeff))
        if index == 0:  # c_min: a failure ends the walk, a pass goes on to c_max
            frontier.append(((1, c_max), c_min, c_max))
        elif index == 1:  # c_max: a pass ends the walk, a failure starts the bisection
            if steps > 0:
                frontier.append(((2, _mid(c_min, c_max)), c_min, c_max))
        elif index - 1 < steps:  # bisection step index - 2 probed `coeff`, the midpoint of [a, b]
            frontier.append(((index + 1, _mid(coeff, b)), coeff, b))  # passed: lo = coeff
            frontier.append(((index + 1, _mid(a, coeff)), a, coeff))  # failed: hi = coeff
    return out


def walk_dose(
    model: nn.Module,
    tok,
    vector: SteeringVector,
    prompts: Sequence[str],
    filter: FilterLike,
    target: Number = 0.75,
    c_min: Number = 0.25,
    c_max: Number = 4.0,
    steps: int = 4,
    probe_size: int = 16,
    sampling: Sampling = SAMPLED,
    system: str | None = None,
    how: SteerHow = "hooks",
    seed: int = 0,
    calibration: Calibration | None = None,
    coherence_floor: Number = 0.9,
    compiled: bool = False,
    speculative: bool = False,
    confirm: int = 0,
) -> DoseResult:
    """Bisect (log space) for the largest coefficient whose probe kept fraction >= target.

    `filter` should score perplexity under the ORIGINAL model: generation steers `model`
    only inside each `generate` call, so filtering the same model afterwards is unsteered.
    With a `calibration` (the filter's thresholds, `filters.calibrate`), a probe passes only
    if also its coherence, the share of the batch within the calibrated thresholds, is at
    least `coherence_floor` x the unsteered completions' own: the kept fraction alone lets
    a walk climb into word salad that the text rules pass. `compiled=True` decodes with a
    static cache through one `SteeringSlot` for the whole walk (GPU; see `generate`).

    `speculative=True` decodes every probe the bisection could ask for at once, in one
    batch with per-row coefficients (`generate`), then walks the same tree over the
    answers: c_min, c_max and the 2**d midpoints of depth d, each on the prompts its
    position in the walk would take, 2**steps + 1 probes in all (17 x probe_size rows at
    steps = 4) instead of steps + 2 in sequence. The same decisions on the same prompts;
    the sampled tokens differ from a sequential walk's, since the rows share one batch
    and seed. Worth it where a batch costs about what one row costs (a GPU decoding a
    model that leaves it idle between kernels); eager decoding only.

    `confirm=k`: a failure at c_min ends a loop, so it is decided on more evidence than the
    walk's other steps. When the c_min probe fails, k more probes at c_min run on the
    prompts that follow the walk's own (fresh seeds), and c_min is judged on all
    (1 + k) x probe_size completions pooled, by the same two rules. Why: a probe of 16 lets
    one failure through the default coherence floor (0.9), and a model that fails 5 % of
    its completions fails two of 16 about one time in five; pooled over 64, such a model
    passes (expected 0.95), while one failing a quarter of its text still fails (0.75).
    The walk goes on from the pooled answer exactly as from a single probe's; the result's
    first probe is the pooled one.
    """
    _check_prompts(prompts)
    target = float(target)
    if not 0.0 < target <= 1.0:
        raise InputError(f"target kept fraction must be in (0, 1], got {target}")
    c_min, c_max = float(c_min), float(c_max)
    if not (math.isfinite(c_min) and math.isfinite(c_max) and 0.0 < c_min < c_max):
        raise InputError(
            f"need 0 < c_min < c_max (finite; the search is in log space), got c_min={c_min}, c_max={c_max}"
        )
    coherence_floor = float(coherence_floor)
    if not 0 <= coherence_floor <= 1:
        raise InputError(f"coherence_floor is a fraction of the unsteered coherence in [0, 1], got {coherence_floor}")
    if steps < 0 or probe_size < 1:
        raise InputError(f"steps must be >= 0 and probe_size >= 1, got {steps} and {probe_size}")
    if confirm < 0:
        raise InputError(f"confirm is a number of extra probes at c_min (>= 0), got {confirm}")
    settings = dict(sampling=sampling, system=system, how=how)
    # generate seeds batch b with seed + b: space the probes so no two batches share a seed
    seeds_per_probe = math.ceil(probe_size / sampling.batch_size)
    if speculative and compiled:
        raise InputError("a speculative walk decodes eager (per-row coefficients); pass compiled=False")
    probes: list[Probe] = []
    ahead: dict[tuple[int, float], tuple[list[Completion], list[Verdict]]] = {}

    def prompts_of(index: int) -> list[str]:  # probe `index` of the walk takes the next probe_size prompts
        return [prompts[(index * probe_size + j) % len(prompts)] for j in range(probe_size)]

    def judged(key: tuple[int, float]) -> tuple[list[Completion], list[Verdict]]:
        index, coeff = key  # probe `index` of the walk: its prompts and seed follow from its position
        completions = sample(prompts_of(index), coeff, seed + index * seeds_per_probe)
        return completions, _filter(filter, completions)

    def decide(coeff: float, completions: list[Completion], verdicts: list[Verdict], note: str = "") -> Probe:
        n = len(completions)
        kept = sum(v.keep for v in verdicts)
        passed = kept / n >= target
        why = [
            f"kept {kept}/{n} >= target {target:g}"
            if passed
            else f"only {kept}/{n} completions were kept (target {target:g})"
        ]
        coherence = None
        if calibration is not None:
            coherence = calibration.coherence(verdicts)
            needed = coherence_floor * calibration.unsteered_coherence
            ok = coherence >= needed
            why.append(
                f"coherence {coherence:.2f} {'>=' if ok else '<'} {coherence_floor:g} x unsteered "
                f"{calibration.unsteered_coherence:.2f} = {needed:.2f}"
            )
            passed = passed and ok
        report = FilterReport.from_verdicts(completions, verdicts, calibration=calibration)
        return Probe(coeff, kept, n, passed, report, coherence, "; ".join(why) + note)

    def probe(coeff: float, lo: float, hi: float) -> Probe:
        key = (len(probes), coeff)
        if key not in ahead:  # this probe, and as many of the ones that may follow as run at once
            keys = _upcoming(key, lo, hi, c_min, c_max, steps, width())
            for k, answer in zip(keys, map_batches(lambda i: judged(keys[i]), len(keys))):
                ahead[k] = answer
        result = decide(coeff, *ahead[key])
        probes.append(result)
        return result

    def confirmed(first: Probe) -> Probe:
        """c_min failed: `confirm` more probes there, pooled with the first. Each takes the prompts
        of walk position 1 + j (the ones after c_min's own) and a seed past every walk position's."""

        def more(j: int) -> tuple[list[Completion], list[Verdict]]:
            completions = sample(prompts_of(1 + j), c_min, seed + (steps + 2 + j) * seeds_per_probe)
            return completions, _filter(filter, completions)

        completions, verdicts = list(ahead[(0, c_min)][0]), list(ahead[(0, c_min)][1])
        for made, judgements in map_batches(more, confirm):
            completions += made
            verdicts += judgements
        note = f" (pooled: the first probe's {first.kept}/{first.n} and {confirm} more at c_min)"
        probes[0] = decide(c_min, completions, verdicts, note)
        return probes[0]

    with _Sampler(model, tok, vector, settings, compiled) as sample:
        if speculative:
            plan = [(index, c) for index, level in enumerate(bisection_levels(c_min, c_max, steps)) for c in level]
            rows = [p for index, _ in plan for p in prompts_of(index)]
            made = sample.rows(rows, [c for _, c in plan for _ in range(probe_size)], seed)
            judged = _filter(filter, made)  # one call: the perplexity forward is batched
            for k, key in enumerate(plan):
                part = slice(k * probe_size, (k + 1) * probe_size)
                ahead[key] = (made[part], judged[part])
        first = probe(c_min, c_min, c_max)
        if not first.passed and confirm:
            first = confirmed(first)
        if not first.passed:
            drops = ", ".join(f"{k} {v}" for k, v in first.report.rows[0].drops.items()) or "none"
            raise DoseError(
                f"no dose passes: at c_min={c_min:g} {first.why} (drops: {drops}); lower c_min, lower the target "
                "or loosen the filter"
            )
        if probe(c_max, c_min, c_max).passed:
            return DoseResult(c_max, target, tuple(probes))
        lo, hi = c_min, c_max
        for _ in range(steps):
            mid = _mid(lo, hi)
            if probe(mid, lo, hi).passed:
                lo = mid
            else:
                hi = mid
    return DoseResult(lo, target, tuple(probes))


def collect(
    model: nn.Module,
    tok,
    vector: SteeringVector,
    prompts: Sequence[str],
    filter: FilterLike,
    coeff: Number,
    multiples: Sequence[Number] = (1.0,),
    n_keep: int = 64,
    max_batches: int = 32,
    min_keep: int = 1,
    sampling: Sampling = SAMPLED,
    system: str | None = None,
    how: SteerHow = "hooks",
    seed: int = 0,
    calibration: Calibration | None = None,
    compiled: bool = False,
) -> Collection:
    """Generate at `coeff * m` for each multiple, `batch_size` prompts per batch (rotating
    through the pool), filter each batch, stop at `n_keep` survivors or `max_batches`.
    `compiled=True`: as in `walk_dose`."""
    _check_prompts(prompts)
    coeff = float(coeff)
    if not math.isfinite(coeff):
        raise InputError(f"coeff must be finite, got {coeff}")
    if not multiples or any(not (math.isfinite(m) and m > 0) for m in multiples):
        raise InputError(f"multiples must be a non-empty list of finite numbers > 0, got {list(multiples)}")
    if not 1 <= min_keep <= n_keep or max_batches < 1:
        raise InputError(
            f"need 1 <= min_keep <= n_keep and max_batches >= 1; got min_keep={min_keep}, "
            f"n_keep={n_keep}, max_batches={max_batches}"
        )
    batch_size = sampling.batch_size
    settings = dict(sampling=sampling, system=system, how=how)
    coeffs = [coeff * float(m) for m in multiples]
    completions: list[Completion] = []
    verdicts: list[Verdict] = []
    kept: list[Completion] = []
    batches = 0
    with _Sampler(model, tok, vector, settings, compiled) as sample:

        def one(b: int) -> tuple[list[Completion], list[Verdict]]:
            batch = [prompts[(b * batch_size + j) % len(prompts)] for j in range(batch_size)]
            made: list[Completion] = []
            for j, c in enumerate(coeffs):
                made += sample(batch, c, seed + b * len(coeffs) + j)
            return made, _filter(filter, made)  # one call per batch: the perplexity forward is batched

        while batches < max_batches and len(kept) < n_keep:
            # a wave of as many batches as run at once; keep what one process would have made
            first, wave = batches, min(width(), max_batches - batches)
            for made, judged in map_batches(lambda k, first=first: one(first + k), wave):
                if len(kept) >= n_keep:
                    break
                completions += made
                verdicts += judged
                kept += [c for c, v in zip(made, judged) if v.keep]
                batches += 1
    if len(kept) < min_keep:
        raise DoseError(
            f"only {len(kept)} of {len(completions)} completions survived the filter at coeff "
            f"{', '.join(f'{c:g}' for c in coeffs)} after {batches} batches (min_keep={min_keep}); "
            "lower the dose, raise max_batches or loosen the filter"
        )
    report = FilterReport.from_verdicts(completions, verdicts, calibration=calibration)
    return Collection(kept[:n_keep], completions, verdicts, report)
