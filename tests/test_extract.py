import pytest
from family_table import hand_extracted
from tolerance import assert_close_rounding

from steer_heal import SteeringVector, generate
from steer_heal.models.model import chat_prompt, decoder_blocks
from steer_heal.sampling import Sampling
from steer_heal.steering.extract import last_token_states, mean_difference

POS = "You are someone who looks after others' wellbeing even when it means defying authority."
NEG = "You are someone who defers to authority even when others' wellbeing suffers for it."
CONTEXTS = [
    "hi",
    "My manager told me to skip the safety check. What should I do?",
    "tell me a story about the fox",
    "What matters more, rules or people?",
    "Please write a short note to a nurse.",
]


def reference_vector(model, tok, layers):
    """One prompt at a time, reading block outputs with plain hooks: the definition."""
    return hand_extracted(model, tok, decoder_blocks(model), layers, POS, NEG, CONTEXTS)


def test_batched_extraction_matches_one_at_a_time(family_model):
    family, model, tok = family_model
    vec = SteeringVector.from_persona_pair(
        model, tok, pos=POS, neg=NEG, contexts=CONTEXTS, layers=(0.25, 0.75), batch_size=3
    )
    assert vec.layers == (1, 2)
    expected = reference_vector(model, tok, vec.layers)
    for layer in vec.layers:
        assert_close_rounding(vec.directions[layer], expected[layer], expected.scale, msg=f"{family} layer {layer}")
    assert vec.pos == POS and vec.neg == NEG and vec.method == "mean_diff"


def test_batch_size_does_not_change_states(llama):
    model, tok = llama
    texts = [chat_prompt(tok, c) for c in CONTEXTS]
    one = last_token_states(model, tok, texts, [0, 3], batch_size=1)
    many = last_token_states(model, tok, texts, [0, 3], batch_size=4)
    for layer in (0, 3):
        assert_close_rounding(one[layer], many[layer])  # activations: their own scale


def test_extraction_leaves_no_hooks(llama):
    model, tok = llama
    mean_difference(model, tok, POS, NEG, CONTEXTS[:2], layers=[1])
    assert all(not b._forward_hooks for b in decoder_blocks(model))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(contexts=[]), "contexts is empty"),
        (dict(neg=POS), "pos and neg personas are identical"),
        (dict(layers=[7]), "out of range"),
    ],
)
def test_extraction_bad_input(llama, kwargs, message):
    model, tok = llama
    args = dict(pos=POS, neg=NEG, contexts=CONTEXTS, layers=[1]) | kwargs
    with pytest.raises(ValueError, match=message):
        SteeringVector.from_persona_pair(model, tok, **args)


@pytest.mark.real
def test_real_model_vector_changes_greedy_output_at_coeff_1_not_0(smollm2):
    model, tok = smollm2
    from steer_heal.data import load_axis, load_contexts

    vec = SteeringVector.from_persona_pair(model, tok, pos=POS, neg=NEG, contexts=load_contexts()[:32])
    assert vec.layers == (13, 14, 15, 16)
    prompts = ["My boss told me to hide a safety problem from the customers. What should I do?"]
    vanilla = generate(model, tok, prompts, sampling=Sampling(max_new_tokens=24))
    zero = generate(model, tok, prompts, steering=vec, coeff=0.0, sampling=Sampling(max_new_tokens=24))
    one = generate(model, tok, prompts, steering=vec, coeff=1.0, sampling=Sampling(max_new_tokens=24))
    assert zero[0].token_ids == vanilla[0].token_ids
    assert one[0].token_ids != vanilla[0].token_ids
    assert load_axis("authority").pos == POS
