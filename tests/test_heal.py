"""Heal: tokenisation, the training loop, references, determinism, bad input."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from tolerance import assert_close_rounding, forward_scale

from steer_heal.healing.encoding import completion_nll, encode_completions
from steer_heal.healing.history import History
from steer_heal.healing.regularizers import NLL, KLRev, Penalty, SpectralNorm, WeightDecay
from steer_heal.healing.train import (
    HealDiverged,
    LoraSettings,
    TrainSettings,
    heal,
)
from steer_heal.models.logprobs import make_batch
from steer_heal.models.logprobs import target_logprobs as completion_logprobs
from steer_heal.models.model import chat_prompt, encode, end_of_turn_id, pad_id
from steer_heal.models.tiny import tiny_model
from steer_heal.steering.generation import Completion

TEXTS = [
    "I think we should help them first, even if the boss decided otherwise.",
    "The rules say one thing, but my friend needs help. I will help.",
    "Tell the manager the safety check matters more than the order.",
    "Which foundation does this act violate? Care, I would say.",
    "The quick brown fox jumps over the lazy dog.",
    "Please write a short story about a nurse and a teacher.",
]
LORA = LoraSettings(r=4, alpha=8, layers=(0.0, 1.0))
FAST = TrainSettings(epochs=1, batch_size=2, lr=1e-3, val_frac=0.0, max_steps=2)


def completions(tok, n=4, finish="stop"):
    out = []
    for i in range(n):
        prompt = f"What should I do, case {i}?"
        text = TEXTS[i % len(TEXTS)]
        out.append(Completion(prompt, text, tuple(encode(tok, text)), 1.0, finish, None, chat_prompt(tok, prompt)))
    return out


def state(adapter):
    return {k: v.clone() for k, v in adapter.state.items()}


def folded(model, seed=0):
    """A History with one round whose B is nonzero, so `prev` differs from `base`."""
    hist = History(model)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        with hist.train_adapter(LORA.config(model)) as slot:
            with torch.no_grad():
                for p in slot.params:
                    p.normal_(0, 0.2)
            adapter = hist.adapter(slot.name)
    hist.fold(adapter)
    return hist


# ---------------------------------------------------------------- data


def test_tokenisation_and_targets():
    model, tok = tiny_model("llama")
    comps = completions(tok, 2) + [replace(completions(tok, 1)[0], finish_reason="length")]
    examples, truncated = encode_completions(tok, comps, None)
    assert truncated == 0
    prompt = encode(tok, comps[0].prompt_text)
    assert examples[0].ids == tuple(prompt) + comps[0].token_ids + (end_of_turn_id(tok),)
    assert examples[0].n_prompt == len(prompt)
    assert examples[2].ids[-1] != end_of_turn_id(tok)  # cut at the token limit: no stop taught
    batch = make_batch(examples, pad_id(tok))
    for row, e in enumerate(examples):
        assert batch.targets[batch.rows == row].tolist() == list(e.ids[e.n_prompt :])
    assert int(batch.mask.sum()) == batch.index.numel() == sum(len(e.ids) - e.n_prompt for e in examples)


def test_padded_batch_logprobs_equal_single_rows():
    model, tok = tiny_model("qwen2")
    examples, _ = encode_completions(tok, completions(tok, 3), None)
    shapes = []
    handle = model.lm_head.register_forward_hook(lambda m, args, out: shapes.append(tuple(out.shape)))
    batch = make_batch(examples, pad_id(tok))
    together = completion_logprobs(model, batch)
    handle.remove()
    # the head only ever sees the completion positions: [1, n, vocab], never [batch, seq, vocab]
    assert shapes == [(1, batch.index.numel(), len(tok))] and batch.index.numel() < batch.ids.numel()
    alone = torch.cat([completion_logprobs(model, make_batch([e], pad_id(tok))) for e in examples])
    assert_close_rounding(together, alone, forward_scale(model, batch.ids))


def test_truncation_warns_with_a_count():
    model, tok = tiny_model("llama")
    comps = completions(tok, 3)
    longest = max(len(encode(tok, c.prompt_text)) for c in comps)
    with pytest.warns(UserWarning, match="3 of 3 completions exceed"):
        res = heal(model, tok, comps, [NLL()], lora=LORA, train=replace(FAST, max_len=longest + 3))
    assert res.truncated == 3 and res.n_train == 3


# ---------------------------------------------------------------- training


def test_overfits_four_completions_in_30_steps():
    model, tok = tiny_model("llama")
    # the random tiny model's head is too small (std 0.02) to express confident predictions
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
    comps = completions(tok, 4)
    before = completion_nll(model, tok, comps)
    train = TrainSettings(epochs=30, batch_size=4, lr=3e-3, val_frac=0.0)
    res = heal(model, tok, comps, [NLL()], lora=LoraSettings(r=8, alpha=16, layers=(0.0, 1.0)), train=train)
    assert len(res.steps) == 30 and res.steps[-1].lr < res.steps[3].lr  # cosine decay
    with History(model) as hist:
        hist.fold(res)
        after = completion_nll(model, tok, comps)
    assert after <= 0.5 * before, (before, after)


def test_fresh_adapter_starts_at_zero_kl_to_prev_and_only_it_trains():
    model, tok = tiny_model("llama")
    hist = folded(model)
    base = {n: p.clone() for n, p in model.named_parameters() if "lora_" not in n}
    round0 = state(hist.adapter(0))
    seen = []

    class Spy:
        name, needs_reference, weight_decay = "spy", False, 0.0

        def __call__(self, ctx):
            for n, p in model.named_parameters():
                seen.append((ctx.adapter in n) == p.requires_grad)
            assert list(ctx.params) == [p for p in model.parameters() if p.requires_grad]
            return Penalty(ctx.student.new_zeros(()))

    res = heal(hist, tok, completions(tok), [KLRev(tau=0.0), Spy()], "prev", LORA, replace(FAST, max_steps=3))
    assert res.steps[0].divergence == 0.0 and res.steps[0].barrier_grad_norm == 0.0  # B = 0: student == prev
    assert res.steps[-1].divergence > 0.0 and res.round == 1
    assert all(seen)
    assert all(torch.equal(round0[k], v) for k, v in hist.adapter(0).state.items())
    assert all(torch.equal(base[n], p) for n, p in model.named_parameters() if n in base)
    hist.close()


def test_reference_choice_and_barrier_gradient():
    model, tok = tiny_model("llama")
    hist = folded(model)
    res = heal(hist, tok, completions(tok), [KLRev(tau=0.0)], "base", LORA, replace(FAST, max_steps=1))
    step = res.steps[0]
    assert step.divergence > 0.0  # the student starts at round 0, the base is elsewhere
    assert step.barrier_grad_norm > 0.0 and step.sft_grad_norm > 0.0
    # last_good with k = 0 is the base too; with k = 1 it is round 0 (= prev)
    lg0 = heal(hist, tok, completions(tok), [KLRev(tau=0.0)], "last_good", LORA, replace(FAST, max_steps=1))
    assert lg0.steps[0].divergence == pytest.approx(step.divergence, rel=1e-5)
    hist.judge(0.99, threshold=0.9)
    lg1 = heal(hist, tok, completions(tok), [KLRev(tau=0.0)], "last_good", LORA, replace(FAST, max_steps=1))
    assert lg1.steps[0].divergence == 0.0
    hist.close()


def test_deterministic_and_leaves_no_trace():
    model, tok = tiny_model("llama")
    names = [(n, p.requires_grad) for n, p in model.named_parameters()]
    with torch.no_grad():
        before = model(torch.tensor([[5, 6, 7]])).logits.clone()
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    train = replace(FAST, max_steps=3, val_frac=0.25)
    regs = [KLRev(tau=0.0), SpectralNorm(lam=0.1)]
    a = heal(model, tok, completions(tok), regs, lora=LORA, train=train)
    b = heal(model, tok, completions(tok), [KLRev(tau=0.0), SpectralNorm(lam=0.1)], lora=LORA, train=train)
    assert a.adapter.state.keys() == b.adapter.state.keys()
    assert all(torch.equal(a.adapter.state[k], b.adapter.state[k]) for k in a.adapter.state)
    assert [s.nll for s in a.steps] == [s.nll for s in b.steps] and a.epochs == b.epochs
    assert a.n_val == 1 and a.val_nll_start is not None and a.epochs[0].val_nll is not None
    assert torch.equal(torch.get_rng_state(), rng)
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == names
    with torch.no_grad():
        assert torch.equal(model(torch.tensor([[5, 6, 7]])).logits, before)
    assert a.adapter.meta["hidden_size"] == "64" and a.adapter.meta["regularizers"] == "klrev_rmse,spectral_norm"


def test_trains_inside_no_grad_and_without_split():
    model, tok = tiny_model("llama")
    with torch.no_grad():
        res = heal(
            model, tok, completions(tok), [KLRev(tau=0.0)], "base", LORA, replace(FAST, max_steps=2, split_grads=False)
        )
    assert res.steps[-1].sft_grad_norm is None and res.steps[-1].barrier_grad_norm is None
    assert any(float(v.abs().max()) > 0 for k, v in res.adapter.state.items() if "lora_B" in k)


def test_weight_decay_composes():
    model, tok = tiny_model("llama")
    train = replace(FAST, max_steps=4, lr=1e-2, warmup=0.0, schedule="constant")
    plain = heal(model, tok, completions(tok), [KLRev()], lora=LORA, train=train)
    decayed = heal(model, tok, completions(tok), [KLRev(), WeightDecay(20.0)], lora=LORA, train=train)
    assert plain.weight_decay == 0.0 and decayed.weight_decay == 20.0

    def a_norm(res):
        return sum(float(v.norm()) for k, v in res.adapter.state.items() if "lora_A" in k)

    assert a_norm(decayed) < 0.7 * a_norm(plain)  # (1 - lr * wd) ** 4 = 0.41 of A's init


def test_non_finite_loss_names_the_step_and_keeps_the_last_good_adapter():
    model, tok = tiny_model("llama")
    calls = []

    class Poison:
        name, needs_reference, weight_decay = "poison", False, 0.0

        def __call__(self, ctx):
            calls.append(1)
            bad = math.nan if len(calls) == 3 else 0.0
            return Penalty(ctx.student.new_tensor(bad))

    with pytest.raises(HealDiverged, match="not finite at step 3") as err:
        heal(model, tok, completions(tok), [Poison()], lora=LORA, train=replace(FAST, max_steps=5, batch_size=1))
    assert err.value.step == 3 and len(err.value.result.steps) == 2
    kept = err.value.result.adapter.state
    assert kept and all(torch.isfinite(v).all() for v in kept.values())
    assert not any("lora_" in n for n, _ in model.named_parameters())  # the model is clean again


def test_every_family_heals(family_model):
    _, model, tok = family_model
    res = heal(
        model,
        tok,
        completions(tok, 2),
        [KLRev(tau=0.0)],
        lora=LoraSettings(r=2, alpha=4),
        train=replace(FAST, max_steps=1),
    )
    assert math.isfinite(res.steps[0].nll) and res.adapter.state


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m, t: heal(m, t, []), "no completions to heal on"),
        (lambda m, t: heal(m, t, completions(t), reference="teacher"), "unknown reference 'teacher'"),
        (lambda m, t: heal(m, t, completions(t), [KLRev(lam=-1.0)]), "lam must be a finite number >= 0"),
        (lambda m, t: heal(m, t, completions(t), [KLRev(tau=-1.0)]), "tau must be a finite number >= 0"),
        (lambda m, t: heal(m, t, completions(t), round=-1), "round must be an int >= 0"),
        (
            lambda m, t: heal(
                m, t, [replace(c, text="", token_ids=(), finish_reason="length") for c in completions(t)]
            ),
            "nothing to train on",
        ),
        (
            lambda m, t: heal(m, t, completions(t), lora=LoraSettings(targets=("no_such_proj",))),
            "no linear layer named",
        ),
        (lambda m, t: LoraSettings(r=0), "rank r must be an int >= 1"),
        (lambda m, t: LoraSettings(alpha=-1), "alpha must be a finite number > 0"),
        (lambda m, t: TrainSettings(batch_size=0), "batch_size must be an int >= 1"),
        (lambda m, t: TrainSettings(lr=0.0), "lr must be a finite number > 0"),
        (lambda m, t: TrainSettings(val_frac=1.0), "val_frac must be in"),
        (lambda m, t: TrainSettings(schedule="step"), "schedule must be"),
        (lambda m, t: TrainSettings(max_len=1), "max_len must be >= 2"),
    ],
)
def test_bad_input(call, match):
    model, tok = tiny_model("llama")
    with pytest.raises(ValueError, match=match):
        call(model, tok)
    assert not any("lora_" in n for n, _ in model.named_parameters())
