import pytest
import torch

from steer_heal import Completion, SteeringVector, generate
from steer_heal.models.model import chat_prompt, encode, hidden_size, n_layers
from steer_heal.models.tiny import tiny_model
from steer_heal.sampling import Sampling

PROMPTS = ["hi", "tell me a story about the fox", "What matters more, rules or people?", "ok", "Please write a note."]


def big_vector(model, scale=4.0, layers=(1, 2)):
    g = torch.Generator().manual_seed(0)
    return SteeringVector(
        directions={layer: scale * torch.randn(hidden_size(model), generator=g) for layer in layers},
        hidden_size=hidden_size(model),
        n_layers=n_layers(model),
    )


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "gpt2", "gpt_neox"])
def test_greedy_batched_equals_unbatched(family):
    model, tok = tiny_model(family)
    vec = big_vector(model, scale=0.5)
    batched = generate(model, tok, PROMPTS, steering=vec, coeff=1.0, sampling=Sampling(max_new_tokens=12, batch_size=5))
    single = generate(model, tok, PROMPTS, steering=vec, coeff=1.0, sampling=Sampling(max_new_tokens=12, batch_size=1))
    assert [c.token_ids for c in batched] == [c.token_ids for c in single]
    assert [c.prompt for c in batched] == PROMPTS  # order kept despite length sorting


def test_coeff_zero_equals_vanilla_generate(llama):
    model, tok = llama
    vec = big_vector(model)
    steered = generate(
        model, tok, PROMPTS[:2], steering=vec, coeff=0.0, sampling=Sampling(max_new_tokens=10, batch_size=1)
    )
    for completion, prompt in zip(steered, PROMPTS[:2]):
        ids = torch.tensor([encode(tok, chat_prompt(tok, prompt))])
        out = model.generate(
            ids, max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id
        )
        vanilla = out[0, ids.shape[1] :].tolist()
        if tok.eos_token_id in vanilla:
            vanilla = vanilla[: vanilla.index(tok.eos_token_id)]
        assert list(completion.token_ids) == vanilla


def test_steering_changes_output_and_bias_equals_hooks(llama):
    model, tok = llama
    vec = big_vector(model)
    plain = generate(model, tok, PROMPTS, sampling=Sampling(max_new_tokens=10))
    hooks = generate(model, tok, PROMPTS, steering=vec, coeff=2.0, how="hooks", sampling=Sampling(max_new_tokens=10))
    bias = generate(model, tok, PROMPTS, steering=vec, coeff=2.0, how="bias", sampling=Sampling(max_new_tokens=10))
    assert [c.token_ids for c in hooks] != [c.token_ids for c in plain]
    assert [c.token_ids for c in hooks] == [c.token_ids for c in bias]
    assert all(c.coeff == 2.0 for c in hooks)


def test_sampling_reproducible_and_rng_untouched(llama):
    model, tok = llama
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = generate(model, tok, PROMPTS, seed=7, sampling=Sampling(do_sample=True, max_new_tokens=12, batch_size=2))
    assert torch.equal(torch.get_rng_state(), before)
    b = generate(model, tok, PROMPTS, seed=7, sampling=Sampling(do_sample=True, max_new_tokens=12, batch_size=2))
    c = generate(model, tok, PROMPTS, seed=8, sampling=Sampling(do_sample=True, max_new_tokens=12, batch_size=2))
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]


def test_finish_reason_and_record_round_trip(llama):
    model, tok = llama
    out = generate(model, tok, ["hi"], system="You are kind.", sampling=Sampling(max_new_tokens=5))[0]
    assert out.finish_reason in ("stop", "length")
    assert out.prompt_text == chat_prompt(tok, "hi", system="You are kind.")
    assert len(out.token_ids) <= 5 and tok.eos_token_id not in out.token_ids
    assert Completion.from_dict(out.to_dict()) == out


