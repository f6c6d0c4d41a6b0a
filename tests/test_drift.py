"""Drift instruments (NeutralKL, RegisterShift), the neutral prompt sets, and the heal's Anchor:
exact numbers on synthetic cases, equivalence with a hand-written KL, controls, bad input."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from tolerance import assert_close_rounding, forward_scale

from steer_heal.data import (
    available_axes,
    check_disjoint,
    load_anchor_prompts,
    load_axis,
    load_contexts,
    load_neutral_prompts,
)
from steer_heal.evaluate import NeutralDrift, load_vignettes
from steer_heal.evaluate.drift import auc, cv_auc, neutral_kl, register_shift
from steer_heal.healing import NLL, History, KLRev, LoraSettings, TrainSettings, WeightDecay, heal
from steer_heal.healing.encoding import encode_completions
from steer_heal.healing.regularizers import Anchor
from steer_heal.models import tiny_model
from steer_heal.sampling import Sampling
from steer_heal.steering import generate

SAMPLED = Sampling(max_new_tokens=8, do_sample=True, temperature=1.0, top_p=1.0)
PROMPTS = ["tell me about rivers", "what is two plus two", "name a colour", "how do tides work", "why is sky blue"]


# ---------------------------------------------------------------- prompt sets


def test_neutral_and_anchor_prompts_are_held_out_from_every_other_prompt_set():
    neutral, anchor = load_neutral_prompts(), load_anchor_prompts()
    assert len(neutral) >= 48 and len(anchor) >= 48
    assert len(set(neutral)) == len(neutral) and len(set(anchor)) == len(anchor)
    others = {"contexts": load_contexts(), "vignettes": [v.text for v in load_vignettes()], "anchor": anchor}
    for name in available_axes():
        axis = load_axis(name)
        others[f"{name} prompts"] = axis.prompts + axis.sample_prompts + axis.eval_prompts
    check_disjoint("neutral", neutral, others)  # raises on any shared message
    check_disjoint("anchor", anchor, {k: v for k, v in others.items() if k != "anchor"})


def test_an_overlapping_prompt_set_is_refused_naming_both():
    with pytest.raises(ValueError, match=r"the neutral prompts share 1 message\(s\) with the love axis prompts"):
        check_disjoint("neutral", ["Hello", "WHY is the sky blue?  "], {"love axis prompts": ["why is the sky blue?"]})


# ---------------------------------------------------------------- register shift


def test_auc_exact_numbers():
    assert auc([3, 4, 1, 2], [1, 1, 0, 0]) == 1.0
    assert auc([1, 2, 3, 4], [1, 1, 0, 0]) == 0.0
    assert auc([1, 1, 1, 1], [1, 0, 1, 0]) == 0.5  # ties count one half
    assert auc([2, 0, 1, 3], [1, 0, 1, 0]) == pytest.approx(0.5)  # 2 > 0, 1 > 0, 2 < 3, 1 < 3
    with pytest.raises(ValueError, match="both classes"):
        auc([1, 2], [1, 1])


def test_cv_auc_sees_a_shift_and_not_a_resample():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(40, 6)), rng.normal(size=(40, 6))
    shifted = rng.normal(size=(40, 6)) + np.array([3.0, 0, 0, 0, 0, 0])
    null, folds = cv_auc(a, b, seed=1)
    seen, _ = cv_auc(shifted, b, seed=1)
    assert len(folds) == 5 and 0.3 <= null <= 0.7
    assert seen >= 0.8
    assert cv_auc(a, b, seed=1) == cv_auc(a, b, seed=1)  # seeded folds: deterministic
    with pytest.raises(ValueError, match="at least 5 rows"):
        cv_auc(a[:3], b)


def test_paired_sets_keep_each_prompts_answers_in_one_fold():
    """Two answers per prompt, one per set, with nothing but the topic in common: a resample.
    Folds that split a pair apart leave the held-out answer's twin (other label, same topic) in
    training and read far below 0.5; grouped folds read about 0.5, and still see a real shift."""
    rng = np.random.default_rng(0)
    topics = rng.normal(size=(40, 8)) * 3.0
    a, b = topics + rng.normal(size=(40, 8)), topics + rng.normal(size=(40, 8))
    split, _ = cv_auc(a, b, seed=0, paired=False)
    grouped, _ = cv_auc(a, b, seed=0, paired=True)
    shifted, _ = cv_auc(a + np.array([4.0] + [0.0] * 7), b, seed=0, paired=True)
    assert split < 0.35 and 0.35 <= grouped <= 0.65 and shifted >= 0.8, (split, grouped, shifted)
    with pytest.raises(ValueError, match="paired sets need one row per prompt"):
        cv_auc(a, b[:30], paired=True)


def letters(texts):
    """A stand-in embedder: the share of each of a few characters (no model needed)."""
    keys = "aeiou !.,XYZ"
    return torch.tensor([[t.count(k) / max(1, len(t)) for k in keys] for t in texts], dtype=torch.float64)


def test_register_shift_tells_another_register_apart():
    base = [f"the river runs to the sea number {i}." for i in range(10, 30)]
    other = [f"XYZ CORP ANNOUNCES RECORD GROWTH {i}!!!" for i in range(10, 30)]
    assert register_shift(letters, other, base)["auc"] == 1.0
    resampled = [f"the river runs to the sea number {i}." for i in range(30, 50)]  # same letters: a null
    assert register_shift(letters, resampled, base)["auc"] == 0.5


# ---------------------------------------------------------------- NeutralKL


def random_round(hist: History, seed: int = 0):
    """A folded adapter with nonzero B: a student that drifted everywhere."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        with hist.train_adapter(LoraSettings(r=4, alpha=8, layers=(0.0, 1.0)).config(hist.model)) as slot:
            with torch.no_grad():
                for p in slot.params:
                    p.normal_(0, 0.2)
            adapter = hist.adapter(slot.name)
    hist.fold(adapter)


