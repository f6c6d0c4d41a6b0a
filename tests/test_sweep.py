"""Dose sweep: c = 0 equals the plain evaluation, the operating dose, JSON round-trip, CLI, errors."""

import json

import pytest
from click.testing import CliRunner

from runners.cli import main
from steer_heal import SteeringVector
from steer_heal.evaluate import EvalResult, Vignettes, load_vignettes, stratified_subset
from steer_heal.filters import default_text_filter
from steer_heal.run.sweep import SweepPoint, dose_sweep, operating_dose, sweep_report
from steer_heal.sampling import Sampling


def probe():
    return Vignettes(items=stratified_subset(load_vignettes(), 7), think_tokens=0)


def test_zero_dose_is_the_plain_model_and_steering_changes_it(llama):
    model, tok = llama
    vec = SteeringVector.from_persona_pair(
        model, tok, "You love rules.", "You hate rules.", ["hi", "what now?"], layers=(1, 2)
    )
    points = dose_sweep(
        model,
        tok,
        vec,
        [0, 40.0],
        {"v": probe()},
        prompts=["a", "b", "c"],
        filt=default_text_filter(),
        n=3,
        sample_prompts=["hello"],
        sampling=Sampling(do_sample=True, max_new_tokens=4),
    )
    plain = probe()(model, tok)
    assert points[0].results["v"].metrics == plain.metrics  # coeff 0 == vanilla, exactly
    assert points[1].results["v"].metrics["care_nats"] != plain.metrics["care_nats"]
    assert [p.filter["n"] for p in points] == [3, 3] and len(points[1].samples) == 1
    assert not any(h for m in model.modules() for h in m._forward_hooks.values())  # hooks removed
    again = [SweepPoint.from_dict(json.loads(json.dumps(p.to_dict()))) for p in points]
    assert again[1].results["v"].metrics == points[1].results["v"].metrics and again[1].filter == points[1].filter
    assert "| 40 |" in sweep_report(points, "Care", 1)


def point(coeff: float, coherence: float) -> SweepPoint:
    return SweepPoint(float(coeff), {"v": EvalResult("v", {"coherence": coherence})}, None, [])


def test_operating_dose_is_the_largest_coherent_one():
    points = [point(0, 0.90), point(1, 0.89), point(2, 0.86), point(3, 0.80), point(4, 0.86)]
    assert (
        operating_dose(points, coherence_floor=0.95) == 4
    )  # 0.86 >= 0.855: the rule is per dose, not "until first failure"
    assert operating_dose(points, coherence_floor=0.98) == 1
    with pytest.raises(ValueError, match="no c = 0"):
        operating_dose(points[1:])
    with pytest.raises(ValueError, match="floor is a fraction"):
        operating_dose(points, coherence_floor=0.0)


def test_sweep_needs_zero(llama):
    model, tok = llama
    vec = SteeringVector.from_persona_pair(model, tok, "a", "b", ["hi"], layers=(1,))
    with pytest.raises(ValueError, match="must include 0"):
        dose_sweep(model, tok, vec, [1.0, 2.0], {"v": probe()})


@pytest.mark.slow
def test_cli_sweep_writes_report(tmp_path):
    runner = CliRunner()
    vec = tmp_path / "v.safetensors"
    assert (
        runner.invoke(main, ["extract", "--model", "tiny-llama", "--n-contexts", "4", "--out", str(vec)]).exit_code == 0
    )
    result = runner.invoke(
        main,
        [
            "sweep",
            "--vector",
            str(vec),
            "--coeffs",
            "0,2",
            "--n-items",
            "7",
            "--n",
            "2",
            "--max-new-tokens",
            "4",
            "--out",
            str(tmp_path / "s"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "Operating dose" in (tmp_path / "s" / "sweep.md").read_text()
    assert len(json.loads((tmp_path / "s" / "sweep.json").read_text())["points"]) == 2
    bad = runner.invoke(main, ["sweep", "--vector", str(vec), "--coeffs", "0,x", "--out", str(tmp_path / "t")])
    assert bad.exit_code != 0 and "--coeffs takes numbers" in bad.output