def test_stop_token_ends_completion(llama):
    model, tok = llama
    eos = tok.eos_token_id
    # force the end-of-turn token to win from the third step on with a huge logit bias
    with torch.no_grad():
        model.lm_head.weight[eos] *= 0
        bias = torch.zeros(model.lm_head.out_features)
    handle = model.lm_head.register_forward_hook(lambda m, a, out: out + bias)
    try:
        bias[eos] = 1e4
        out = generate(model, tok, ["hi"], sampling=Sampling(max_new_tokens=8))[0]
    finally:
        handle.remove()
    assert out.finish_reason == "stop" and out.token_ids == () and out.text == ""


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompts=[]), "no prompts"),
        (dict(coeff=float("nan")), "coeff must be a finite number"),
        (dict(batch_size=0), "batch_size, max_new_tokens and top_k must be >= 1"),
        (dict(do_sample=True, temperature=0.0), "temperature must be > 0"),
        (dict(prompts="hello"), "not one string"),
    ],
)
def test_generate_bad_input(llama, kwargs, message):
    model, tok = llama
    sampling_keys = {"batch_size", "do_sample", "temperature", "max_new_tokens"}
    settings = {"max_new_tokens": 2} | {k: v for k, v in kwargs.items() if k in sampling_keys}
    args = dict(prompts=["hi"], steering=big_vector(model)) | {
        k: v for k, v in kwargs.items() if k not in sampling_keys
    }
    with pytest.raises(ValueError, match=message):
        generate(model, tok, sampling=Sampling(**settings), **args)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_per_prompt_coefficients_equal_one_call_per_prompt(family):
    model, tok = tiny_model(family)
    vec = big_vector(model, scale=0.5)
    coeffs = [0.0, 1.0, 3.0, -2.0, 0.5]
    together = generate(
        model, tok, PROMPTS, steering=vec, coeff=coeffs, sampling=Sampling(max_new_tokens=12, batch_size=5)
    )
    for completion, prompt, c in zip(together, PROMPTS, coeffs):
        (alone,) = generate(model, tok, [prompt], steering=vec, coeff=c, sampling=Sampling(max_new_tokens=12))
        assert completion.token_ids == alone.token_ids and completion.coeff == c
    shared = generate(model, tok, PROMPTS, steering=vec, coeff=[2.0] * 5, sampling=Sampling(max_new_tokens=12))
    assert [c.token_ids for c in shared] == [
        c.token_ids
        for c in generate(model, tok, PROMPTS, steering=vec, coeff=2.0, sampling=Sampling(max_new_tokens=12))
    ]
    assert not any(m._forward_hooks for m in model.modules())  # per-batch hooks removed


def test_per_prompt_coefficients_bad_input(llama):
    model, tok = llama
    vec = big_vector(model)
    for kwargs in [
        dict(steering=vec, coeff=[1.0]),  # one number for two prompts
        dict(steering=vec, coeff=[1.0, 2.0], how="bias"),
        dict(coeff=[1.0, 2.0]),  # no vector
    ]:
        with pytest.raises(ValueError, match="per-prompt coefficients need a steering vector applied by hooks"):
            generate(model, tok, PROMPTS[:2], **kwargs)
    with pytest.raises(ValueError, match="per-row coefficients are empty"):
        vec.apply(model, []).__enter__()
    with pytest.raises(ValueError, match="coeff must be a finite number"):
        generate(model, tok, PROMPTS[:2], steering=vec, coeff=[1.0, float("nan")])
    ids = torch.tensor([encode(tok, "a b c")] * 3)
    with vec.apply(model, [1.0, 2.0]), pytest.raises(ValueError, match="for 2 rows but the batch has 3"):
        model(ids)  # a batch of 3 under 2 per-row coefficients fails instead of steering the wrong rows
    with vec.apply(model, [1.0, 2.0, 3.0]), pytest.raises(ValueError, match="for 3 rows but the batch has 1"):
        model(ids[:1])  # a batch of 1 would broadcast to 3 rows: it fails too
    assert not any(m._forward_hooks for m in model.modules())