def hand_neutral_kl(model, tok, completions, base):
    """The definition: full logits of each sequence alone, log-softmax, completion positions, mean KL."""
    examples, _ = encode_completions(tok, completions, None)
    rev, fwd, n = 0.0, 0.0, 0
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex.ids])
            s = model(ids).logits[0].double().log_softmax(-1)
            with base():
                b = model(ids).logits[0].double().log_softmax(-1)
            rows = slice(ex.n_prompt - 1, len(ex.ids) - 1)
            rev += float((s[rows].exp() * (s[rows] - b[rows])).sum())
            fwd += float((b[rows].exp() * (b[rows] - s[rows])).sum())
            n += len(ex.ids) - ex.n_prompt
    return rev / n, fwd / n, max(forward_scale(model, torch.tensor([ex.ids])) for ex in examples)


def test_neutral_kl_is_zero_for_the_base_and_equals_the_definition_for_a_drifted_student():
    model, tok = tiny_model("llama")
    completions = generate(model, tok, PROMPTS, sampling=SAMPLED, seed=3)
    with History(model) as hist:
        zero = neutral_kl(model, tok, completions, hist.base, batch_size=2)
        assert zero["kl_rev"] == 0.0 and zero["kl_fwd"] == 0.0  # same weights, same computation
        random_round(hist)
        got = neutral_kl(model, tok, completions, hist.base, batch_size=2)
        rev, fwd, scale = hand_neutral_kl(model, tok, completions, hist.base)
    assert got["kl_rev"] > 1e-4 and got["kl_fwd"] > 1e-4
    assert got["tokens"] == sum(len(e.ids) - e.n_prompt for e in encode_completions(tok, completions, None)[0])
    assert_close_rounding([got["kl_rev"], got["kl_fwd"]], [rev, fwd], scale)  # batched + padded vs one at a time


def test_neutral_drift_of_the_base_reads_the_negative_control_exactly():
    """The student's samples use the negative control's seed: an untouched student is the null."""
    model, tok = tiny_model("llama")
    with History(model) as hist:
        with hist.base():
            base = generate(model, tok, PROMPTS * 2, sampling=SAMPLED, seed=1)
        drift = NeutralDrift(PROMPTS * 2, base, hist.base, letters, SAMPLED, seed=2, batch_size=4)
        controls = drift.controls(model, tok)
        result = drift(model, tok)
    assert result.metrics["auc"] == controls.negative_auc
    assert result.metrics["kl_rev"] == 0.0 and result.metrics["kl_fwd"] == 0.0
    assert result.metrics["student_base_ppl"] > 1 and math.isfinite(result.metrics["base_base_ppl"])
    assert len(result.rows) == len(PROMPTS) * 2


