"""Regularisers: exact numbers, gradients, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_close_rounding, magnitude

from steer_heal.healing.regularizers import (
    NLL,
    KLFwd,
    KLRev,
    Penalty,
    RegContext,
    Regularizer,
    SpectralNorm,
    WeightDecay,
    aggregate,
    barrier,
    kl_fwd,
    kl_rev,
    top_singular,
)


def make_ctx(student, reference, counts, r=0, modules=None, adapter="a"):
    rows = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    mask = torch.zeros(len(counts), max(counts) + 1, dtype=torch.bool)
    for i, c in enumerate(counts):
        mask[i, :c] = True
    targets = torch.zeros(student.shape[0], dtype=torch.long)
    return RegContext(student, reference, targets, rows, mask, r, adapter, modules or {}, [])


def logp(n, v, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(n, v, generator=g)).log_softmax(-1)


SPIKE = 5.7  # 4 positions of 5.7 nats among 60: mean 0.38, rmse 5.7 / sqrt(15) = 1.4717


def spike_profile():
    d = torch.zeros(60)
    d[30:34] = SPIKE
    return d


# ---------------------------------------------------------------- KL


def test_kl_of_identical_distributions_is_exactly_zero():
    s = logp(9, 50, 0)
    assert torch.equal(kl_rev(s, s), torch.zeros(9))
    assert torch.equal(kl_fwd(s, s), torch.zeros(9))
    for reg in (KLRev(tau=0.0), KLFwd(tau=0.0)):
        pen = reg(make_ctx(s, s, [4, 5]))
        assert float(pen.loss) == 0.0 and pen.logs["divergence"] == 0.0


def test_kl_matches_definition():
    s, q = logp(6, 40, 1), logp(6, 40, 2)
    want_rev = (s.exp() * (s - q)).sum(-1)
    want_fwd = F.kl_div(s, q, log_target=True, reduction="none").sum(-1)  # KL(q || s)
    scale = magnitude(s, q)  # sums of terms no larger than the log-probabilities
    assert_close_rounding(kl_rev(s, q), want_rev, scale)
    assert_close_rounding(kl_fwd(s, q), want_fwd, scale)


@pytest.mark.parametrize("fn", [kl_rev, kl_fwd])
def test_kl_gradients(fn):
    s = torch.randn(5, 11, dtype=torch.float64, requires_grad=True)
    q = torch.randn(5, 11, dtype=torch.float64).log_softmax(-1)
    assert torch.autograd.gradcheck(lambda x: fn(x, q), (s,))
    # through log_softmax, as the heal loop uses it, against plain autograd
    logits = torch.randn(300, 11, requires_grad=True)  # > one chunk of rows
    q32 = q.float().repeat(60, 1)
    fn(logits.log_softmax(-1), q32).sum().backward()
    mine, logits.grad = logits.grad, None
    ls = logits.log_softmax(-1)
    naive = (ls.exp() * (ls - q32)).sum(-1) if fn is kl_rev else (q32.exp() * (q32 - ls)).sum(-1)
    naive.sum().backward()
    assert_close_rounding(mine, logits.grad, magnitude(ls, q32))


def test_kl_handles_zero_probability_tokens():
    s = torch.tensor([[0.0, -math.inf]])
    q = torch.tensor([[math.log(0.5), math.log(0.5)]])
    assert torch.isfinite(kl_rev(s, q)).all() and float(kl_rev(s, q)) == pytest.approx(math.log(2))
    assert torch.isfinite(kl_fwd(q, s.clamp_min(-1e4))).all()


# ---------------------------------------------------------------- aggregation and barrier


def test_spike_profile_numbers():
    d, rows = spike_profile(), torch.zeros(60, dtype=torch.long)
    mean, rmse = float(aggregate(d, rows, 1, "mean")), float(aggregate(d, rows, 1, "rmse"))
    assert mean == pytest.approx(0.38, abs=1e-6)
    assert rmse == pytest.approx(SPIKE / math.sqrt(15), abs=2e-3)  # 1.4717 (minus sqrt(eps) = 0.001)
    assert float(aggregate(d, rows, 1, "p95")) == pytest.approx(SPIKE)
    assert float(aggregate(d, rows, 1, "max")) == pytest.approx(SPIKE)
    # tau = 0.5: the mean barrier stays off on the loop, the rmse barrier fires
    assert float(barrier(aggregate(d, rows, 1, "mean"), 1.0, 0.5)) == 0.0
    assert float(barrier(aggregate(d, rows, 1, "rmse"), 1.0, 0.5)) == pytest.approx(rmse - 0.5)


def _student_with_kl(target: float, v: int) -> torch.Tensor:
    """log-probs p = softmax([x, 0, ..]) with KL(p || uniform) = target, by bisection on x."""
    lo, hi = 0.0, 100.0
    for _ in range(200):
        x = (lo + hi) / 2
        s = torch.zeros(v, dtype=torch.float64)
        s[0] = x
        kl = float((s.log_softmax(-1).exp() * (s.log_softmax(-1) + math.log(v))).sum())
        lo, hi = (x, hi) if kl < target else (lo, x)
    return s.log_softmax(-1).float()


def test_spike_end_to_end_rmse_fires_mean_does_not():
    v = 1000
    q = torch.full((60, v), -math.log(v))
    s = q.clone()
    s[30:34] = _student_with_kl(SPIKE, v)
    torch.testing.assert_close(kl_rev(s, q)[30:34], torch.full((4,), SPIKE), atol=1e-4, rtol=0)
    ctx = make_ctx(s, q, [60])
    off = KLRev(lam=1.0, tau=0.5, agg="mean")(ctx)
    on = KLRev(lam=1.0, tau=0.5, agg="rmse")(ctx)
    assert off.logs["divergence"] == pytest.approx(0.38, abs=1e-4) and float(off.loss) == 0.0
    assert on.logs["divergence"] == pytest.approx(1.47, abs=5e-3) and on.logs["fired"] == 1.0
    assert float(on.loss) == pytest.approx(on.logs["divergence"] - 0.5, abs=1e-6)


def test_barrier_is_per_completion():
    # one looping completion among three clean ones still fires
    d = torch.cat([spike_profile(), torch.zeros(180)])
    rows = torch.repeat_interleave(torch.arange(4), 60)
    per_row = aggregate(d, rows, 4, "rmse")
    assert float(per_row[0]) > 1.4 and float(per_row[1:].abs().max()) < 1e-9
    assert float(barrier(per_row, 1.0, 0.5)) == pytest.approx((float(per_row[0]) - 0.5) / 4)


@pytest.mark.parametrize("reg_cls", [KLRev, KLFwd])
def test_barrier_gradient_zero_below_tau(reg_cls):
    q = logp(12, 30, 3)
    s = logp(12, 30, 4).requires_grad_(True)
    pen = reg_cls(tau=100.0)(make_ctx(s, q, [5, 7]))
    assert pen.logs["divergence"] > 0.1 and float(pen.loss.detach()) == 0.0 and not pen.active
    pen.loss.backward()
    assert torch.count_nonzero(s.grad) == 0
    s.grad = None
    pen = reg_cls(tau=0.0)(make_ctx(s, q, [5, 7]))
    assert pen.active
    pen.loss.backward()
    assert s.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rmse_epsilon_survives_low_precision(dtype):
    d = torch.zeros(10, dtype=dtype, requires_grad=True)
    out = aggregate(d, torch.zeros(10, dtype=torch.long), 1, "rmse")
    out.sum().backward()
    assert float(out.detach()) == 0.0
    assert torch.isfinite(d.grad).all() and torch.count_nonzero(d.grad) == 0


def test_lambda_round_decay():
    assert KLRev(lam=2.0).lam_at(0) == 2.0
    assert KLRev(lam=2.0).lam_at(3) == pytest.approx(1.0)  # 2 * 4 ** -0.5
    assert KLRev(lam=2.0, lam_round_pow=0.0).lam_at(7) == 2.0
    s, q = logp(8, 20, 5), logp(8, 20, 6)
    p0 = KLRev(lam=1.0, tau=0.0)(make_ctx(s, q, [8], r=0))
    p3 = KLRev(lam=1.0, tau=0.0)(make_ctx(s, q, [8], r=3))
    assert float(p3.loss) == pytest.approx(float(p0.loss) / 2)


# ---------------------------------------------------------------- spectral norm, weight decay, protocol


def test_top_singular_matches_svd():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 30, generator=g), torch.randn(20, 4, generator=g)
    v = torch.randn(30, generator=g)
    sigma, _ = top_singular(a, b, 0.5, v / v.norm(), n_iter=200)
    exact = torch.linalg.matrix_norm(0.5 * b @ a, ord=2)
    assert float(sigma) == pytest.approx(float(exact), rel=1e-4)


def test_spectral_norm_on_peft_modules():
    from peft import LoraConfig, get_peft_model

    from steer_heal.models.tiny import tiny_model

    model, _ = tiny_model("llama")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    peft = get_peft_model(model, config, adapter_name="cur")
    peft.add_adapter("old", config)
    modules = {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and "cur" in m.lora_A}
    reg = SpectralNorm(lam=0.5, n_iter=3)
    ctx = make_ctx(logp(2, 5, 0), None, [2], modules=modules, adapter="cur")
    # B = 0 at init: sigma 0, finite, no NaN from normalising a zero vector
    assert float(reg(ctx).loss.detach()) == 0.0
    with torch.no_grad():
        for m in modules.values():
            m.lora_B["cur"].weight.normal_(0, 0.5)
    for _ in range(30):  # warm-started power iteration converges across calls
        pen = reg(ctx)
    exact = torch.stack(
        [
            torch.linalg.matrix_norm(m.scaling["cur"] * m.lora_B["cur"].weight @ m.lora_A["cur"].weight, ord=2)
            for m in modules.values()
        ]
    ).mean()
    assert float(pen.loss.detach()) == pytest.approx(0.5 * float(exact), rel=1e-3)
    pen.loss.backward()
    for m in modules.values():
        assert m.lora_A["cur"].weight.grad is not None and m.lora_B["cur"].weight.grad.abs().sum() > 0
        assert m.lora_A["old"].weight.grad is None and m.lora_B["old"].weight.grad is None


def test_nll_and_weight_decay_add_nothing():
    s = logp(3, 5, 0).requires_grad_(True)
    for reg in (NLL(), WeightDecay(0.1)):
        pen = reg(make_ctx(s, None, [3]))
        assert isinstance(pen, Penalty) and float(pen.loss) == 0.0 and not reg.needs_reference
    assert WeightDecay(0.1).weight_decay == 0.1 and NLL().weight_decay == 0.0 and KLRev().weight_decay == 0.0


def test_all_are_regularizers():
    for reg in (NLL(), KLRev(), KLFwd(), SpectralNorm(), WeightDecay()):
        assert isinstance(reg, Regularizer)
    assert KLRev().needs_reference and KLFwd().needs_reference and not SpectralNorm().needs_reference
    assert KLRev(agg="p95").name == "klrev_p95"


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: KLRev(lam=-1.0), "lam must be a finite number >= 0"),
        (lambda: KLFwd(tau=-0.1), "tau must be a finite number >= 0"),
        (lambda: KLRev(lam=math.nan), "lam"),
        (lambda: KLRev(agg="median"), "agg must be one of"),
        (lambda: KLRev(lam_round_pow=math.inf), "lam_round_pow"),
        (lambda: SpectralNorm(lam=-1.0), "SpectralNorm lam"),
        (lambda: SpectralNorm(n_iter=0), "n_iter"),
        (lambda: WeightDecay(-0.01), "wd"),
        (lambda: KLRev().lam_at(-1), "round must be >= 0"),
        (lambda: aggregate(torch.zeros(3), torch.zeros(3, dtype=torch.long), 1, "median"), "unknown aggregation"),
        (lambda: KLRev()(make_ctx(logp(2, 4, 0), None, [2])), "needs reference"),
    ],
)
def test_bad_input(make, match):
    with pytest.raises(ValueError, match=match):
        make()
