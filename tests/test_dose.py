"""Dose control on a tiny model: the bisection is exact when the filter's rule is known."""

from __future__ import annotations

import math

import pytest
import torch

from steer_heal.filters import Verdict, dose
from steer_heal.filters.dose import Collection, DoseError, DoseResult, bisection_levels, collect, walk_dose
from steer_heal.sampling import Sampling
from steer_heal.steering.vector import SteeringVector

POOL = [f"Question number {i}: should I follow the rule?" for i in range(7)]
FAST = dict(sampling=Sampling(do_sample=True, max_new_tokens=2, batch_size=4))


class KeepBelow:
    """Keeps completions made at coefficients <= `threshold` (and records what it saw), so
    the dose search's answer is known exactly without looking at the text."""

    def __init__(self, threshold: float, fraction_above: float = 0.0) -> None:
        self.threshold, self.fraction_above = threshold, fraction_above
        self.prompts: list[str] = []
        self.calls = 0

    def __call__(self, completions):
        self.calls += 1
        self.prompts += [c.prompt for c in completions]
        above = [c.coeff > self.threshold for c in completions]
        # above the threshold keep the first `fraction_above` share of the batch
        n_above = round(self.fraction_above * sum(above))
        verdicts, seen = [], 0
        for c, up in zip(completions, above):
            keep = not up or seen < n_above
            seen += up
            verdicts.append(Verdict(keep, {"coeff": float(c.coeff)}, [] if keep else ["dose: too strong"]))
        return verdicts


@pytest.fixture
def steered(llama):
    model, tok = llama
    vec = SteeringVector({1: torch.randn(64, generator=torch.Generator().manual_seed(0))}, hidden_size=64, n_layers=4)
    return model, tok, vec


def test_bisection_is_exact_in_log_space(steered):
    model, tok, vec = steered
    result = walk_dose(model, tok, vec, POOL, KeepBelow(1.3), c_min=0.25, c_max=4.0, steps=4, probe_size=4, **FAST)
    # 0.25 passes, 4 fails; then sqrt(0.25*4)=1 pass, sqrt(1*4)=2 fail, sqrt(2) fail, 2**0.25 pass
    assert [p.coeff for p in result.probes] == pytest.approx([0.25, 4.0, 1.0, 2.0, 2**0.5, 2**0.25])
    assert [p.passed for p in result.probes] == [True, False, True, False, False, True]
    assert isinstance(result, DoseResult) and result.coeff == pytest.approx(2**0.25)
    # the answer brackets the true threshold within one final interval
    assert result.coeff <= 1.3 < result.coeff * (4.0 / 0.25) ** (1 / 2**4)
    assert result.probes[1].report.rows[0].drops == {"dose": 4}
    assert "dose: 1.189" in result.table() and len(result.to_dict()["probes"]) == 6


def test_target_is_inclusive_and_c_max_can_win(steered):
    model, tok, vec = steered
    half = KeepBelow(1.0, fraction_above=0.5)  # above 1.0 exactly half of each probe survives
    assert walk_dose(model, tok, vec, POOL, half, target=0.5, c_max=8, steps=3, probe_size=4, **FAST).coeff == 8.0
    strict = walk_dose(model, tok, vec, POOL, half, target=0.75, c_min=0.5, c_max=8, steps=2, probe_size=4, **FAST)
    assert [p.coeff for p in strict.probes] == pytest.approx([0.5, 8.0, 2.0, 1.0])
    assert strict.coeff == pytest.approx(1.0)
    ceiling = walk_dose(model, tok, vec, POOL, KeepBelow(100.0), c_max=4, probe_size=4, **FAST)
    assert ceiling.coeff == 4.0 and len(ceiling.probes) == 2


def test_probes_rotate_through_the_whole_pool(steered):
    model, tok, vec = steered
    flt = KeepBelow(1.3)
    walk_dose(model, tok, vec, POOL, flt, steps=4, probe_size=3, **FAST)  # 6 probes x 3 = 18 prompts
    assert flt.prompts == [POOL[i % len(POOL)] for i in range(18)]


def test_nothing_passes_at_c_min(steered):
    model, tok, vec = steered
    with pytest.raises(DoseError, match=r"no dose passes: at c_min=0.25 only 0/4 completions were kept .*dose 4"):
        walk_dose(model, tok, vec, POOL, KeepBelow(0.1), probe_size=4, **FAST)


class DropPrompts(KeepBelow):
    """KeepBelow that also drops every completion of the prompts in `bad`, at any coefficient."""

    def __init__(self, threshold: float, bad: set[str]) -> None:
        super().__init__(threshold)
        self.bad = bad

    def __call__(self, completions):
        verdicts = super().__call__(completions)
        return [
            Verdict(False, v.scores, ["prompt"]) if c.prompt in self.bad else v for c, v in zip(completions, verdicts)
        ]


