"""History: folded rounds from one set of weights; exact base; peft and HF files."""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import torch
from tolerance import assert_close_rounding, forward_scale

from steer_heal.healing.history import Adapter, History
from steer_heal.healing.train import LoraSettings
from steer_heal.models.tiny import tiny_model

IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [20, 21, 22, 23, 24, 25, 26, 27]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.clone()


def random_round(hist: History, seed: int, r: int = 4, layers=(0.0, 1.0), targets="all-linear") -> Adapter:
    """An adapter with nonzero B (a trained round stand-in), made through the History itself."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        with hist.train_adapter(
            LoraSettings(r=r, alpha=2 * r, layers=layers, targets=targets).config(hist.model)
        ) as slot:
            with torch.no_grad():
                for p in slot.params:
                    p.normal_(0, 0.2)
            return hist.adapter(slot.name)


@pytest.fixture
def folded3():
    model, tok = tiny_model("llama")
    untouched = logits(model)
    hist = History(model)
    for seed in range(3):
        hist.fold(random_round(hist, seed))
    yield model, tok, hist, untouched
    hist.close()


def test_base_is_bitwise_after_three_folded_rounds(folded3):
    model, _, hist, untouched = folded3
    assert len(hist) == 3 and hist.names == ("round_000", "round_001", "round_002")
    student = logits(model)
    assert not torch.allclose(student, untouched, atol=1e-3)
    with hist.base():
        assert torch.equal(logits(model), untouched)
    with hist.first(0):  # no adapter active: also the plain base layers
        assert torch.equal(logits(model), untouched)
    assert torch.equal(logits(model), student)  # back to the student


def test_views(folded3):
    model, _, hist, _ = folded3
    student = logits(model)
    with hist.previous():
        previous = logits(model)
    with hist.first(2):
        assert torch.equal(logits(model), previous)
    with hist.scaled(0.0):
        assert torch.equal(logits(model), previous)
    with hist.scaled(1.0):
        assert torch.equal(logits(model), student)
    with hist.scaled(2.0):
        doubled = logits(model)
    assert not torch.allclose(doubled, student, atol=1e-4)
    with hist.student():
        assert torch.equal(logits(model), student)
    with hist.reference("prev"):
        assert torch.equal(logits(model), student)
    assert torch.equal(logits(model), student)


def test_contexts_restore_on_exceptions_and_nest(folded3):
    model, _, hist, untouched = folded3
    student = logits(model)
    with pytest.raises(RuntimeError, match="boom"):
        with hist.base():
            raise RuntimeError("boom")
    assert torch.equal(logits(model), student)
    with pytest.raises(RuntimeError, match="boom"):
        with hist.scaled(3.0):
            raise RuntimeError("boom")
    assert torch.equal(logits(model), student)
    with hist.previous():
        with hist.base():
            assert torch.equal(logits(model), untouched)
        with hist.first(1):
            one = logits(model)
        previous = logits(model)
    assert not torch.equal(one, previous)
    assert torch.equal(logits(model), student)


def test_forward_cost_is_one_pass_of_the_total_rank(folded3):
    """The folded rounds run as one stacked low-rank pass per layer, not one peft pass per round."""
    from peft.tuners.lora import LoraLayer

    model, _, hist, _ = folded3
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert layers
    for m in layers:  # peft runs no folded round itself; no per-round copy of W
        assert list(m.active_adapters) == [] and not m.merged
        assert len(m._forward_hooks) == 1
    assert hist._fused.on and set(hist._fused.total_rank.values()) == {12}  # 3 rounds of rank 4
    assert not any(p.requires_grad for n, p in model.named_parameters())  # nothing trains outside heal


def peft_sum(model, hist: History, rounds, last_scale: float = 1.0) -> torch.Tensor:
    """The same view through peft's own one-pass-per-round sum (the fused pass switched off)."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    saved = [dict(m.scaling) for m in layers]
    hist._fused.on = False
    try:
        for m in layers:
            m.set_adapter(list(rounds))
            if rounds and rounds[-1] in m.scaling:
                m.scaling[rounds[-1]] *= last_scale
        return logits(model)
    finally:
        for m, scaling in zip(layers, saved):
            m.scaling.update(scaling)
        hist._flags_set = False  # peft's set_adapter above changed grad flags: the next switch resets them
        hist._set(hist._active, hist._disabled, hist._scale)


