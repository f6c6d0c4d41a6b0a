"""Any Hugging Face causal LM: every family of the verified table on a tiny random model,
against a hand-written expectation (tests/family_table.py), plus the three architecture
tiers (override, table, structural discovery) and their errors."""

import json

import pytest
import torch
from family_table import EXPECTED, hand_extracted
from tolerance import assert_close_rounding
from torch import nn

from steer_heal import SteeringVector
from steer_heal.errors import ModelLoadError
from steer_heal.models.architecture import (
    FAMILIES,
    architecture,
    decoder_blocks,
    discover,
    fold_verdict,
    get_path,
    register_family,
    set_architecture,
)
from steer_heal.models.loading import load_model
from steer_heal.models.model import chat_prompt, encode, end_of_turn_id
from steer_heal.models.tiny import FAMILY_NAMES, tiny_model

POS = "You are someone who looks after others' wellbeing even when it means defying authority."
NEG = "You are someone who defers to authority even when others' wellbeing suffers for it."
CONTEXTS = ["hi", "My manager told me to skip the safety check. What should I do?"]


def test_the_tested_list_is_the_table_and_covers_the_issue():
    assert set(FAMILY_NAMES) == set(EXPECTED)
    assert set(FAMILY_NAMES) == {name for name, family in FAMILIES.items() if family.tiny}
    assert len(FAMILY_NAMES) >= 25


def ids_of(tok):
    return torch.tensor([encode(tok, chat_prompt(tok, "What should I do about my boss?"))])


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_blocks_found_by_the_table_and_by_discovery_alike(family):
    model, _ = tiny_model(family)
    path = EXPECTED[family][0]
    assert architecture(model).blocks == path
    assert discover(model).blocks == path
    assert decoder_blocks(model) is get_path(model, path)
    assert len(decoder_blocks(model)) == 4


@pytest.mark.parametrize("family", FAMILY_NAMES)
@torch.no_grad()
def test_extract_and_apply_equal_a_hand_written_hook(family):
    model, tok = tiny_model(family)
    blocks = get_path(model, EXPECTED[family][0])
    layers = (1, 2)
    vec = SteeringVector.from_persona_pair(model, tok, POS, NEG, CONTEXTS, layers=list(layers))
    # extraction by hand: block outputs at the last prompt token, pos minus neg, averaged
    by_hand = hand_extracted(model, tok, blocks, layers, POS, NEG, CONTEXTS)
    for layer in layers:  # batched and padded against one at a time: equal up to reordered sums
        assert_close_rounding(vec.directions[layer], by_hand[layer], by_hand.scale)
    # apply by hand: add coeff * v to the block output
    ids, coeff = ids_of(tok), 1.7

    def add(delta):
        def hook(module, args, out):
            return (out[0] + delta, *out[1:]) if isinstance(out, tuple) else out + delta

        return hook

    handles = [blocks[layer].register_forward_hook(add(coeff * v)) for layer, v in vec.directions.items()]
    by_hand = model(ids).logits
    for h in handles:
        h.remove()
    with vec.apply(model, coeff):
        hooked = model(ids).logits
    assert torch.equal(hooked, by_hand), family
    assert (hooked - model(ids).logits).abs().max() > 1e-4  # the vector does something


@pytest.mark.parametrize("family", FAMILY_NAMES)
@torch.no_grad()
def test_bake_equals_apply_or_refuses_with_the_reason_and_restores_bitwise(family):
    model, tok = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(1)
    vec = SteeringVector({layer: torch.randn(64, generator=generator) for layer in (1, 3)}, 64, 4, f"tiny-{family}")
    ids = ids_of(tok)
    with vec.apply(model, 2.0):
        hooked = model(ids).logits
    outcome = EXPECTED[family][1]
    if outcome == "exact":
        with vec.bake(model, 2.0):
            baked = model(ids).logits
        rel = ((baked - hooked).abs().max() / hooked.abs().max()).item()
        assert rel <= 1e-5, f"{family}: bake vs apply {rel:.2e}"
    else:
        with pytest.raises(ValueError, match=rf"^cannot bake .*{outcome}.*use vec.apply"):
            with vec.bake(model, 2.0):
                pass
    with pytest.raises(RuntimeError, match="inside"):
        with vec.apply(model, 2.0):
            raise RuntimeError("inside")
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), family
    assert all(not b._forward_hooks for b in decoder_blocks(model))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_discovery_reaches_the_table_verdict_on_its_own(family):
    """Structural discovery + the one-time fold check, with the table out of the way, come to
    the same bake verdict as the table (Granite's multiplier is 0.5 in the tiny config)."""
    model, _ = tiny_model(family)
    found = discover(model)
    outcome = EXPECTED[family][1]
    verdict = fold_verdict(model, 1, found.writer) if found.writer else found.why_no_bake
    if outcome == "exact":
        assert verdict == "", (family, verdict)
        assert FAMILIES[family].writer == found.writer
    else:
        assert verdict.startswith(outcome), (family, verdict)


