"""FilterReport: what a filter kept and dropped, per steering coefficient.

For the completions generated at coefficient c (n of them, `kept` surviving):

    kept_fraction = kept / n
    mean_ppl      = mean of the finite tail perplexities (`n_inf` counts the rest:
                    empty completions score inf)
    median_ppl    = median over all n (inf included, so it is honest about empties)
    drops[r]      = number of completions with at least one reason from filter r; a
                    completion dropped by two filters counts under both (overlapping)

`just_kept` are the kept completions with the highest perplexity and `just_dropped` the
completions dropped for perplexity with the lowest: the samples either side of the
threshold, to eyeball whether tau sits in the right place.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from ..errors import InputError, NotFound
from ..steering.generation import Completion
from ..vocab import Number
from .base import Verdict
from .calibrated import Calibration
from .perplexity import PPL

MODEL_FILTERS = ("perplexity", "calibrated")  # the filters that score under the original model


def _num(x: float | None) -> float | None:
    """JSON-safe: inf/NaN become None (json.dumps would write the non-standard Infinity)."""
    return None if x is None or not math.isfinite(x) else x


@dataclass(frozen=True)
class Sample:
    prompt: str
    text: str
    ppl: float | None
    reasons: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "text": self.text, "ppl": _num(self.ppl), "reasons": list(self.reasons)}


@dataclass(frozen=True)
class CoeffStats:
    coeff: float
    n: int
    kept: int
    mean_ppl: float | None  # None when no filter scored perplexity
    median_ppl: float | None
    n_inf: int
    drops: dict[str, int]
    just_kept: tuple[Sample, ...]
    just_dropped: tuple[Sample, ...]

    @property
    def kept_fraction(self) -> float:
        return self.kept / self.n

    def to_dict(self) -> dict:
        return {
            "coeff": self.coeff,
            "n": self.n,
            "kept": self.kept,
            "kept_fraction": self.kept_fraction,
            "mean_ppl": _num(self.mean_ppl),
            "median_ppl": _num(self.median_ppl),
            "n_inf_ppl": self.n_inf,
            "drops": dict(self.drops),
            "just_kept": [s.to_dict() for s in self.just_kept],
            "just_dropped": [s.to_dict() for s in self.just_dropped],
        }


def _stats(coeff: float, pairs: list[tuple[Completion, Verdict]], samples: int) -> CoeffStats:
    ppls = [v.scores[PPL] for _, v in pairs if PPL in v.scores]
    finite = [p for p in ppls if math.isfinite(p)]
    drops = Counter(name for _, v in pairs for name in {r.filter for r in v.reasons})

    def sample(c: Completion, v: Verdict) -> Sample:
        return Sample(c.prompt, c.text, v.scores.get(PPL), tuple(v.reasons))

    kept_ppl = sorted(((c, v) for c, v in pairs if v.keep and PPL in v.scores), key=lambda cv: -cv[1].scores[PPL])
    over = sorted(
        ((c, v) for c, v in pairs if any(r.filter in MODEL_FILTERS for r in v.reasons)),
        key=lambda cv: cv[1].scores[PPL],
    )
    return CoeffStats(
        coeff=coeff,
        n=len(pairs),
        kept=sum(v.keep for _, v in pairs),
        mean_ppl=statistics.fmean(finite) if finite else (math.inf if ppls else None),
        median_ppl=statistics.median(ppls) if ppls else None,
        n_inf=len(ppls) - len(finite),
        drops=dict(sorted(drops.items())),
        just_kept=tuple(sample(c, v) for c, v in kept_ppl[:samples]),
        just_dropped=tuple(sample(c, v) for c, v in over[:samples]),
    )


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return "inf" if math.isinf(x) else f"{x:.1f}"


@dataclass(frozen=True)
class FilterReport:
    """Per-coefficient statistics of one filter run (rows sorted by coefficient)."""

    rows: tuple[CoeffStats, ...]
    calibration: Calibration | None = None  # the thresholds of a calibrated filter, shown with the table

    @classmethod
    def from_verdicts(
        cls,
        completions: Sequence[Completion],
        verdicts: Sequence[Verdict],
        samples: int = 2,
        calibration: Calibration | None = None,
    ) -> FilterReport:
        if len(completions) == 0:
            raise InputError("no completions to report on; filter some first")
        if len(completions) != len(verdicts):
            raise InputError(f"{len(completions)} completions but {len(verdicts)} verdicts; pass one verdict each")
        groups: dict[float, list[tuple[Completion, Verdict]]] = {}
        for c, v in zip(completions, verdicts):
            groups.setdefault(float(c.coeff), []).append((c, v))
        rows = tuple(_stats(coeff, pairs, samples) for coeff, pairs in sorted(groups.items()))
        return cls(rows, calibration)

    def row(self, coeff: Number) -> CoeffStats:
        for r in self.rows:
            if math.isclose(r.coeff, coeff, rel_tol=1e-9, abs_tol=1e-12):
                return r
        raise NotFound(f"no completions at coeff {coeff}; have {[r.coeff for r in self.rows]}")

    @property
    def kept_fraction(self) -> float:
        """Over all coefficients together."""
        return sum(r.kept for r in self.rows) / sum(r.n for r in self.rows)

    def table(self, fmt: Literal["markdown", "plain"] = "markdown", samples: bool = False) -> str:
        """One line per coefficient; with `samples`, the texts either side of the ppl threshold."""
        if fmt not in ("markdown", "plain"):
            raise InputError(f"fmt must be 'markdown' or 'plain', got {fmt!r}")
        head = ["coeff", "n", "kept", "kept %", "mean ppl", "median ppl", "inf ppl", "drops (overlapping)"]
        lines = [
            [
                f"{r.coeff:g}",
                str(r.n),
                str(r.kept),
                f"{100 * r.kept_fraction:.0f}",
                _fmt(r.mean_ppl),
                _fmt(r.median_ppl),
                str(r.n_inf),
                ", ".join(f"{k} {v}" for k, v in r.drops.items()) or "-",
            ]
            for r in self.rows
        ]
        if fmt == "markdown":
            out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
            out += ["| " + " | ".join(cells) + " |" for cells in lines]
        else:
            widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(head)]
            out = ["  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in [head, *lines]]
        if samples:
            for r in self.rows:
                for label, group in (("just kept", r.just_kept), ("just dropped", r.just_dropped)):
                    for s in group:
                        text = " ".join(s.text.split())[:160]
                        out.append(f"c={r.coeff:g} {label} (ppl {_fmt(s.ppl)}): {text}")
        if self.calibration is not None:
            out.append(self.calibration.describe())
        return "\n".join(out)

    def to_dict(self) -> dict:
        out = {"kept_fraction": self.kept_fraction, "rows": [r.to_dict() for r in self.rows]}
        if self.calibration is not None:
            out["calibration"] = self.calibration.to_dict()
        return out