@pytest.mark.parametrize(
    "view, rounds, last_scale",
    [
        ("student", ("round_000", "round_001", "round_002"), 1.0),
        ("previous", ("round_000", "round_001"), 1.0),
        ("first1", ("round_000",), 1.0),
        ("scaled", ("round_000", "round_001", "round_002"), -1.5),
    ],
)
def test_every_view_equals_peft_one_pass_per_round(folded3, view, rounds, last_scale):
    model, _, hist, _ = folded3
    contexts = {
        "student": hist.student,
        "previous": hist.previous,
        "first1": lambda: hist.first(1),
        "scaled": lambda: hist.scaled(-1.5),
    }
    with contexts[view]():
        fused = logits(model)
        reference = peft_sum(model, hist, rounds, last_scale)
        assert torch.equal(logits(model), fused)  # the view is back after the reference was read
        with torch.no_grad():
            scale = forward_scale(model, IDS)
    # the sum over rounds moves inside one matmul: equal up to rounding, at the forward's scale
    assert_close_rounding(fused, reference, scale)


@contextmanager
def training_on_two_rounds():
    """(model, History, TrainSlot): two folded random rounds and a nonzero adapter in training."""
    model, _ = tiny_model("llama")
    with History(model) as hist:
        for seed in range(2):
            hist.fold(random_round(hist, seed))
        with hist.train_adapter(LoraSettings(r=4, alpha=8, layers=(0.0, 1.0)).config(hist.model)) as slot:
            with torch.no_grad():
                for p in slot.params:
                    p.normal_(0, 0.2)
            yield model, hist, slot


def test_a_heal_trains_through_the_fused_rounds():
    """Gradients reach the adapter in training through the folded rounds' pass, and only it."""
    with training_on_two_rounds() as (model, _, slot):
        model(input_ids=IDS).logits.pow(2).mean().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in slot.params)
        assert not any(p.grad is not None for n, p in model.named_parameters() if "heal_in_progress" not in n)
    assert [list(m.active_adapters) for m in slot.modules.values()] == [[]] * len(slot.modules)


def layer_state(model) -> list[tuple]:
    """What a view switch sets on each LoRA layer: active adapters, the off switch, grad flags."""
    from peft.tuners.lora import LoraLayer

    return [
        (
            list(m.active_adapters),
            m.disable_adapters,
            sorted((n, p.requires_grad) for n, p in m.named_parameters() if "lora_" in n),
        )
        for m in model.modules()
        if isinstance(m, LoraLayer)
    ]


def test_direct_view_switch_leaves_layers_as_peft_switching_does():
    """`History._set` writes peft's two fields directly once grad flags are set; every view, entered
    either way during a heal, leaves each layer alike and computes the same logits bitwise."""
    with training_on_two_rounds() as (model, hist, slot):
        views = {
            "base": hist.base,
            "previous": hist.previous,
            "first1": lambda: hist.first(1),
            "scaled": lambda: hist.scaled(2.0),
            "prev": lambda: hist.reference("prev"),
        }
        seen = {}
        for direct in (True, False):
            for name, view in views.items():
                hist._flags_set = hist._flags_set and direct  # False: peft's own switch
                with view():
                    assert hist._flags_set or not direct
                    seen.setdefault(name, []).append((layer_state(model), logits(model)))
                seen.setdefault("training", []).append((layer_state(model), logits(model)))
        for name, ((state_direct, out_direct), (state_peft, out_peft), *_) in seen.items():
            assert state_direct == state_peft, name
            assert torch.equal(out_direct, out_peft), name
        student_state = seen["training"][0][0]
        assert all(s == student_state for s, _ in seen["training"])
        assert any(flag for _, _, flags in student_state for _, flag in flags)  # the slot trains
        assert all(list(a) == ["heal_in_progress"] for a, _, _ in student_state)
        assert all(p.requires_grad for p in slot.params)


def test_last_good_advances_only_when_coherent():
    model, _ = tiny_model("llama")
    with History(model) as hist:
        hist.fold(random_round(hist, 0))
        assert hist.n_good == 0
        assert hist.judge(0.95, threshold=0.9) and hist.n_good == 1
        hist.fold(random_round(hist, 1))
        assert not hist.judge(0.40, threshold=0.9) and hist.n_good == 1
        with hist.first(1):
            first = logits(model)
        with hist.reference("last_good"):
            assert torch.equal(logits(model), first)
        hist.fold(random_round(hist, 2))
        assert hist.judge(0.91, threshold=0.9) and hist.n_good == 3
        assert [r.coherence for r in hist.rounds] == [0.95, 0.40, 0.91]