def test_a_post_norm_model_passed_off_as_plain_is_caught_by_the_check():
    model, tok = tiny_model("olmo2")
    set_architecture(model, blocks="model.layers", writer="mlp.down_proj")
    vec = SteeringVector({1: torch.ones(64)}, 64, 4, "tiny-olmo2")
    with pytest.raises(ValueError, match=r"post-norm: .*post_feedforward_layernorm.*off by"):
        with vec.bake(model, 1.0):
            pass


def test_opt_with_the_norm_after_the_add_is_refused():
    from transformers import AutoModelForCausalLM

    model, tok = tiny_model("opt")
    config = model.config
    config.do_layer_norm_before = False
    model = AutoModelForCausalLM.from_config(config).eval()
    vec = SteeringVector({1: torch.ones(64)}, 64, 4, model.config._name_or_path)
    with pytest.raises(ValueError, match="post-norm"):
        with vec.bake(model, 1.0, allow_other_model=True):
            pass


class Wrapped(nn.Module):
    """A model the library has never seen: blocks at an odd path, no config hints."""

    def __init__(self, n=3):
        super().__init__()
        self.config = type("Config", (), {"model_type": "homebrew", "hidden_size": 8, "num_hidden_layers": n})()
        self.trunk = nn.Module()
        self.trunk.stack = nn.ModuleList([nn.Linear(8, 8) for _ in range(n)])
        self.extra = nn.ModuleList([nn.Linear(8, 8) for _ in range(n)])


def test_blocks_not_found_names_the_override():
    with pytest.raises(
        ValueError, match=r"homebrew.*found trunk.stack .*extra .*pass blocks='path.to.layers' \(--blocks\)"
    ):
        architecture(Wrapped())
    model = Wrapped()
    assert set_architecture(model, blocks="trunk.stack").source == "override"
    assert decoder_blocks(model) is model.trunk.stack


def test_bad_overrides_are_one_line_errors():
    model, _ = tiny_model("llama")
    with pytest.raises(ValueError, match=r"^blocks='model.nope' does not exist in this LlamaForCausalLM"):
        set_architecture(model, blocks="model.nope")
    with pytest.raises(ValueError, match=r"^blocks='model.norm' is a LlamaRMSNorm, not a non-empty nn.ModuleList"):
        set_architecture(model, blocks="model.norm")
    with pytest.raises(ValueError, match=r"^writer='mlp.act_fn' is not a linear layer inside block 0"):
        set_architecture(model, blocks="model.layers", writer="mlp.act_fn")


def test_register_family_is_used_for_every_model_of_that_type():
    from steer_heal.models import architecture as arch

    model = Wrapped()
    register_family("homebrew", "trunk.stack")
    try:
        assert architecture(model).source == "registered"
        assert decoder_blocks(model) is model.trunk.stack
    finally:
        arch._REGISTERED.pop("homebrew")


def test_load_model_refuses_a_non_causal_config_before_any_weights(tmp_path):
    folder = tmp_path / "t5"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "t5"}))  # no weights at all
    with pytest.raises(
        ModelLoadError, match=r"\(t5\) is not a causal language model: .* for T5Config; steer_heal needs a decoder-only"
    ):
        load_model(str(folder))
    with pytest.raises(ModelLoadError, match=r"blocks='model.nope' does not exist"):
        (tmp_path / "q").mkdir()
        (tmp_path / "q" / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 64}))
        load_model(str(tmp_path / "q"), blocks="model.nope")


def test_end_of_turn_comes_from_the_chat_template():
    from steer_heal.models.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    assert end_of_turn_id(tok) == tok.convert_tokens_to_ids("<|im_end|>")
    other = tok.__class__(tokenizer_object=tok.backend_tokenizer, eos_token="<|endoftext|>", pad_token="<pad>")
    other.add_special_tokens({"additional_special_tokens": ["<|turn_done|>"]})
    other.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}<|turn_done|>\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    # not in any string table: read from what the template writes after an assistant turn
    assert end_of_turn_id(other) == other.convert_tokens_to_ids("<|turn_done|>")
