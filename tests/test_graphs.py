"""CUDA-graph decoding (`steer_heal.steering.graphs`).

On the CPU the capture is emulated (`capture=False`: static buffers, one output object
rewritten in place, replay = the step run on the buffers), which checks everything but the
recording itself: that transformers' static-cache loop, served that way, draws exactly the
tokens it draws by itself, steered per row and through a History view too. The CUDA tests
check the recording against eager decoding in float32."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from transformers import GenerationConfig

from steer_heal import SteeringVector, generate
from steer_heal.healing import History
from steer_heal.healing.lora import LoraSettings
from steer_heal.models.model import chat_prompt, encode, hidden_size, left_pad, n_layers, pad_id
from steer_heal.models.tiny import tiny_model
from steer_heal.runtime import seeded
from steer_heal.sampling import Sampling
from steer_heal.steering.graphs import GraphedDecode, decode_graphs, graphable, is_decode_step

PROMPTS = ["hi", "tell me a story about the fox", "What matters more, rules or people?", "ok"]
NEW = 9


def vector(model, scale=2.0, layers=(1, 2)):
    g = torch.Generator().manual_seed(0)
    size = hidden_size(model)
    return SteeringVector({k: scale * torch.randn(size, generator=g) for k in layers}, size, n_layers(model))


def batch(model, tok, device="cpu"):
    ids, mask, _ = left_pad([encode(tok, chat_prompt(tok, p)) for p in PROMPTS], pad_id(tok), device)
    return ids, mask


def static_config(tok, do_sample):
    extra = {"temperature": 0.8, "top_k": 20, "top_p": 0.9} if do_sample else {}
    return GenerationConfig(
        max_new_tokens=NEW,
        do_sample=do_sample,
        pad_token_id=pad_id(tok),
        eos_token_id=tok.eos_token_id,
        cache_implementation="static",
        disable_compile=True,
        **extra,
    )


def decode(model, tok, do_sample, capture=None, device="cpu"):
    """One batch through transformers' static-cache loop: by itself (capture None) or served by
    a GraphedDecode (capture False: emulated, True: recorded). Returns (tokens, counts)."""
    ids, mask = batch(model, tok, device)
    config = static_config(tok, do_sample)
    with seeded(3, device):
        if capture is None:
            return model.generate(input_ids=ids, attention_mask=mask, generation_config=config), None
        with decode_graphs(model, capture=capture) as graphed:
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        return out, dict(graphed.counts)


@pytest.mark.parametrize("do_sample", [False, True])
def test_emulated_replay_draws_what_the_static_cache_loop_draws(llama, do_sample):
    model, tok = llama
    ref, _ = decode(model, tok, do_sample)
    got, counts = decode(model, tok, do_sample, capture=False)
    assert torch.equal(got, ref)
    # the prefill and the first step run the model's own forward; every later step replays
    assert counts == {"eager": 2, "captured": 0, "replayed": NEW - 2}


@pytest.mark.parametrize("family", ["qwen2", "gpt2", "gpt_neox"])
def test_emulated_replay_in_other_families(family):
    model, tok = tiny_model(family)  # qwen2 passes a mask per attention type: a dict of tensors
    ref, _ = decode(model, tok, True)
    got, counts = decode(model, tok, True, capture=False)
    assert torch.equal(got, ref)
    assert counts == {"eager": 2, "captured": 0, "replayed": NEW - 2}


def test_a_sliding_window_cache_is_never_replayed():
    model, tok = tiny_model("gemma3")  # its layers' cache length is a Python int a graph would freeze
    assert "sliding_attention layers keep their cache length on the host" in graphable(model)
    ref, _ = decode(model, tok, True)
    with pytest.warns(RuntimeWarning, match="keeps state on the host"):
        got, counts = decode(model, tok, True, capture=False)
    assert torch.equal(got, ref)
    assert counts == {"eager": NEW, "captured": 0, "replayed": 0}


def test_emulated_replay_steered_per_row_and_through_a_history_view(llama):
    model, tok = llama
    hist = History(model)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(1)
            settings = LoraSettings(r=4, alpha=8, layers=(0.0, 1.0))
            with hist.train_adapter(settings.config(hist.model)) as slot, torch.no_grad():
                for p in slot.params:
                    p.normal_(0, 0.3)
                adapter = hist.adapter(slot.name)
        hist.fold(adapter)
        vec = vector(model)
        coeffs = [0.0, 1.5, -1.0, 3.0]
        for view in (hist.student, hist.base):
            with view(), vec.apply(hist.model, coeffs):
                ref, _ = decode(hist.model, tok, True)
                got, counts = decode(hist.model, tok, True, capture=False)
            assert torch.equal(got, ref)
            assert counts["replayed"] == NEW - 2
    finally:
        hist.close()


def test_the_models_forward_is_back_after_the_batch_even_on_error(llama):
    model, tok = llama
    own = type(model).forward
    assert "forward" not in model.__dict__
    signature = inspect.signature(model.forward)
    with pytest.raises(RuntimeError, match="stop here"):
        with decode_graphs(model, capture=False) as graphed:
            assert isinstance(model.forward, GraphedDecode) and graphed is model.forward
            # transformers decides what to pass (position ids, the mask) from the forward's parameters
            assert inspect.signature(model.forward) == signature
            raise RuntimeError("stop here")
    assert "forward" not in model.__dict__ and type(model).forward is own
    ids, mask = batch(model, tok)
    assert model(input_ids=ids, attention_mask=mask).logits.shape[:2] == ids.shape


def test_a_step_unlike_the_captured_one_runs_the_real_forward(llama):
    from types import SimpleNamespace

    from transformers.cache_utils import StaticCache

    model, tok = llama
    calls = []

    def forward(*args, **kwargs):  # stands in for the model: records what it was called with
        calls.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})
        return SimpleNamespace(logits=torch.full((kwargs["input_ids"].shape[0], 1, 3), float(len(calls))))

    cache = StaticCache(config=model.config, max_cache_len=8)
    graphed = GraphedDecode(forward, torch.device("cpu"), capture=False)
    ids = torch.tensor([[5], [6]])
    step = {"input_ids": ids, "past_key_values": cache, "use_cache": True}
    assert is_decode_step((), step) and not is_decode_step((ids,), {"past_key_values": cache})
    assert not is_decode_step((), {**step, "past_key_values": None})
    graphed(input_ids=torch.tensor([[1, 2, 3], [4, 5, 6]]), past_key_values=cache)  # a prefill
    graphed(**step)  # warm-up
    first = graphed(**step)  # captured (emulated) and replayed
    second = graphed(**{**step, "input_ids": ids + 1})  # replayed on the buffers: the same output object
    assert second is first and float(first.logits[0, 0, 0]) == 4.0
    assert torch.equal(calls[-1]["input_ids"], ids + 1)  # the buffers held this step's tokens
    graphed(**{**step, "input_ids": torch.tensor([[5]])})  # other rows: not the captured step
    graphed(**{**step, "use_cache": False})  # another flag: not the captured step
    graphed(**{**step, "input_ids": ids.int()})  # another dtype: not the captured step
    assert graphed.counts == {"eager": 5, "captured": 0, "replayed": 2}
    assert len(calls) == 7


def test_graphable_says_why_not(llama):
    model, tok = llama
    assert "not all on one CUDA device" in graphable(model)
    vec = vector(model)
    with vec.apply(model, 1.0):  # plain additive hooks are recorded with the step: not a reason
        assert "CUDA device" in graphable(model)
    with vec.using(positions="generated").apply(model, 1.0):
        assert "positional steering" in graphable(model)


def test_cuda_graphs_is_a_no_op_on_the_cpu(llama):
    model, tok = llama
    vec = vector(model)
    on, off = (Sampling(max_new_tokens=6, batch_size=2, cuda_graphs=flag) for flag in (True, False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning on a CPU: graphs are for CUDA devices only
        got = generate(model, tok, PROMPTS, steering=vec, coeff=1.0, sampling=on)
    ref = generate(model, tok, PROMPTS, steering=vec, coeff=1.0, sampling=off)
    assert [c.token_ids for c in got] == [c.token_ids for c in ref]


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


@cuda
@pytest.mark.parametrize("do_sample", [False, True])
def test_cuda_recorded_steps_draw_what_the_eager_static_loop_draws(do_sample):
    model, tok = tiny_model("llama")
    model = model.to("cuda", torch.float32)
    vec = vector(model)
    with vec.apply(model, [0.0, 1.5, -1.0, 3.0]):
        ref, _ = decode(model, tok, do_sample, device="cuda")
        got, counts = decode(model, tok, do_sample, capture=True, device="cuda")
    assert counts == {"eager": 2, "captured": 1, "replayed": NEW - 2}
    assert torch.equal(got, ref)


@cuda
def test_cuda_generate_with_graphs_equals_eager_generate_in_fp32():
    model, tok = tiny_model("llama")
    model = model.to("cuda", torch.float32)
    vec = vector(model, scale=0.5)
    args = dict(steering=vec, coeff=1.0)
    on, off = (Sampling(max_new_tokens=16, batch_size=2, cuda_graphs=flag) for flag in (True, False))
    got = generate(model, tok, PROMPTS, sampling=on, **args)
    ref = generate(model, tok, PROMPTS, sampling=off, **args)
    assert [c.token_ids for c in got] == [c.token_ids for c in ref]
    assert "forward" not in model.__dict__
