"""The frozen views' log-probs kept per example during a heal (`steer_heal.healing.frozen`)."""

from __future__ import annotations

import pytest
import torch
from test_heal import completions
from tolerance import assert_close_rounding

from steer_heal.healing import History
from steer_heal.healing.frozen import FrozenLogprobs
from steer_heal.healing.lora import LoraSettings
from steer_heal.healing.regularizers import Anchor, KLRev
from steer_heal.healing.train import TrainSettings, heal
from steer_heal.models.logprobs import Example, make_batch

LORA = LoraSettings(r=4, alpha=8, layers=(0.0, 1.0))


class Marked:
    """A frozen 'view' whose log-probs say which call made them: every row of call k is k,
    so the test can see from which batch each example's numbers came."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, ...]] = []

    def __call__(self, batch):
        self.calls.append(tuple(batch.ids.shape))
        return torch.full((batch.index.numel(), 3), float(len(self.calls)))


def examples(n: int) -> list[Example]:
    return [Example(tuple(range(1, 3 + i)), 1) for i in range(n)]  # 1 + i targets each


def test_each_example_is_served_from_its_home_batch():
    ex = examples(4)
    make = lambda xs: make_batch(xs, 0)  # noqa: E731
    view = Marked()
    store = FrozenLogprobs(view, make, ex, vocab=3, budget_bytes=1e9)
    assert store.on and store.need == (1 + 2 + 3 + 4) * 3 * 4
    first, second = [ex[0], ex[1]], [ex[2], ex[3]]
    store.see(first)
    store.see(second)
    assert store.logprobs(first, make(first)).flatten().unique().tolist() == [1.0]  # computed: call 1
    # a later batch mixing both homes: nothing recomputed for ex[0]; ex[3]'s home (call 2) runs whole
    mixed = [ex[3], ex[0]]
    store.see(mixed)  # not their home: they were seen before
    got = store.logprobs(mixed, make(mixed))
    assert got[:4].unique().tolist() == [2.0] and got[4:].unique().tolist() == [1.0]
    assert view.calls == [(2, 3), (2, 5)]  # the home batches' own shapes, not the mixed one's
    assert store.logprobs(second, make(second)).unique().tolist() == [2.0] and store.forwards == 2


def test_over_budget_the_store_is_off_and_every_batch_runs():
    ex = examples(2)
    view = Marked()
    store = FrozenLogprobs(view, lambda xs: make_batch(xs, 0), ex, vocab=3, budget_bytes=(1 + 2) * 3 * 4 - 1)
    assert not store.on
    for _ in range(3):
        store.see(ex)
        store.logprobs(ex, make_batch(ex, 0))
    assert store.forwards == 3 and len(view.calls) == 3


@pytest.mark.parametrize("regs", ["klrev", "klrev+anchor"])
def test_a_heal_with_the_store_equals_one_without(llama, regs):
    """First epoch bitwise (its home batches are the batches it runs), later epochs up to
    rounding (their frozen numbers come from another batch's padding), and fewer frozen forwards."""
    model, tok = llama
    reg = [KLRev(lam=1.0, tau=0.0, agg="rmse")] + ([Anchor(lam=1.0)] if "anchor" in regs else [])
    anchor = completions(tok, 10)[2:] if "anchor" in regs else ()
    results, forwards = {}, {}
    for gib in (2.0, 0.0):
        calls = []
        real = FrozenLogprobs.logprobs

        def counting(self, xs, batch, real=real, calls=calls):
            before = self.forwards
            out = real(self, xs, batch)
            calls.append(self.forwards - before)
            return out

        FrozenLogprobs.logprobs = counting
        try:
            hist = History(model)
            try:
                train = TrainSettings(epochs=3, batch_size=2, lr=1e-3, val_frac=0.0, seed=5, frozen_cache_gib=gib)
                results[gib] = heal(hist, tok, completions(tok, 6), reg, reference="prev", train=train, anchor=anchor)
            finally:
                hist.close()
        finally:
            FrozenLogprobs.logprobs = real
        forwards[gib] = sum(calls)
    kept, plain = results[2.0], results[0.0]
    per_epoch = 3  # 6 completions in batches of 2
    for a, b in zip(kept.steps[:per_epoch], plain.steps[:per_epoch]):
        assert vars(a) == vars(b)  # bitwise: the same batches computed the same way
    for a, b in zip(kept.steps, plain.steps):
        assert_close_rounding(a.nll, b.nll, scale=10.0)
        assert_close_rounding(a.grad_norm, b.grad_norm, scale=10.0)
    for key, value in plain.adapter.state.items():
        assert_close_rounding(kept.adapter.state[key], value, scale=1.0)
    # without the store every step runs each frozen view once; with it only the home batches run
    views = 2 if anchor else 1
    assert forwards[0.0] == 9 * views
    assert forwards[2.0] == per_epoch + (4 if anchor else 0)  # 3 trait batches; 8 anchor texts in 4 batches


def test_frozen_cache_gib_must_be_a_number_at_least_zero():
    with pytest.raises(ValueError, match=r"TrainSettings.frozen_cache_gib must be a number >= 0, got -1"):
        TrainSettings(frozen_cache_gib=-1)