def test_round_dir_loads_with_peft(folded3, tmp_path):
    from peft import PeftModel

    model, _, hist, _ = folded3
    with hist.first(1):
        want = logits(model)
    path = hist.save_round(0, tmp_path / "r0")
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    fresh, _ = tiny_model("llama")
    loaded = PeftModel.from_pretrained(fresh, str(path))
    assert_close_rounding(
        logits(loaded), want, forward_scale(model, IDS)
    )  # peft's unmerged layers sum in another order
    assert Adapter.load(path).state.keys() == hist.adapter(0).state.keys()


def test_save_and_load_history(folded3, tmp_path):
    model, _, hist, _ = folded3
    hist.judge(0.97, 0.9)
    student = logits(model)
    hist.save(tmp_path / "hist")
    fresh, _ = tiny_model("llama")
    untouched = logits(fresh)
    with History.load(fresh, tmp_path / "hist") as again:
        assert again.names == hist.names and again.n_good == 3 and again.rounds[-1].coherence == 0.97
        assert torch.equal(logits(fresh), student)
        with again.base():
            assert torch.equal(logits(fresh), untouched)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_export_merged_is_a_plain_checkpoint(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = tiny_model(family)
    with History(model) as hist:
        hist.fold(random_round(hist, 0))
        hist.fold(random_round(hist, 1, layers=(0.5, 1.0)))
        student = logits(model)
        hist.export_merged(tmp_path / "merged", tok)
        with hist.base():
            untouched = logits(model)
    plain, info = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert_close_rounding(logits(plain), student, forward_scale(plain, IDS))  # merged W + BA against W x + B(A x)
    assert torch.equal(logits(model), untouched)  # export did not touch W


def test_close_gives_the_model_back():
    from peft.tuners.tuners_utils import BaseTunerLayer

    model, _ = tiny_model("gpt2")
    before = logits(model)
    names = [(n, p.requires_grad) for n, p in model.named_parameters()]
    types = [type(m) for m in model.modules()]
    hist = History(model)
    hist.fold(random_round(hist, 0))
    assert any(isinstance(m, BaseTunerLayer) for m in model.modules())
    assert hist.close() is model
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == names
    assert [type(m) for m in model.modules()] == types
    assert torch.equal(logits(model), before)
    with pytest.raises(ValueError, match="closed"):
        hist.fold(Adapter(None, {}))


def test_every_family_recovers_base_bitwise(family_model):
    _, model, _ = family_model
    untouched = logits(model)
    with History(model) as hist:
        hist.fold(random_round(hist, 0, r=2))
        assert not torch.equal(logits(model), untouched)
        with hist.base():
            assert torch.equal(logits(model), untouched)
    assert torch.equal(logits(model), untouched)


def test_bad_input(tmp_path):
    from peft import LoraConfig, get_peft_model

    model, _ = tiny_model("llama")
    hist = History(model)
    with pytest.raises(ValueError, match="needs at least one folded round"):
        with hist.scaled(0.5):
            pass
    with pytest.raises(ValueError, match="judge\\(\\) needs a folded round"):
        hist.judge(0.9, 0.8)
    with pytest.raises(ValueError, match="unknown reference 'nope'"):
        hist.reference("nope")
    with pytest.raises(ValueError, match="fold\\(\\) takes a HealResult or an Adapter"):
        hist.fold({"not": "an adapter"})
    hist.fold(random_round(hist, 0))
    with pytest.raises(ValueError, match="first\\(k\\) needs an int 0 <= k <= 1"):
        hist.first(2)
    with pytest.raises(ValueError, match="coeff must be a finite number"):
        hist.scaled(math.nan).__enter__()
    with pytest.raises(ValueError, match="must be finite"):
        hist.judge(math.nan, 0.9)
    with pytest.raises(ValueError, match="round 5 does not exist"):
        hist.adapter(5)
    # an adapter from a narrower model does not fit
    small, _ = tiny_model("llama", hidden=32)
    with History(small) as other:
        foreign = random_round(other, 0)
    with pytest.raises(ValueError, match="does not fit this model"):
        hist.fold(foreign)
    assert len(hist) == 1 and torch.isfinite(logits(model)).all()
    labelled = Adapter(foreign.config, foreign.state, {"hidden_size": "32", "model_id": "tiny"})
    with pytest.raises(ValueError, match="adapter was trained on model 'tiny' but this model is 'tiny-llama'"):
        hist.fold(labelled)  # another model id, as vectors are checked (issue 27)
    with pytest.raises(ValueError, match="hidden_size=32"):
        hist.fold(labelled, allow_other_model=True)  # the id waived, the shape still refused
    hist.close()
    with pytest.raises(ValueError, match="no readable history.json"):
        History.load(model, tmp_path)
    wrapped, _ = tiny_model("llama")
    get_peft_model(wrapped, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="without peft adapters"):
        History(wrapped)
