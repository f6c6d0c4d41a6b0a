"""Paired stage comparison: deltas, ratios, the verdict order and the markdown table."""

from __future__ import annotations

import math

import pytest
import torch

from steer_heal import SteeringVector
from steer_heal.evaluate import (
    FOUNDATIONS,
    EvalResult,
    Vignettes,
    compare,
    foundation_key,
    load_vignettes,
    stage_table,
    stratified_subset,
)
from steer_heal.models.model import hidden_size, n_layers

META = {"evaluator": "vignettes", "items": "abc", "think_tokens": "32", "protocol": "p1", "system": ""}


def result(name="stage", coherence=0.97, shift=None, **meta) -> EvalResult:
    """A Vignettes-shaped result: uniform profile (log 1/7) plus `shift` nats per foundation."""
    shift = shift or {}
    metrics = {f"{foundation_key(f)}_nats": math.log(1 / 7) + shift.get(f, 0.0) for f in FOUNDATIONS}
    metrics |= {
        "coherence": coherence,
        "frac_unscorable": 0.0,
        "prefill_nll": 1.0,
        "top1_acc": 0.3,
        "n_items": 119.0,
        "think_tokens": 32.0,
        "label_bias": 0.05,
    }
    return EvalResult(name, metrics, meta=META | meta)


BASE = result("base")
STEERED = result("steered", coherence=0.93, shift={"Authority": -0.4, "Care": 0.1})


def test_deltas_ratios_and_ok_verdict():
    healed = result("healed", coherence=0.95, shift={"Authority": -0.2, "Care": 0.05})
    c = compare(BASE, healed, target="Authority", direction=-1, steered=STEERED)
    assert c.deltas["Authority"] == pytest.approx(-0.2) and c.deltas["Care"] == pytest.approx(0.05)
    assert c.retain == pytest.approx(0.5)
    assert c.coh_cost == pytest.approx(0.02 / 0.2)
    assert c.surgical and c.verdict == "ok"


def test_flat_effect_leaves_ratios_blank():
    c = compare(BASE, result(shift={"Authority": -0.01}), steered=STEERED)
    assert c.verdict == "flat" and c.coh_cost is None
    assert compare(BASE, STEERED).retain is None  # no steered reference given


def test_collapsed_model_is_never_green():
    collapsed = result("collapsed", coherence=0.10, shift={"Authority": -2.0})
    c = compare(BASE, collapsed, steered=STEERED)
    assert c.verdict == "broken" and "coherence 0.100 < floor 0.85" in c.reason
    nan = result("nan", shift={"Authority": -1.0, "Care": math.nan})
    assert compare(BASE, nan).verdict == "invalid"
    assert compare(BASE, nan).coh_cost is None and compare(BASE, nan, steered=STEERED).retain is None
    inf = result("inf", coherence=math.inf, shift={"Authority": -1.0})
    assert compare(BASE, inf).verdict == "invalid"  # finiteness is checked before the floor


def test_reversed_and_diffuse():
    assert compare(BASE, result(shift={"Authority": 0.3})).verdict == "reversed"
    assert compare(BASE, result(shift={"Authority": 0.3}), direction=1).verdict == "ok"
    diffuse = compare(BASE, result(shift={"Authority": -0.2, "Sanctity": 0.5}))
    assert not diffuse.surgical and diffuse.verdict == "diffuse"


def test_refuses_unpaired_results_but_allows_a_persona():
    for key, value in (("items", "other"), ("think_tokens", "0"), ("protocol", "p2")):
        with pytest.raises(ValueError, match=f"different {key}"):
            compare(BASE, result(**{key: value}))
    prompted = compare(BASE, result("prompted", system="You are ...", shift={"Authority": -0.3}))
    assert prompted.verdict == "ok"
    with pytest.raises(ValueError, match="takes Vignettes results"):
        compare(BASE, EvalResult("ppl", {"perplexity": 3.0}, meta={"evaluator": "perplexity"}))


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown foundation 'Honesty'"):
        compare(BASE, STEERED, target="Honesty")
    with pytest.raises(ValueError, match="direction must be"):
        compare(BASE, STEERED, direction=0)


