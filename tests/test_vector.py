import math

import pytest
import torch
from family_table import EXPECTED
from tolerance import assert_close_rounding, forward_scale, magnitude

from steer_heal import SteeringVector
from steer_heal.models.model import chat_prompt, decoder_blocks, encode, hidden_size, model_id, n_layers
from steer_heal.models.tiny import tiny_model


def random_vector(model, layers=(1, 2), scale=1.0, seed=0) -> SteeringVector:
    g = torch.Generator().manual_seed(seed)
    size = hidden_size(model)
    return SteeringVector(
        directions={layer: scale * torch.randn(size, generator=g) for layer in layers},
        hidden_size=size,
        n_layers=n_layers(model),
        model_id=model_id(model),  # the model it steers: a vector of another model id is refused
    )


def prompt_ids(tok, text="tell me about the fox"):
    return torch.tensor([encode(tok, chat_prompt(tok, text))])


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_bitwise_same(before, model):
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key


@torch.no_grad()
def test_bake_equals_apply(family_model):
    family, model, tok = family_model
    vec = random_vector(model, scale=0.5)
    ids = prompt_ids(tok)
    base = model(ids).logits
    with vec.apply(model, coeff=2.0):
        hooked = model(ids).logits
    assert (hooked - base).abs().max() > 1e-3  # the vector does something
    if EXPECTED[family][1] != "exact":
        with pytest.raises(ValueError, match=rf"{EXPECTED[family][1]}.*use vec.apply"):
            with vec.bake(model, coeff=2.0):
                pass
        return
    with vec.bake(model, coeff=2.0):
        baked = model(ids).logits
    rel = ((baked - hooked).abs().max() / hooked.abs().max()).item()
    assert rel <= 1e-5, f"{family}: bake vs apply rel diff {rel:.2e}"


@torch.no_grad()
def test_state_restored_bitwise_after_exit_and_exception(family_model):
    family, model, tok = family_model
    vec = random_vector(model)
    before = snapshot(model)
    managers = [vec.apply] if EXPECTED[family][1] != "exact" else [vec.apply, vec.bake]
    for manager in managers:
        with manager(model, coeff=3.0):
            model(prompt_ids(tok))
        assert_bitwise_same(before, model)
        with pytest.raises(RuntimeError, match="boom"):
            with manager(model, coeff=3.0):
                raise RuntimeError("boom")
        assert_bitwise_same(before, model)
    assert all(not block._forward_hooks for block in decoder_blocks(model))


@torch.no_grad()
def test_hook_adds_coeff_times_v_at_every_position(llama):
    """Parity with the definition: block 2 receives h_1 + coeff * v_1 at every position."""
    model, tok = llama
    vec = random_vector(model, layers=(1,))
    seen = []

    def record(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).clone())

    handle = decoder_blocks(model)[2].register_forward_pre_hook(record, with_kwargs=True)
    try:
        ids = prompt_ids(tok)
        model(ids)
        with vec.apply(model, coeff=0.7):
            model(ids)
    finally:
        handle.remove()
    plain, steered = seen
    expected = (0.7 * vec.directions[1]).expand_as(plain)
    # (plain + delta) - plain rounds at the scale of the hidden states, not of delta
    assert_close_rounding(steered - plain, expected, magnitude(plain, steered))


@torch.no_grad()
def test_coeff_zero_is_vanilla_bitwise(family_model):
    family, model, tok = family_model
    vec = random_vector(model)
    ids = prompt_ids(tok)
    base = model(ids).logits
    with vec.apply(model, coeff=0.0):
        assert torch.equal(model(ids).logits, base)


@torch.no_grad()
def test_nested_vectors_add(llama):
    model, tok = llama
    a, b = random_vector(model, layers=(1, 2), seed=1), random_vector(model, layers=(2, 3), seed=2)
    ids = prompt_ids(tok)
    with a.apply(model, 0.5), b.apply(model, 0.5):
        nested = model(ids).logits
    with (a + b).apply(model, 0.5):
        summed = model(ids).logits
    with a.bake(model, 0.5), b.bake(model, 0.5):
        baked = model(ids).logits
    with (a + b).apply(model, 0.5):  # (h + a) + b against h + (a + b): one reordered sum a layer
        scale = forward_scale(model, ids)
    assert_close_rounding(nested, summed, scale)
    assert_close_rounding(baked, summed, scale)