# ---------------------------------------------------------------- the anchor


def completions_of(model, tok, prompts, seed):
    return generate(model, tok, prompts, sampling=SAMPLED, seed=seed)


ANCHOR_PROMPTS = [f"question number {i} about the weather" for i in range(10)]
FAST = TrainSettings(epochs=1, batch_size=2, lr=1e-3, seed=0)


def test_anchor_settings_are_checked():
    with pytest.raises(ValueError, match="Anchor lam must be a finite number > 0"):
        Anchor(lam=0.0)
    with pytest.raises(ValueError, match="Anchor lam must be a finite number > 0"):
        Anchor(lam=-1.0)
    with pytest.raises(ValueError, match="Anchor div must be one of klrev, klfwd"):
        Anchor(div="rmse")
    model, tok = tiny_model("llama")
    trait = completions_of(model, tok, PROMPTS[:2], 0)
    few = completions_of(model, tok, ANCHOR_PROMPTS[:5], 1)
    with pytest.raises(ValueError, match="needs at least 8 anchor completions"):
        heal(model, tok, trait, [NLL(), Anchor()], anchor=few, train=FAST)
    with pytest.raises(ValueError, match="no Anchor regulariser reads them"):
        heal(model, tok, trait, [NLL()], anchor=completions_of(model, tok, ANCHOR_PROMPTS, 1), train=FAST)


@pytest.mark.parametrize("regs", [[NLL()], [KLRev(tau=0.0)], [NLL(), WeightDecay(wd=0.1)]], ids=["nll", "klrev", "wd"])
def test_anchor_composes_and_is_measured_against_the_base(regs):
    """On a student with a folded (drifted) round, the anchor's first divergence is the drift
    from the base; against `prev` (what the trait barrier uses) the same text reads exactly 0:
    a prev anchor would never pull back drift that earlier rounds folded in."""
    model, tok = tiny_model("llama")
    trait = completions_of(model, tok, PROMPTS, 0)
    anchor = completions_of(model, tok, ANCHOR_PROMPTS, 1)
    with History(model) as hist:
        random_round(hist)
        res = heal(hist, tok, trait, [*regs, Anchor(lam=1.0)], reference="prev", anchor=anchor, train=FAST)
        first = res.steps[0].extra["anchor.divergence"]
        assert first > 1e-4
        # the same divergence against prev is zero at the first step (B = 0: the student is prev)
        prev_anchor = heal(hist, tok, trait, [KLRev(tau=0.0, agg="mean")], reference="prev", train=FAST)
        assert prev_anchor.steps[0].divergence == 0.0
        assert all("anchor.divergence" in s.extra for s in res.steps)
        if isinstance(regs[0], KLRev):  # the headline divergence stays the trait barrier's
            assert res.steps[0].divergence == res.steps[0].extra["klrev_rmse.divergence"]


def test_anchor_holds_the_student_nearer_the_base_on_neutral_text():
    """Positive control of the remedy: the same heal with a strong anchor ends nearer the base
    on held-out neutral text than without it."""
    model, tok = tiny_model("llama")
    trait = completions_of(model, tok, PROMPTS * 2, 0)
    anchor = completions_of(model, tok, ANCHOR_PROMPTS, 1)
    held_out = completions_of(model, tok, [f"held out line {i}" for i in range(6)], 2)
    train = TrainSettings(epochs=4, batch_size=2, lr=3e-3, seed=0, max_nll_rise=None)
    drift = {}
    for name, extra in (("without", []), ("with", [Anchor(lam=10.0)])):
        with History(model) as hist:
            res = heal(hist, tok, trait, [NLL(), *extra], anchor=anchor if extra else (), train=train)
            hist.fold(res)
            drift[name] = neutral_kl(model, tok, held_out, hist.base)["kl_rev"]
    assert drift["with"] < 0.7 * drift["without"], drift


