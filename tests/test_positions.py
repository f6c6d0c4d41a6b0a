"""Where to steer (issue 30): a slice of token positions equals a hand-written hook on every
family fixture; "prompt" and "generated" equal hand-written hooks on the prefill and decode
calls of `generate`; positions count real tokens under left padding; bake refuses them."""

from __future__ import annotations

import pytest
import torch
from family_table import EXPECTED
from tolerance import assert_close_rounding

from steer_heal import SteeringVector
from steer_heal.errors import InputError
from steer_heal.models.architecture import get_path
from steer_heal.models.model import encode, left_pad, pad_id
from steer_heal.models.tiny import FAMILY_NAMES, tiny_model
from steer_heal.sampling import Sampling
from steer_heal.steering.generation import generate


def vector(family: str) -> SteeringVector:
    generator = torch.Generator().manual_seed(5)
    return SteeringVector({layer: torch.randn(64, generator=generator) for layer in (1, 2)}, 64, 4, f"tiny-{family}")


def add_where(delta: torch.Tensor, chosen):
    """A hand-written hook: add `delta` where chosen(hidden) marks the (rows, tokens) to steer."""

    def hook(module, args, out):
        h = out[0] if isinstance(out, tuple) else out
        mask = chosen(h)[..., None]
        new = torch.where(mask, h + delta, h)
        return (new, *out[1:]) if isinstance(out, tuple) else new

    return hook


@pytest.mark.parametrize("family", FAMILY_NAMES)
@torch.no_grad()
def test_a_slice_of_positions_equals_a_hand_written_hook(family):
    model, tok = tiny_model(family)
    blocks = get_path(model, EXPECTED[family][0])
    vec, coeff = vector(family), 1.5
    ids = torch.tensor([encode(tok, "My manager told me to skip the safety check today.")])
    assert ids.shape[1] > 6

    def columns(h):
        index = torch.arange(h.shape[1])[None, :].expand(h.shape[0], -1)
        return (index >= 2) & (index < 5)

    handles = [blocks[k].register_forward_hook(add_where(coeff * v, columns)) for k, v in vec.directions.items()]
    want = model(ids).logits
    for handle in handles:
        handle.remove()
    with vec.apply(model, coeff, positions=slice(2, 5)):
        got = model(ids).logits
    assert torch.equal(got, want), family
    assert not any(
        isinstance(h, object) and type(h).__name__ == "PositionTracker" for h in model._forward_pre_hooks.values()
    )


@pytest.mark.parametrize("where", ["prompt", "generated"])
@torch.no_grad()
def test_prompt_and_generated_equal_hand_written_hooks_in_generate(where):
    model, tok = tiny_model("llama")
    blocks = get_path(model, EXPECTED["llama"][0])
    vec, coeff = vector("llama"), 4.0
    settings = dict(sampling=Sampling(max_new_tokens=8, do_sample=False), seed=0)
    prompts = ["tell me a story about a dog"]  # one row: no padding, the prefill is the only call with > 1 token

    def calls(h):  # the prefill has the whole prompt; each decode call one new token
        first = h.shape[1] > 1
        return torch.full(h.shape[:2], first if where == "prompt" else not first)

    handles = [blocks[k].register_forward_hook(add_where(coeff * v, calls)) for k, v in vec.directions.items()]
    want = generate(model, tok, prompts, **settings)
    for handle in handles:
        handle.remove()
    got = generate(model, tok, prompts, steering=vec.using(positions=where), coeff=coeff, **settings)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    everywhere = generate(model, tok, prompts, steering=vec, coeff=coeff, **settings)
    plain = generate(model, tok, prompts, **settings)
    # the positional run is neither the plain nor the everywhere-steered one: it steered some calls only
    assert got[0].token_ids != plain[0].token_ids and got[0].token_ids != everywhere[0].token_ids


@torch.no_grad()
def test_positions_count_real_tokens_under_left_padding():
    model, tok = tiny_model("llama")
    vec, coeff = vector("llama"), 2.0
    short, long = encode(tok, "hi there"), encode(tok, "tell me a long story about a brave dog")
    ids, mask, positions = left_pad([short, long], pad_id(tok), torch.device("cpu"))
    with vec.apply(model, coeff, positions=slice(1, None)):
        batched = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        alone = [model(torch.tensor([row])).logits[0] for row in (short, long)]
    for row, tokens in enumerate((short, long)):
        got = batched[row, -len(tokens) :]
        assert_close_rounding(got, alone[row], float(alone[row].abs().max()))


def test_bake_and_bad_positions_are_refused():
    model, tok = tiny_model("llama")
    vec = vector("llama")
    with pytest.raises(InputError, match="a bias changes every position"):
        with vec.using(positions="prompt").bake(model, 1.0):
            pass
    for bad in ("middle", slice(0, 4, 2), slice(-1, None)):
        with pytest.raises(InputError, match="positions"):
            with vec.apply(model, 1.0, positions=bad):
                pass
    assert not model._forward_pre_hooks and not any(m._forward_hooks for m in get_path(model, "model.layers"))
