import pytest
import torch

from steer_heal import SteeringVector, generate
from steer_heal.models.model import decoder_blocks
from steer_heal.sampling import Sampling
from steer_heal.steering.slot import SteeringSlot

PROMPTS = ["hi", "tell me a story about the fox", "What matters more, rules or people?"]


def vector(model, layers=(1, 2)):
    g = torch.Generator().manual_seed(0)
    return SteeringVector({layer: torch.randn(64, generator=g) for layer in layers}, hidden_size=64, n_layers=4)


def test_slot_equals_apply_and_idle_slot_is_vanilla(llama):
    model, tok = llama
    vec = vector(model)
    plain = generate(model, tok, PROMPTS, sampling=Sampling(max_new_tokens=8))
    applied = generate(model, tok, PROMPTS, steering=vec, coeff=1.5, sampling=Sampling(max_new_tokens=8))
    with SteeringSlot(model, vec.layers) as slot:
        assert [c.token_ids for c in generate(model, tok, PROMPTS, sampling=Sampling(max_new_tokens=8))] == [
            c.token_ids for c in plain
        ]
        slot.set(vec, 1.5)
        assert [c.token_ids for c in generate(model, tok, PROMPTS, sampling=Sampling(max_new_tokens=8))] == [
            c.token_ids for c in applied
        ]
        delta_ptr = slot.deltas[1].data_ptr()
        slot.set(vec, 0.5)
        assert slot.deltas[1].data_ptr() == delta_ptr  # rewritten in place: compiled graphs stay valid
        slot.set(None)
        assert [c.token_ids for c in generate(model, tok, PROMPTS, sampling=Sampling(max_new_tokens=8))] == [
            c.token_ids for c in plain
        ]
    assert all(not block._forward_hooks for block in decoder_blocks(model))


def test_static_cache_equals_dynamic_cache_steered(llama):
    model, tok = llama
    vec = vector(model)
    dynamic = generate(model, tok, PROMPTS, steering=vec, coeff=1.0, sampling=Sampling(max_new_tokens=8))
    static = generate(model, tok, PROMPTS, steering=vec, coeff=1.0, compiled=True, sampling=Sampling(max_new_tokens=8))
    assert [c.token_ids for c in static] == [c.token_ids for c in dynamic]


def test_slot_errors(llama):
    model, _ = llama
    with pytest.raises(ValueError, match="non-empty subset of 0..3"):
        SteeringSlot(model, [4])
    slot = SteeringSlot(model, [1])
    with pytest.raises(RuntimeError, match="inside `with SteeringSlot"):
        slot.set(vector(model), 1.0)
    with pytest.raises(ValueError, match=r"vector layers \[2\] are not in this slot"):
        with slot:
            slot.set(vector(model), 1.0)
    assert all(not block._forward_hooks for block in decoder_blocks(model))
