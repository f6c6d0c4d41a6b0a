"""Base models without a chat template (issue 30): gpt2 and opt as they ship. Prompts are plain
text (`models.model.BASE_PROMPT`), a persona pair is a prefix, and the loop, filters and
evaluators run on them."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from runners.cli import main
from steer_heal import SteeringVector
from steer_heal.data import load_axis
from steer_heal.evaluate import AnswerLogOdds
from steer_heal.models.loading import load_model
from steer_heal.models.model import chat_prompt
from steer_heal.sampling import Sampling
from steer_heal.steering.generation import generate

BASES = ["tiny-gpt2-base", "tiny-opt-base"]


@pytest.mark.parametrize("name", BASES)
def test_a_base_model_extracts_steers_and_is_probed(name):
    model, tok = load_model(name)
    assert tok.chat_template is None
    axis = load_axis("love")
    vec = SteeringVector.from_persona_pair(model, tok, axis.pos, axis.neg, axis.prompts[:4], layers=[1, 2])
    assert all(float(v.norm()) > 0 for v in vec.directions.values())
    assert chat_prompt(tok, "hi", system=axis.pos).startswith(axis.pos)  # the persona is a prefix
    plain = generate(model, tok, ["hi", "tell me a story"], sampling=Sampling(max_new_tokens=6), seed=0)
    steered = generate(
        model, tok, ["hi", "tell me a story"], steering=vec, coeff=8.0, sampling=Sampling(max_new_tokens=6), seed=0
    )
    assert [c.token_ids for c in plain] != [c.token_ids for c in steered]
    result = AnswerLogOdds.from_axis(axis)(model, tok)
    assert torch.isfinite(torch.tensor(result.metrics["stance"]))


@pytest.mark.slow
@pytest.mark.parametrize("name", BASES)
def test_the_tiny_loop_runs_a_round_on_a_base_model(tmp_path, name):
    done = CliRunner().invoke(main, ["run", "--preset", "tiny", "--model", name, "--out", str(tmp_path / "run")])
    assert done.exit_code == 0, done.output
    assert (tmp_path / "run" / "round_0" / "adapter" / "adapter_config.json").exists()