def with_rows(name, target_probs, **meta) -> EvalResult:
    """A result with per-row records: item i puts `target_probs[i]` on Authority, the rest spread evenly."""
    rows, marginal = [], {f: 0.0 for f in FOUNDATIONS}
    for i, p in enumerate(target_probs):
        probs = {f: (p if f == "Authority" else (1 - p) / 6) for f in FOUNDATIONS}
        for order in ("listed", "reversed"):
            rows.append({"id": f"item{i}", "order": order, "logp": {f: math.log(v) for f, v in probs.items()}})
        for f in FOUNDATIONS:
            marginal[f] += probs[f] / len(target_probs)
    shift = {f: math.log(marginal[f]) - math.log(1 / 7) for f in FOUNDATIONS}
    base = result(name, shift=shift, **meta)
    return EvalResult(name, base.metrics, rows=rows, meta=base.meta)


def test_paired_interval_gates_the_verdict():
    before = [0.10, 0.20, 0.15, 0.12, 0.18, 0.14, 0.16, 0.11]
    consistent = with_rows("after", [p * 0.6 for p in before])  # every item drops
    c = compare(with_rows("before", before), consistent)
    assert c.ci is not None and c.ci[1] < 0 and c.verdict == "ok"
    assert c.ci[0] <= c.d_target <= c.ci[1]
    mixed = with_rows("after", [p * (0.2 if i % 2 else 1.5) for i, p in enumerate(before)])  # half up, half down
    c = compare(with_rows("before", before), mixed)
    assert abs(c.d_target) >= 0.05 and c.ci[0] <= 0 <= c.ci[1] and c.verdict == "noise"
    assert compare(BASE, STEERED).ci is None  # no rows, no interval


def test_stage_table_markdown():
    stages = {
        "base": BASE,
        "prompted": result("prompted", system="persona", shift={"Authority": -0.2}),
        "steered": STEERED,
        "healed r1": result("healed", coherence=0.95, shift={"Authority": -0.2}),
        "broken": result("broken", coherence=0.3, shift={"Authority": -1.5}),
    }
    table = stage_table(stages, target="Authority", direction=-1)
    lines = table.splitlines()
    assert lines[0].startswith("| stage | Authority nats |") and lines[1].startswith("|---|")
    assert len(lines) == 2 + len(stages)
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    healed = next(line for line in lines if line.startswith("| healed r1 |"))
    assert "| 0.50 |" in healed and "| 0.050 |" in healed and healed.endswith("| yes | ok |")
    assert next(line for line in lines if line.startswith("| broken |")).endswith("| broken |")
    with pytest.raises(ValueError, match="needs the base stage 'base'"):
        stage_table({"steered": STEERED})


def test_compare_real_results_from_a_tiny_model(llama):
    model, tok = llama
    items = stratified_subset(load_vignettes(), 3, seed=0)
    probe = Vignettes(items, think_tokens=0, orders="reversed")
    base = probe(model, tok)
    g = torch.Generator().manual_seed(0)
    vec = SteeringVector({1: 3 * torch.randn(hidden_size(model), generator=g)}, hidden_size(model), n_layers(model))
    with vec.apply(model, 1.0):
        steered = probe(model, tok)
    c = compare(base, steered, target="Care", direction=1)
    assert set(c.deltas) == set(FOUNDATIONS) and math.isfinite(c.d_target)
    # a random 4-layer model puts almost no mass on the options: it must never pass
    assert c.verdict == "broken"
    assert "| steered |" in stage_table({"base": base, "steered": steered}, target="Care", direction=1)
    with pytest.raises(ValueError, match="different think_tokens"):
        compare(base, Vignettes(items, think_tokens=1, orders="reversed")(model, tok))
