"""A model dispatched by accelerate with some layers offloaded ("meta" until their forward):
the CPU stand-in for a model sharded over GPUs. Every primitive that can run there gives the
same numbers as the plain model; bake and heal, which cannot, say so in one line."""

import copy

import pytest
import torch
from tolerance import approx_rounding, assert_close_rounding, forward_scale, magnitude

from steer_heal import SteeringVector, generate
from steer_heal.evaluate import Vignettes, load_vignettes, stratified_subset
from steer_heal.filters import PPL, default_filter
from steer_heal.healing.history import History
from steer_heal.healing.regularizers import KLRev
from steer_heal.healing.train import LoraSettings, TrainSettings, heal
from steer_heal.models.model import chat_prompt, execution_device, input_device
from steer_heal.models.tiny import tiny_model
from steer_heal.sampling import Sampling
from steer_heal.steering.slot import SteeringSlot

accelerate = pytest.importorskip("accelerate")


@pytest.fixture
def plain_and_dispatched(tmp_path):
    model, tok = tiny_model("llama")
    plain = copy.deepcopy(model)
    device_map = {
        "model.embed_tokens": "disk",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.layers.2": "disk",
        "model.layers.3": "cpu",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    dispatched = accelerate.dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path), main_device="cpu")
    assert dispatched.model.layers[1].mlp.down_proj.weight.device.type == "meta"  # really offloaded
    return plain, dispatched, tok


def test_devices_are_execution_devices(plain_and_dispatched):
    _, model, _ = plain_and_dispatched
    assert input_device(model) == torch.device("cpu")  # the embedding's weights are on meta
    assert execution_device(model.model.layers[1]) == torch.device("cpu")


def test_extract_apply_generate_slot_match_the_plain_model(plain_and_dispatched):
    plain, model, tok = plain_and_dispatched
    contexts = ["hi", "what now?", "tell me about rules"]
    vec = SteeringVector.from_persona_pair(plain, tok, "You love rules.", "You hate rules.", contexts, layers=(1, 2))
    other = SteeringVector.from_persona_pair(model, tok, "You love rules.", "You hate rules.", contexts, layers=(1, 2))
    assert all(torch.equal(vec.directions[k], other.directions[k]) for k in vec.layers)
    ids = tok(chat_prompt(tok, "hello"), return_tensors="pt").input_ids
    with torch.no_grad():
        with vec.apply(plain, 4.0):
            want = plain(ids).logits
        with vec.apply(model, 4.0):
            got = model(ids).logits
        slot = SteeringSlot(model, vec.layers)
        with slot:
            slot.set(vec, 4.0)
            from_slot = model(ids).logits
    scale = forward_scale(plain, ids)
    assert_close_rounding(got, want, scale)
    assert_close_rounding(from_slot, want, scale)
    a = generate(plain, tok, ["hello", "hi there"], steering=vec, coeff=4.0, sampling=Sampling(max_new_tokens=6))
    b = generate(model, tok, ["hello", "hi there"], steering=vec, coeff=4.0, sampling=Sampling(max_new_tokens=6))
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    verdicts = [default_filter(m, tok, tau=1e9)(a) for m in (plain, model)]
    # perplexity is exp(mean NLL): its relative error is the NLL's absolute one, bounded by the logits' scale
    ppl = [v.scores[PPL] for v in verdicts[1]]
    assert [v.scores[PPL] for v in verdicts[0]] == approx_rounding(ppl, scale, relative=True)
    probe = Vignettes(items=stratified_subset(load_vignettes(), 7))
    metrics = probe(model, tok).metrics
    assert probe(plain, tok).metrics == approx_rounding(metrics, max(scale, magnitude(list(metrics.values()))))


def test_bake_and_heal_refuse_offloaded_layers(plain_and_dispatched):
    plain, model, tok = plain_and_dispatched
    vec = SteeringVector.from_persona_pair(plain, tok, "You love rules.", "You hate rules.", ["hi"], layers=(1,))
    with pytest.raises(ValueError, match="bake cannot fold into layer 1: its weights are offloaded"):
        with vec.bake(model, 1.0):
            pass
    assert model.model.layers[1].mlp.down_proj.bias is None  # nothing left half-done
    outs = generate(plain, tok, ["hello", "hi there"] * 2, sampling=Sampling(max_new_tokens=4))
    with pytest.raises(ValueError, match=r"offloaded layers \(model.embed_tokens, model.layers.1, model.layers.2\)"):
        heal(
            History(model),
            tok,
            outs,
            [KLRev()],
            lora=LoraSettings(r=2, alpha=4),
            train=TrainSettings(epochs=1, batch_size=2),
            round=0,
        )