def counted_forwards(model):
    """A list that grows by one at every top-level forward of `model` (and the handle)."""
    calls = []
    return calls, model.register_forward_pre_hook(lambda *_: calls.append(1))


def test_the_student_reads_trait_and_anchor_in_one_forward():
    """One forward for both micro-batches, each part as it computes alone up to rounding; apart,
    exactly as alone. Auto joins on an accelerator unless the padding adds over half the tokens."""
    from steer_heal.healing.train import _joins, _student_logprobs
    from steer_heal.models.logprobs import Example, make_batch, target_logprobs

    model, tok = tiny_model("llama")
    trait, _ = encode_completions(tok, completions_of(model, tok, PROMPTS[:3], 0), 512)
    anchor, _ = encode_completions(tok, completions_of(model, tok, ANCHOR_PROMPTS[:3], 1), 512)
    pad = tok.pad_token_id
    batches = tuple(make_batch(part, pad) for part in (trait, anchor))
    alone = [target_logprobs(model, batch).detach() for batch in batches]
    calls, handle = counted_forwards(model)
    try:
        joint = _student_logprobs(model, (trait, anchor), batches, pad, "cpu", True)
        assert len(calls) == 1
        ids = make_batch([*trait, *anchor], pad).ids
        scale = forward_scale(model, ids)
        for got, want in zip(joint, alone):
            assert got.shape == want.shape and got.requires_grad
            assert_close_rounding(got.detach(), want, scale)
        calls.clear()
        apart = _student_logprobs(model, (trait, anchor), batches, pad, "cpu", False)
        assert len(calls) == 2
        assert all(torch.equal(got.detach(), want) for got, want in zip(apart, alone))
    finally:
        handle.remove()
    # auto: joint on an accelerator unless the padding adds more than half the tokens; apart on a CPU
    long = [Example(tuple(5 + i % 40 for i in range(300)), 10)]  # 300 tokens against the trait's ~40
    assert _joins(trait, anchor, "cuda", None) and not _joins(trait, long, "cuda", None)
    assert not _joins(trait, anchor, "cpu", None)
    assert _joins(trait, long, "cpu", True) and not _joins(trait, anchor, "cuda", False)


def test_a_heal_with_the_joint_forward_equals_one_with_two():
    """A heal step does not depend on whether the student's trait and anchor batches ran as one
    forward (up to rounding), and the joint heal runs half the student forwards."""
    model, tok = tiny_model("llama")
    trait = completions_of(model, tok, PROMPTS, 0)
    anchor = completions_of(model, tok, ANCHOR_PROMPTS, 1)
    regs = [KLRev(tau=0.0), Anchor(lam=1.0)]
    train = TrainSettings(epochs=2, batch_size=2, lr=1e-3, seed=0, val_frac=0.0, frozen_cache_gib=0)
    results, forwards = {}, {}
    for arm, joint in (("joint", True), ("apart", False)):
        train = replace(train, joint_anchor=joint)
        with History(model) as hist:
            random_round(hist)
            calls, handle = counted_forwards(model)
            try:
                results[arm] = heal(hist, tok, trait, regs, reference="prev", anchor=anchor, train=train)
            finally:
                handle.remove()
            forwards[arm] = len(calls)
    steps = len(results["joint"].steps)
    # every step: the two frozen views, then the student once (joint) or twice (apart)
    assert forwards["apart"] - forwards["joint"] == steps > 0
    # the first step's loss, gradient and anchor divergence; later steps follow AdamW, which turns
    # rounding-sized gradient entries (B = 0 at the start) into whole steps of lr, so they are not compared
    a, b = results["joint"].steps[0], results["apart"].steps[0]
    assert_close_rounding(a.nll, b.nll, scale=10.0)
    assert_close_rounding(a.grad_norm, b.grad_norm, scale=10.0)
    assert_close_rounding(a.extra["anchor.divergence"], b.extra["anchor.divergence"], scale=10.0)
    assert a.grad_norm > 0 and a.extra["anchor.divergence"] > 1e-4  # the folded round drifted from the base