@pytest.mark.parametrize("speculative", [False, True])
def test_confirm_pools_more_probes_at_c_min(steered, speculative):
    model, tok, vec = steered
    walk = dict(c_min=0.25, c_max=4.0, steps=2, probe_size=4, target=0.8, speculative=speculative, **FAST)
    # c_min's probe takes POOL[0:4] and keeps 3/4 < 0.8: without confirmation the walk ends there
    with pytest.raises(DoseError, match=r"only 3/4 completions were kept \(target 0.8\)"):
        walk_dose(model, tok, vec, POOL, DropPrompts(1.3, {POOL[0]}), **walk)
    flt = DropPrompts(1.3, {POOL[0]})
    result = walk_dose(model, tok, vec, POOL, flt, confirm=2, **walk)
    first = result.probes[0]
    # two more probes at c_min on walk positions 1 and 2's prompts (POOL[4,5,6,0], POOL[1:5]): 10 of 12 kept
    assert (first.coeff, first.kept, first.n, first.passed) == (0.25, 10, 12, True)
    assert "kept 10/12 >= target 0.8" in first.why and "the first probe's 3/4 and 2 more at c_min" in first.why
    assert first.report.rows[0].n == 12
    # from the pooled pass the walk goes on as from a single probe's: 4 fails, 1 passes, 2 fails
    assert [p.coeff for p in result.probes] == pytest.approx([0.25, 4.0, 1.0, 2.0])
    assert result.coeff == pytest.approx(1.0)
    if not speculative:  # the sequential walk filters in probe order: c_min, its confirmations, then c_max
        assert flt.prompts[:12] == POOL[0:4] + [POOL[4], POOL[5], POOL[6], POOL[0]] + POOL[1:5]
    # pooled, a real failure still fails: 8 of 12 kept
    with pytest.raises(DoseError, match=r"only 8/12 completions were kept \(target 0.8\).*3/4 and 2 more"):
        walk_dose(model, tok, vec, POOL, DropPrompts(1.3, {POOL[0], POOL[4]}), confirm=2, **walk)
    # a passing c_min needs no confirmation: nothing more is generated
    once = KeepBelow(1.3)
    plain = walk_dose(model, tok, vec, POOL, once, confirm=2, **{**walk, "target": 0.75})
    assert plain.probes[0].n == 4 and [p.coeff for p in plain.probes] == pytest.approx([0.25, 4.0, 1.0, 2.0])
    with pytest.raises(ValueError, match=r"confirm is a number of extra probes at c_min \(>= 0\), got -1"):
        walk_dose(model, tok, vec, POOL, once, confirm=-1)


def test_collect_until_n_keep(steered):
    model, tok, vec = steered
    flt = KeepBelow(1.5)  # keeps 1.0x, drops 2.0x
    got = collect(model, tok, vec, POOL, flt, coeff=1.0, multiples=(1.0, 2.0), n_keep=6, max_batches=10, **FAST)
    assert isinstance(got, Collection)
    # each batch: 4 prompts at 1.0 (kept) and 4 at 2.0 (dropped); 6 survivors need 2 batches
    assert flt.calls == 2 and len(got.completions) == len(got.verdicts) == 16
    assert len(got.kept) == 6 and all(c.coeff == 1.0 for c in got.kept)
    assert [r.coeff for r in got.report.rows] == [1.0, 2.0]
    assert got.report.row(1.0).kept_fraction == 1.0 and got.report.row(2).kept == 0
    assert [c.prompt for c in got.completions[:4]] == POOL[:4] and got.completions[8].prompt == POOL[4]
    capped = collect(model, tok, vec, POOL, KeepBelow(1.5), coeff=1.0, n_keep=100, max_batches=2, **FAST)
    assert len(capped.kept) == 8  # the batch cap ends it
    with pytest.raises(DoseError, match=r"only 0 of 8 completions survived .* after 2 batches \(min_keep=3\)"):
        collect(model, tok, vec, POOL, KeepBelow(0.5), coeff=1.0, n_keep=10, max_batches=2, min_keep=3, **FAST)


