"""Steering operators (issue 30): ablate and norm-preserving add, each equal to a hand-written
hook of its formula on every family fixture; refusals; and their properties on a hidden state."""

from __future__ import annotations

import pytest
import torch
from family_table import EXPECTED
from tolerance import assert_close_rounding

from steer_heal import SteeringVector
from steer_heal.errors import InputError
from steer_heal.models.architecture import get_path
from steer_heal.models.model import encode
from steer_heal.models.tiny import FAMILY_NAMES, tiny_model
from steer_heal.steering.hooks import active_steering
from steer_heal.steering.operators import ablated, norm_added


def by_hand(operator: str, v: torch.Tensor, coeff: float):
    """The module docstring's formulas, written out again."""
    u = v / v.norm()

    def hook(module, args, out):
        h = out[0] if isinstance(out, tuple) else out
        if operator == "ablate":
            new = h - coeff * (h * u).sum(-1, keepdim=True) * u
        else:
            moved = h + coeff * v
            new = moved * h.norm(dim=-1, keepdim=True) / moved.norm(dim=-1, keepdim=True)
        return (new, *out[1:]) if isinstance(out, tuple) else new

    return hook


@pytest.mark.parametrize("operator", ["ablate", "norm_add"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
@torch.no_grad()
def test_operators_equal_a_hand_written_hook(family, operator):
    model, tok = tiny_model(family)
    blocks = get_path(model, EXPECTED[family][0])
    generator = torch.Generator().manual_seed(3)
    vec = SteeringVector({layer: torch.randn(64, generator=generator) for layer in (1, 2)}, 64, 4, f"tiny-{family}")
    ids = torch.tensor([encode(tok, "My manager told me to skip the safety check.")])
    coeff = 0.7 if operator == "ablate" else 3.0
    handles = [blocks[layer].register_forward_hook(by_hand(operator, v, coeff)) for layer, v in vec.directions.items()]
    want = model(ids, output_hidden_states=True)
    for handle in handles:
        handle.remove()
    before = sum(len(m._forward_hooks) for m in model.modules())  # transformers may keep its own recorders
    with vec.apply(model, coeff, operator=operator):
        assert {a.coeff for a in active_steering(model)} == {coeff}  # a filter sees the model is steered
        got = model(ids).logits
    assert sum(len(m._forward_hooks) for m in model.modules()) == before
    scale = max(float(want.logits.abs().max()), *(float(h.abs().max()) for h in want.hidden_states))
    assert_close_rounding(got, want.logits, scale)  # the same formula, sums in another order
    assert (got - model(ids).logits).abs().max() > 1e-4  # the operator does something


def test_ablate_removes_the_component_and_norm_add_keeps_the_norm():
    generator = torch.Generator().manual_seed(0)
    h, v = torch.randn(3, 5, 16, generator=generator), torch.randn(16, generator=generator)
    u = v / v.norm()
    assert float((ablated(h, u, 1.0) @ u).abs().max()) < 1e-5
    half = ablated(h, u, 0.5) @ u
    torch.testing.assert_close(half, 0.5 * (h @ u))
    moved = norm_added(h, 4.0 * v)
    torch.testing.assert_close(moved.norm(dim=-1), h.norm(dim=-1))
    assert float(((moved - h) @ u).min()) > 0  # and it moved every position toward v


def test_operators_that_read_the_state_cannot_bake_or_take_per_row_coefficients():
    model, tok = tiny_model("llama")
    vec = SteeringVector({1: torch.ones(64)}, 64, 4, "tiny-llama")
    with pytest.raises(InputError, match="a bias can only add"):
        with vec.using("ablate").bake(model, 1.0):
            pass
    with pytest.raises(InputError, match="per-row coefficients are for the add operator only"):
        with vec.apply(model, [1.0, 2.0], operator="norm_add"):
            pass
    with pytest.raises(InputError, match="unknown steering operator 'rotate'"):
        vec.using("rotate")
    with pytest.raises(InputError, match="cannot ablate a zero direction"):
        with SteeringVector({1: torch.zeros(64)}, 64, 4, "tiny-llama").apply(model, 1.0, operator="ablate"):
            pass
    assert not any(m._forward_hooks for m in model.modules())


def test_an_operated_vector_steers_generate():
    from steer_heal.sampling import Sampling
    from steer_heal.steering.generation import generate

    model, tok = tiny_model("llama")
    vec = SteeringVector({1: torch.randn(64, generator=torch.Generator().manual_seed(1))}, 64, 4, "tiny-llama")
    settings = dict(sampling=Sampling(max_new_tokens=6), seed=0)
    plain = generate(model, tok, ["hi", "tell me a story"], **settings)
    zero = generate(model, tok, ["hi", "tell me a story"], steering=vec.using("norm_add"), coeff=0.0, **settings)
    moved = generate(model, tok, ["hi", "tell me a story"], steering=vec.using("ablate"), coeff=1.0, **settings)
    assert [c.token_ids for c in zero] == [c.token_ids for c in plain]  # coeff 0 == vanilla
    assert [c.coeff for c in moved] == [1.0, 1.0]
