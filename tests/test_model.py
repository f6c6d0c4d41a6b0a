import pytest
import torch
from tolerance import assert_close_rounding, forward_scale
from torch import nn

from steer_heal.models.model import (
    chat_prompt,
    decoder_blocks,
    encode,
    family_of,
    left_pad,
    resolve_layers,
    stop_token_ids,
)
from steer_heal.models.tiny import tiny_model, tiny_tokenizer


class _Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {"model_type": "bloom"})()


def test_a_table_family_without_its_blocks_names_the_override():
    with pytest.raises(ValueError, match=r"decoder blocks of this bloom model at \('transformer.h',\); pass blocks="):
        family_of(_Unknown())


def test_every_family_has_blocks(family_model):
    family, model, _ = family_model
    assert len(decoder_blocks(model)) == 4


@pytest.mark.parametrize(
    "spec, expected",
    [
        (2, (2,)),
        (-1, (29,)),
        ([3, -1, 3], (3, 29)),
        ((0.45, 0.55), (13, 14, 15, 16)),
        ((0.0, 0.0), (0,)),
        ((1.0, 1.0), (29,)),
        ((0.5, 0.5), (15,)),
    ],
)
def test_resolve_layers(spec, expected):
    assert resolve_layers(spec, 30) == expected


@pytest.mark.parametrize(
    "spec, message",
    [
        (30, r"layer 30 out of range for a model with 30 layers \(valid: -30\.\.29\)"),
        (-31, "out of range"),
        ((0.6, 0.4), "0 <= lo <= hi <= 1"),
        ((0.2, 1.5), "0 <= lo <= hi <= 1"),
        ([], "empty"),
        ([1, 0.5], "not an int"),
        (True, "layer spec must be"),
    ],
)
def test_resolve_layers_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        resolve_layers(spec, 30)


def test_chat_prompt_with_system_role():
    tok = tiny_tokenizer("chatml")
    text = chat_prompt(tok, "hello", system="You are kind.")
    assert (
        text
        == "<|im_start|>system\nYou are kind.<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chat_prompt_folds_system_into_user_when_template_has_no_system_role():
    tok = tiny_tokenizer("nosystem")
    text = chat_prompt(tok, "hello", system="You are kind.")
    assert text == "<|im_start|>user\nYou are kind.\n\nhello<|im_end|>\n<|im_start|>assistant\n"


def test_a_tokenizer_without_a_template_gets_the_base_prompt():
    tok = tiny_tokenizer("chatml")
    saved = tok.chat_template
    tok.chat_template = None  # a base model's tokenizer (issue 30: gpt2, opt, ... failed here before)
    try:
        assert chat_prompt(tok, "hello") == "User: hello\nAssistant:\n"
        assert chat_prompt(tok, "hello", system="You are warm.") == "You are warm.\n\nUser: hello\nAssistant:\n"
    finally:
        tok.chat_template = saved


def test_encode_reads_template_special_tokens():
    tok = tiny_tokenizer()
    ids = encode(tok, chat_prompt(tok, "hi"))
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.convert_tokens_to_ids("<|im_end|>") in ids


def test_stop_tokens_include_end_of_turn():
    model, tok = tiny_model("llama")
    assert tok.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(model, tok)


def test_left_pad_positions_count_real_tokens():
    ids, mask, positions = left_pad([[5, 6, 7], [8]], pad=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert positions.tolist() == [[0, 1, 2], [0, 0, 0]]
    with pytest.raises(ValueError, match="empty"):
        left_pad([[1], []], pad=0)


def test_padded_forward_matches_unpadded(llama):
    """Why position ids are passed: the padded row must see the same logits as alone."""
    model, tok = llama
    short, long = encode(tok, chat_prompt(tok, "hi")), encode(tok, chat_prompt(tok, "tell me a long story"))
    ids, mask, positions = left_pad([long, short], tok.pad_token_id)
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[1, -1]
        alone = model(input_ids=torch.tensor([short])).logits[0, -1]
        scale = forward_scale(model, torch.tensor([short]))
    assert_close_rounding(batched, alone, scale)