def test_bad_input(steered):
    model, tok, vec = steered
    flt = KeepBelow(1.0)
    with pytest.raises(ValueError, match="prompts is empty"):
        walk_dose(model, tok, vec, [], flt)
    with pytest.raises(ValueError, match="prompts is empty"):
        collect(model, tok, vec, [], flt, coeff=1.0)
    for target in [0.0, -0.5, 1.01, math.nan]:
        with pytest.raises(ValueError, match=r"target kept fraction must be in \(0, 1\]"):
            walk_dose(model, tok, vec, POOL, flt, target=target)
    for c_min, c_max in [(1.0, 1.0), (2.0, 1.0), (0.0, 1.0), (-1.0, 1.0), (0.5, math.inf)]:
        with pytest.raises(ValueError, match="need 0 < c_min < c_max"):
            walk_dose(model, tok, vec, POOL, flt, c_min=c_min, c_max=c_max)
    with pytest.raises(ValueError, match="steps must be >= 0"):
        walk_dose(model, tok, vec, POOL, flt, steps=-1)
    with pytest.raises(ValueError, match="multiples"):
        collect(model, tok, vec, POOL, flt, coeff=1.0, multiples=())
    with pytest.raises(ValueError, match="multiples"):
        collect(model, tok, vec, POOL, flt, coeff=1.0, multiples=(1.0, -2.0))
    with pytest.raises(ValueError, match="1 <= min_keep <= n_keep"):
        collect(model, tok, vec, POOL, flt, coeff=1.0, n_keep=4, min_keep=5)
    with pytest.raises(ValueError, match="coeff must be finite"):
        collect(model, tok, vec, POOL, flt, coeff=math.nan)
    with pytest.raises(ValueError, match="returned 0 verdicts"):
        walk_dose(model, tok, vec, POOL, lambda cs: [], probe_size=2, **FAST)


def test_bisection_levels_are_the_walks_coefficients():
    levels = bisection_levels(0.25, 4.0, 2)
    assert levels[:2] == [[0.25], [4.0]]
    assert levels[2] == pytest.approx([1.0]) and levels[3] == pytest.approx([0.5, 2.0])
    assert [len(level) for level in bisection_levels(0.25, 8.0, 4)] == [1, 1, 1, 2, 4, 8]


@pytest.mark.parametrize("threshold", [1.3, 0.3, 3.9, 100.0])
@pytest.mark.parametrize("steps", [0, 2, 4])
def test_speculative_walk_makes_the_sequential_decisions(steered, threshold, steps):
    model, tok, vec = steered
    kw = dict(c_min=0.25, c_max=4.0, steps=steps, probe_size=3, **FAST)
    seq, spec = KeepBelow(threshold), KeepBelow(threshold)
    one = walk_dose(model, tok, vec, POOL, seq, **kw)
    two = walk_dose(model, tok, vec, POOL, spec, speculative=True, **kw)
    assert spec.calls == 1  # every probe decoded and judged in one batch
    assert len(spec.prompts) == 3 * (2**steps + 1)
    assert two.coeff == one.coeff
    assert [(p.coeff, p.kept, p.passed, p.why) for p in two.probes] == [
        (p.coeff, p.kept, p.passed, p.why) for p in one.probes
    ]
    # every candidate at a position saw the prompts that position takes in the sequential walk
    levels = bisection_levels(0.25, 4.0, steps)
    expected = [POOL[(k * 3 + j) % len(POOL)] for k, level in enumerate(levels) for _ in level for j in range(3)]
    assert spec.prompts == expected
    assert seq.prompts == [POOL[i % len(POOL)] for i in range(3 * len(one.probes))]


def test_speculative_walk_in_several_batches(steered, monkeypatch):
    """A plan larger than SPECULATIVE_ROWS decodes in several batches, with the same decisions."""
    model, tok, vec = steered
    kw = dict(c_min=0.25, c_max=4.0, steps=3, probe_size=3, **FAST)
    one = walk_dose(model, tok, vec, POOL, KeepBelow(1.3), **kw)
    monkeypatch.setattr(dose, "SPECULATIVE_ROWS", 5)  # 9 probes x 3 rows = 27 rows: 6 batches
    two = walk_dose(model, tok, vec, POOL, KeepBelow(1.3), speculative=True, **kw)
    assert [(p.coeff, p.passed) for p in two.probes] == [(p.coeff, p.passed) for p in one.probes]
    assert two.coeff == one.coeff


def test_speculative_walk_refuses_like_the_sequential_one(steered):
    model, tok, vec = steered
    with pytest.raises(DoseError, match=r"no dose passes: at c_min=0.25 only 0/4 completions were kept"):
        walk_dose(model, tok, vec, POOL, KeepBelow(0.1), probe_size=4, speculative=True, **FAST)
    with pytest.raises(ValueError, match="speculative walk decodes eager"):
        walk_dose(model, tok, vec, POOL, KeepBelow(1.0), speculative=True, compiled=True, **FAST)
