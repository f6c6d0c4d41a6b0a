"""The drift instruments' controls on the embedded SmolLM2-135M, at the full preset's size, built
as the loop builds them (issue 25): the positive control (the base under a known other
register) is seen, the negative control (the base against itself) is not, and NeutralKL of the
base against itself is exactly zero."""

from __future__ import annotations

from dataclasses import replace

import pytest

from steer_heal.data import load_neutral_prompts
from steer_heal.evaluate import NeutralDrift
from steer_heal.evaluate.drift import NEGATIVE_AUC, POSITIVE_AUC
from steer_heal.healing import History
from steer_heal.run import config as cfg
from steer_heal.run.neutral import seeds
from steer_heal.steering import generate

# Measured at this size (64 prompts, 48 tokens) on 8 control seeds (5 on this CPU, 3 on GPUs),
# the positive control read 0.79-0.87 (docs/results.md, issue 25): it clears the report's bar of
# POSITIVE_AUC = 0.8 by less than its seed-to-seed spread, and a screen of four other registers
# and of twice the text found none that clears it by a margin (benchmarks/science/control_screen.py).
# So the report keeps the 0.8 bar and prints FAILED when a run's own control misses it, and this
# test asserts what holds with margin on any CPU: the instrument tells the known register change
# apart (>= 0.75, three standard deviations of that spread below its mean 0.83) and an instrument
# that is broken (embedder, folds, labels) reads about 0.5.
SEES_A_REGISTER = 0.75


@pytest.mark.real
@pytest.mark.slow
def test_register_shift_controls_at_the_full_presets_size(smollm2):
    from steer_heal.evaluate.judge import Embedder

    model, tok = smollm2
    config = cfg.resolve("full", overrides={"run": {"device": "cpu", "dtype": "float32"}})
    prompts = load_neutral_prompts()[: config.drift.n_prompts]
    sampling = replace(config.generate, max_new_tokens=config.drift.max_new_tokens)
    seed = seeds(config)
    with History(model) as history:
        with history.base():
            base = generate(model, tok, prompts, sampling=sampling, seed=seed["drift_base"], progress=False)
        drift = NeutralDrift(
            prompts, base, history.base, Embedder(), sampling, seed["drift_student"], config.eval.batch_size
        )
        controls = drift.controls(model, tok)
        itself = drift(model, tok)
    print(controls.verdict())
    assert len(prompts) == 64 and sampling.max_new_tokens == 48  # the size the numbers above were measured at
    assert controls.positive_auc >= SEES_A_REGISTER, controls.verdict()
    assert controls.negative_auc <= NEGATIVE_AUC, controls.verdict()
    assert controls.positive_auc - controls.negative_auc >= POSITIVE_AUC - NEGATIVE_AUC, controls.verdict()
    assert itself.metrics["kl_rev"] == 0.0 and itself.metrics["kl_fwd"] == 0.0
    assert itself.metrics["auc"] == controls.negative_auc  # an untouched student reads the negative control