# ---------------------------------------------------------------- config, resume, the loop


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"heal": {"anchor": "klrev", "anchor_lam": 0.0}}, "heal.anchor_lam must be a number > 0"),
        ({"heal": {"anchor": "klfwd", "anchor_lam": -1.0}}, "heal.anchor_lam must be a number > 0"),
        ({"heal": {"anchor": "klrev", "anchor_n": 7}}, "heal.anchor_n must be >= 8"),
        ({"heal": {"anchor": "rmse"}}, "heal.anchor must be none|klrev|klfwd"),
        ({"drift": {"n_prompts": 5}}, "drift.n_prompts must be 0 \\(all\\) or >= 10"),
        ({"drift": {"max_auc": 1.5}}, "drift.max_auc is an AUC in \\[0, 1\\]"),
        ({"drift": {"max_kl": -0.1}}, "drift.max_kl must be >= 0"),
        ({"drift": {"enabled": False, "max_auc": 0.8}}, "set drift.enabled = true"),
    ],
)
def test_bad_drift_and_anchor_settings_fail_at_config_time(overrides, message):
    from steer_heal.errors import ConfigError
    from steer_heal.run import config as cfg

    with pytest.raises(ConfigError, match=message):
        cfg.resolve("tiny", overrides=overrides)


def test_resume_with_the_anchor_of_a_run_made_without_it_is_refused(tmp_path):
    """The finished rounds healed without the anchor: continuing with it would mix two methods."""
    from click.testing import CliRunner

    from runners.cli import main
    from steer_heal.run import config as cfg
    from steer_heal.run.runlog import RunDir

    RunDir.create(tmp_path / "run", cfg.resolve("tiny"))
    result = CliRunner().invoke(main, ["run", "--resume", str(tmp_path / "run"), "--anchor", "klrev"])
    assert result.exit_code == 1 and "heal.anchor: 'none' -> 'k" in result.output
    again = CliRunner().invoke(main, ["run", "--resume", str(tmp_path / "run"), "--max-auc", "0.9", "--dry-run"])
    assert again.exit_code == 0, again.output  # a stop rule may change on resume


@pytest.mark.slow
def test_tiny_loop_logs_drift_and_stops_on_it_with_the_anchor(tmp_path):
    """The loop on tiny with the anchor: the neutral event (drift set, anchor set, controls), a drift
    event and summary every round, the report's drift line, and a drift stop that names it."""
    from steer_heal.run import config as cfg
    from steer_heal.run import loop, plot
    from steer_heal.run.runlog import RunDir

    config = cfg.resolve(
        "tiny",
        overrides={
            "run": {"rounds": 2},
            "heal": {"anchor": "klrev", "anchor_lam": 1.0, "anchor_n": 8},
            "drift": {"max_kl": 1e-12},  # any drift at all stops the loop
        },
    )
    with RunDir.create(tmp_path / "run", config) as run:
        result = loop.run(config, run, progress=False)
        events = run.events()
    neutral = [e for e in events if e["event"] == "neutral"]
    assert len(neutral) == 1 and len(neutral[0]["drift_base"]) == 10 and len(neutral[0]["anchor"]) == 8
    controls = neutral[0]["controls"]
    assert {"positive_auc", "negative_auc", "passed"} <= set(controls) and len(controls["negative_texts"]) == 10
    drift = [e for e in events if e["event"] == "drift"]
    rounds = [e for e in events if e["event"] == "round"]
    assert [e["round"] for e in drift] == [0] and rounds[0]["drift"]["kl_rev"] > 0
    heal_steps = next(e for e in events if e["event"] == "heal")["steps"]
    assert all("anchor.divergence" in s["extra"] for s in heal_steps)
    assert result["stopped"].startswith("drift: NeutralKL ") and result["stopped"].endswith("after round 0")
    report = plot.render(tmp_path / "run")["report"].read_text()
    assert "Drift on held-out neutral prompts after round 0" in report and "The loop stopped: drift:" in report
    assert "register AUC" in report  # the rounds table's column
