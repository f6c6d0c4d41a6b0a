"""The report's "beats the persona prompt" verdict against several wordings of the prompt (issue 25):
exact verdicts on synthetic events, and the axis files' `pos_wordings` checks."""

from __future__ import annotations

from pathlib import Path

import pytest

import steer_heal.data
from steer_heal.data import load_axis
from steer_heal.evaluate import EvalResult
from steer_heal.run.plot import _colour, summary

SCENARIOS = [f"scenario {i}" for i in range(8)]


def logodds(stance: float, spread: float = 0.1) -> dict:
    """A log-odds result whose stance is `stance` +- spread per scenario (wording and off-axis 0)."""
    rows = [
        {"scenario": x, "stance": stance + spread * (-1) ** i, "wording": 0.0, "off_axis": 0.0, "orig": stance}
        for i, x in enumerate(SCENARIOS)
    ]
    return EvalResult("logodds", {"stance": stance}, rows, {"protocol": "p"}).to_dict(rows=True)


def vignettes(coherence: float) -> dict:
    return EvalResult("vignettes", {"coherence": coherence}, [], {}).to_dict()


def stage(name: str, r: int, stance: float, coherence: float, system: str | None = None) -> dict:
    event = {
        "event": "eval",
        "stage": name,
        "round": r,
        "results": {"logodds": logodds(stance), "v": vignettes(coherence)},
    }
    return event | ({"system": system} if system else {})


def events(*prompts: tuple[float, float], healed: float = 2.0) -> list[dict]:
    out = [stage("base", -1, 0.0, 0.9), stage("prompted", -1, prompts[0][0], prompts[0][1], "Be warm.")]
    out += [stage(f"prompted_{i}", -1, s, c, f"Wording {i}.") for i, (s, c) in enumerate(prompts[1:], start=2)]
    out.append(stage("prompted_neg", -1, prompts[0][0] - 1.0, 0.9))
    return out + [stage("steered", 0, 3.0, 0.88), stage("healed", 0, healed, 0.9)]


def test_one_wording_keeps_the_single_prompt_sentence():
    text = summary(events((1.0, 0.9)))
    assert "; the healed model beats it at equal or better coherence." in text
    assert "does not beat it at lower coherence" in summary(events((1.0, 0.95)))  # the prompt keeps more coherence
    assert "does not beat it at equal or better" in summary(events((2.5, 0.9)))


@pytest.mark.parametrize(
    ("second", "verdict"),
    [
        ((1.5, 0.9), "beats all 2 wordings at equal or better coherence"),
        ((2.5, 0.9), "beats 1 of the 2 wordings, so it is not said to beat the prompt"),
        ((1.5, 0.95), "beats 1 of the 2 wordings, so it is not said to beat the prompt"),  # coherence decides
    ],
)
def test_the_healed_model_must_beat_every_wording(second, verdict):
    text = summary(events((1.0, 0.9), second))
    assert f"the healed model {verdict}." in text
    assert '("Be warm.")' in text and '("Wording 2.")' in text  # each prompt is named


def test_beating_no_wording_says_so():
    assert "the healed model beats none of the 2 wordings." in summary(events((2.5, 0.9), (3.0, 0.9)))


def test_other_wordings_are_coloured_as_the_prompt():
    assert _colour("prompted_2") == _colour("prompted") != _colour("healed r1")


def test_bundled_axes_carry_another_wording():
    for name in ("love", "authority"):
        axis = load_axis(name)
        assert axis.pos_wordings and all(w not in (axis.pos, axis.neg) for w in axis.pos_wordings)


def test_a_wording_that_repeats_the_persona_is_refused(tmp_path):
    text = (Path(steer_heal.data.__file__).parent / "axes" / "love.toml").read_text()
    axis = load_axis("love")
    path = tmp_path / "axis.toml"
    path.write_text(text.replace(f'pos_wordings = ["{axis.pos_wordings[0]}"]', f'pos_wordings = ["{axis.pos}"]'))
    with pytest.raises(ValueError, match="pos_wordings must be other wordings of pos"):
        load_axis(path)


def test_a_control_below_the_effect_size_floor_fails_however_large_its_z():
    from steer_heal.run.plot import CONTROL_MIN_NATS

    tiny_effect = events((1.0, 0.9))
    neg = next(e for e in tiny_effect if e["stage"] == "prompted_neg")
    neg["results"]["logodds"] = logodds(1.0 - 0.3 * CONTROL_MIN_NATS, spread=0.0001)  # z in the hundreds
    text = summary(tiny_effect)
    assert "it FAILED (needs >= 0.1 nats and z >= 3" in text and "sees a stance effect" not in text
    assert "cannot be judged while the control fails" in text


def test_a_model_whose_vignette_table_reads_broken_gets_no_effect_claim():
    broken = events((1.0, 0.5))
    for e in broken:
        e["results"]["v"] = vignettes(0.3)  # every stage below the 0.85 floor, the base included
    text = summary(broken)
    assert "cannot be judged by these probes" in text
    assert not any(w in text for w in ("sees a stance effect", "beats", "moved the stance"))