def test_algebra(llama):
    model, _ = llama
    a = random_vector(model, layers=(1, 2), seed=1)
    b = random_vector(model, layers=(2, 3), seed=2)
    assert (a + b).layers == (1, 2, 3)
    torch.testing.assert_close((a + b).directions[2], a.directions[2] + b.directions[2])
    torch.testing.assert_close((a - b).directions[3], -b.directions[3])
    torch.testing.assert_close((2 * a).directions[1], 2 * a.directions[1])
    assert (a * 3).norms()[1] == pytest.approx(3 * a.norms()[1], rel=1e-6)
    assert a.cosine(a * 2) == pytest.approx(1.0)
    assert a.cosine(-a) == pytest.approx(-1.0)
    expected = torch.nn.functional.cosine_similarity(a.directions[2], b.directions[2], dim=0).item()
    assert a.cosine(b) == pytest.approx(expected, abs=1e-6)  # only layer 2 is shared
    with pytest.raises(ValueError, match="no shared layers"):
        random_vector(model, layers=(0,)).cosine(random_vector(model, layers=(3,)))


def test_save_load_round_trip(tmp_path, llama):
    model, _ = llama
    vec = SteeringVector(
        directions=random_vector(model).directions,
        hidden_size=64,
        n_layers=4,
        model_id="tiny-llama",
        pos="You are kind.",
        neg="You are cruel.",
        extra={"n_contexts": "3"},
    )
    path = vec.save(tmp_path / "sub" / "v.safetensors")
    loaded = SteeringVector.load(path)
    assert loaded.layers == vec.layers
    for layer in vec.layers:
        assert torch.equal(loaded.directions[layer], vec.directions[layer])
    assert (loaded.model_id, loaded.pos, loaded.neg, loaded.extra) == (
        "tiny-llama",
        "You are kind.",
        "You are cruel.",
        {"n_contexts": "3"},
    )
    assert sorted(p.name for p in path.parent.iterdir()) == ["v.safetensors"]  # no temp files left


def test_load_onto_other_model_names_both_sizes(tmp_path):
    model, _ = tiny_model("llama")
    other, _ = tiny_model("llama", hidden=32)
    path = random_vector(model).save(tmp_path / "v.safetensors")
    with pytest.raises(ValueError, match="hidden size 64 .* has hidden size 32"):
        with SteeringVector.load(path).apply(other, 1.0):
            pass
    shallow, _ = tiny_model("llama", layers=2)
    with pytest.raises(ValueError, match="uses layer 2 .* this model has 2 layers"):
        with random_vector(model, layers=(2,)).bake(shallow, 1.0):
            pass


def test_corrupt_and_truncated_files(tmp_path, llama):
    model, _ = llama
    path = random_vector(model).save(tmp_path / "v.safetensors")
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    for name in ("trunc", "junk"):
        with pytest.raises(ValueError, match="corrupt or truncated"):
            SteeringVector.load(tmp_path / f"{name}.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(3)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="not a steer_heal vector"):
        SteeringVector.load(tmp_path / "foreign.safetensors")
    with pytest.raises(FileNotFoundError):
        SteeringVector.load(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_vector_and_coeff(llama, bad):
    model, _ = llama
    v = torch.ones(64)
    v[3] = bad
    with pytest.raises(ValueError, match="non-finite"):
        SteeringVector(directions={1: v}, hidden_size=64, n_layers=4)
    with pytest.raises(ValueError, match="coeff must be a finite number"):
        with random_vector(model).apply(model, coeff=bad):
            pass


def test_wrong_shape_and_layer_rejected():
    with pytest.raises(ValueError, match="expected hidden size 64"):
        SteeringVector(directions={1: torch.ones(8)}, hidden_size=64, n_layers=4)
    with pytest.raises(ValueError, match="out of range"):
        SteeringVector(directions={4: torch.ones(64)}, hidden_size=64, n_layers=4)


def test_steer_rejects_unknown_mode(llama):
    from steer_heal.steering.vector import steer

    model, _ = llama
    with pytest.raises(ValueError, match="steering mode must be 'hooks' or 'bias'"):
        with steer(model, random_vector(model), 1.0, how="magic"):
            pass
