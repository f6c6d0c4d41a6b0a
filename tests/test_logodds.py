"""AnswerLogOdds: exact stance/wording algebra on synthetic tables, scores equal a plain
forward, batching changes nothing, paired shifts and retain, and the positive controls on
the embedded model."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from tolerance import approx_rounding, assert_close_rounding, forward_scale

from steer_heal.data import load_axis
from steer_heal.errors import ConfigError
from steer_heal.evaluate import AnswerLogOdds, AnswerPair, EvalResult, OffAxisPair, retain, shift, shift_table
from steer_heal.evaluate.logodds import per_scenario
from steer_heal.models.model import chat_prompt, encode
from steer_heal.run import config as cfg
from steer_heal.run import loop

PAIRS = [AnswerPair(f"P{k}", f"N{k}", f"Pn{k}", f"Np{k}") for k in range(4)]
OFF = [OffAxisPair("tea", "coffee")]


def table(values: dict[str, float], lengths: dict[str, int] | None = None, n: int = 2) -> dict[str, np.ndarray]:
    lengths = lengths or {}
    return {a: np.array([[v * (i + 1), lengths.get(a, 1)] for i in range(n)], dtype=float) for a, v in values.items()}


def test_stance_and_wording_are_exact_on_a_synthetic_table():
    # pos stance +1 nat everywhere, pos words +2 nats everywhere: S = 1, W = 2 on scenario 0
    values = {}
    for k in range(4):
        values |= {f"P{k}": 1 + 2, f"N{k}": 0.0, f"Pn{k}": 1.0, f"Np{k}": 2.0}
    values |= {"tea": 0.5, "coffee": 0.25}
    rows = per_scenario(["x", "y"], PAIRS, OFF, table(values))
    assert rows[0]["orig"] == 3 and rows[0]["swap"] == -1
    assert rows[0]["stance"] == 1 and rows[0]["wording"] == 2 and rows[0]["off_axis"] == 0.25
    assert rows[1]["stance"] == 2 and rows[1]["wording"] == 4  # scenario 1 doubles every log-prob
    long = table(values, lengths={"P0": 3, "N0": 3, "Pn0": 3, "Np0": 3, "P1": 3, "N1": 3, "Pn1": 3, "Np1": 3})
    per_token = per_scenario(["x", "y"], PAIRS, OFF, long)[0]
    assert per_token["stance_per_token"] == pytest.approx((2 * (1 / 3) + 2 * 1) / 4)


def result(values: list[float], component: str = "stance", protocol: str = "p") -> EvalResult:
    rows = [{"scenario": f"s{i}", component: v} for i, v in enumerate(values)]
    return EvalResult("logodds", {component: float(np.mean(values))}, rows, {"protocol": protocol})


def test_paired_shift_and_retain():
    base, other = result([0.0, 1.0, 2.0, 3.0]), result([1.0, 2.5, 3.0, 4.5])
    s = shift(base, other, "stance")
    assert s.mean == pytest.approx(1.25) and s.n == 4
    assert s.se == pytest.approx(np.std([1, 1.5, 1, 1.5], ddof=1) / 2)
    assert s.ci[0] <= s.mean <= s.ci[1] and not s.noise
    healed = result([0.5, 1.75, 2.5, 3.75])  # half of every steered shift
    value, (lo, hi) = retain(base, other, healed, "stance")
    assert value == pytest.approx(0.5) and lo == pytest.approx(0.5) and hi == pytest.approx(0.5)
    with pytest.raises(ValueError, match="not paired"):
        shift(base, result([1.0, 2.0]), "stance")
    with pytest.raises(ValueError, match="different answer pairs"):
        shift(base, result([0.0, 1.0, 2.0, 3.0], protocol="q"), "stance")


def sum_scale(model, tok, probe) -> float:
    """An answer's score sums its tokens' log-probabilities: the rounding bound of one token
    (the forward's largest magnitude, tests/tolerance.py) times the longest answer, over the
    probe's scenarios and answers."""
    answers = [a for pair in probe.pairs for a in pair.answers()] + [x for o in probe.off_axis for x in (o.a, o.b)]
    longest = max(len(encode(tok, a)) for a in answers)
    return longest * max(
        forward_scale(model, torch.tensor([encode(tok, chat_prompt(tok, s)) + encode(tok, a)]))
        for s in probe.scenarios
        for a in answers
    )


def test_scores_equal_a_plain_forward_and_batching_changes_nothing(llama):
    model, tok = llama
    axis = load_axis("authority")
    probe = AnswerLogOdds.from_axis(axis, batch_size=64)
    probe = replace(probe, scenarios=probe.scenarios[:3])
    scored = probe.score(model, tok)
    answer = axis.answers[0]["pos"]
    prompt, ids = encode(tok, chat_prompt(tok, probe.scenarios[1])), encode(tok, answer)
    with torch.no_grad():
        logp = model(torch.tensor([prompt + ids])).logits.float().log_softmax(-1)[0]
    expected = sum(float(logp[len(prompt) + t - 1, tok_id]) for t, tok_id in enumerate(ids))
    scale = sum_scale(model, tok, probe)
    assert scored[answer][1, 0] == approx_rounding(expected, scale) and scored[answer][1, 1] == len(ids)
    small = replace(probe, batch_size=1).score(model, tok, shared_prefix=False)
    whole = probe.score(model, tok, shared_prefix=False)
    for a in scored:  # the shared-prompt cache, batch 64 and batch 1 all agree
        assert_close_rounding(small[a], scored[a], scale)
        assert_close_rounding(whole[a], scored[a], scale)


def test_shared_prompt_scoring_matches_whole_sequences_in_every_family(family_model):
    family, model, tok = family_model
    probe = replace(AnswerLogOdds.from_axis(load_axis("love")), scenarios=load_axis("love").eval_prompts[:2])
    # default: the shared prompt, except for sliding-window models (Gemma), which score whole sequences
    shared, whole = probe.score(model, tok), probe.score(model, tok, shared_prefix=False)
    scale = sum_scale(model, tok, probe)
    for a in whole:
        assert_close_rounding(shared[a], whole[a], scale, msg=f"{family}: {a}")


def test_probe_result_rows_and_table(llama):
    model, tok = llama
    axis = load_axis("love")
    probe = replace(AnswerLogOdds.from_axis(axis), scenarios=load_axis("love").eval_prompts[:4])
    base = probe(model, tok)
    prompted = replace(probe, system=axis.pos)(model, tok)
    assert len(base.rows) == 4 and {"stance", "wording", "off_axis", "stance_per_token"} <= set(base.metrics)
    assert base.meta["protocol"] == prompted.meta["protocol"] and base.meta["system"] != prompted.meta["system"]
    text = shift_table({"base": base, "prompted": prompted})
    assert text.count("\n") == 3 and "| prompted |" in text


def test_bad_probes():
    with pytest.raises(ValueError, match="at least 4 crossed answer pairs"):
        AnswerLogOdds(["a", "b"], PAIRS[:3])
    with pytest.raises(ValueError, match="at least 2 held-out scenarios"):
        AnswerLogOdds(["a"], PAIRS)


def test_an_answer_of_zero_tokens_is_named(llama):
    model, tok = llama
    pairs = [*PAIRS[:3], AnswerPair("ok", "fine", "good", "")]
    with pytest.raises(ValueError, match="answer '' tokenises to 0 tokens"):
        AnswerLogOdds(["a", "b"], pairs).score(model, tok)


def test_eval_prompts_are_held_out_of_the_generation_pool():
    for name in ("authority", "love"):
        axis = load_axis(name)
        assert len(axis.eval_prompts) >= 32 and not set(axis.eval_prompts) & set(axis.prompts)
        assert len(axis.answers) >= 4 and len(axis.off_axis) >= 3


@pytest.mark.real
@pytest.mark.slow
def test_positive_controls_on_the_embedded_model(smollm2):
    """The controls that hold with our pairs (benchmarks/science/instruments.py, docs/results.md):
    the love persona prompts differ in stance (pos minus neg), and the authority vector's
    wording effect shows in the wording part. 16 of the 32 scenarios, to keep CPU time down."""
    from steer_heal import SteeringVector
    from steer_heal.data import load_contexts

    model, tok = smollm2
    love = load_axis("love")
    probe = replace(AnswerLogOdds.from_axis(love), scenarios=love.eval_prompts[:16], batch_size=32)
    pos, neg = (replace(probe, system=s)(model, tok) for s in (love.pos, love.neg))
    control = shift(neg, pos, "stance")
    assert control.mean > 0 and control.z >= 3, control
    authority = load_axis("authority")
    probe = replace(AnswerLogOdds.from_axis(authority), scenarios=authority.eval_prompts[:16], batch_size=32)
    vec = SteeringVector.from_persona_pair(model, tok, authority.pos, authority.neg, load_contexts()[:64])
    base = probe(model, tok)
    with vec.apply(model, 2.0):
        steered = probe(model, tok)
    wording = shift(base, steered, "wording")
    assert wording.mean > 0 and wording.z >= 3 and not math.isnan(wording.se), wording


def test_the_default_shares_the_prompt_on_a_cpu_and_the_field_overrides_it(llama, monkeypatch):
    from steer_heal.evaluate import logodds

    model, tok = llama
    calls = []
    real = logodds._shared_prompt_scores
    monkeypatch.setattr(logodds, "_shared_prompt_scores", lambda *a: calls.append(1) or real(*a))
    probe = replace(AnswerLogOdds.from_axis(load_axis("love")), scenarios=load_axis("love").eval_prompts[:3])
    shared = probe(model, tok)
    assert len(calls) == 3  # one cached prompt per scenario on the CPU
    whole = replace(probe, shared_prefix=False)(model, tok)
    assert len(calls) == 3  # the field turned it off: whole sequences in batches
    scale = sum_scale(model, tok, probe)
    for key in ("stance", "wording", "off_axis"):
        assert whole.metrics[key] == approx_rounding(shared.metrics[key], scale), key


def test_the_loop_probes_take_the_eval_batch_size():
    config = cfg.resolve("tiny", overrides={"eval": {"batch_size": 5}})
    chosen = loop.probes(config, 0, load_axis("love"))
    assert {name: p.batch_size for name, p in chosen.items()} == {"logodds": 5, "vignettes": 5}
    with pytest.raises(ConfigError, match="eval.batch_size must be >= 1, got 0"):
        cfg.resolve("tiny", overrides={"eval": {"batch_size": 0}})
