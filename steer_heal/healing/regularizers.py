"""Regularisers for the heal loop: what is added to the next-token NLL of the student.

Notation: `s = log p_student(. | x_<t)` and `q = log p_ref(. | x_<t)` over the vocabulary, at
the completion positions `t` of a batch (the heal loop gathers those positions before the
full-vocabulary log-softmax, so no `[batch, seq, vocab]` tensor exists for padding).

- `NLL()`: nothing added (the control).
- `KLRev`: per position `d_t = KL(student || ref) = sum_v e^{s_v} (s_v - q_v)`; mode-seeking,
  large where the student puts mass on tokens the reference finds improbable.
  `KLFwd`: `d_t = KL(ref || student) = sum_v e^{q_v} (q_v - s_v)`; mass-covering.
  Per completion `i`, `D_i = agg_t d_t` over its positions, with agg one of
  mean; rmse `sqrt(mean d^2 + eps) - sqrt(eps)` (eps = 1e-6 inside the root keeps the
  gradient finite at d = 0 and is representable in fp16/bf16; subtracting `sqrt(eps)` keeps
  D = 0 for identical models); p95 (linear-interpolated quantile); max. The penalty is the
  barrier `lam_r * mean_i relu(D_i - tau)` with `lam_r = lam * (1 + r) ** lam_round_pow` in
  round r. The barrier is per completion so that one looping completion fires even when
  the others in its batch are clean (the point of rmse over mean: 4 spiked positions of
  5.7 nats among 60 give mean 0.38 but rmse 1.47).
- `SpectralNorm(lam)`: `lam * mean_m sigma_max(scale_m * B_m A_m)` over the adapted
  modules m, sigma_max by power iteration on `W^T W` without forming `W`, warm-started
  from the previous call; `sigma = ||W v||` with the iterate `v` held fixed, so the gradient
  `u v^T` (u = Wv/|Wv|) flows into A and B.
- `Anchor(lam, div)`: `lam * mean_i D_i` on a second batch, the base model's own completions
  of neutral prompts, with `D_i` the mean KL (rev or fwd) to the base: holds the register
  of text that has nothing to do with the trait (see its docstring).
- `WeightDecay(wd)`: no loss term; decoupled (AdamW-style) decay `theta <- theta - lr*wd*theta`
  on the adapter parameters, applied by the optimiser, so it composes with any of the above.

A `Penalty` with `active=False` promises a zero gradient (an idle barrier: every D_i <= tau,
where relu' = 0); the loop then does not backpropagate it, so an idle KL barrier costs only
the reference forward and one `[n, vocab]` tensor over plain NLL.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from ..errors import InputError
from ..vocab import Aggregation, AnchorName, Number, choices

AGGREGATIONS: tuple[str, ...] = choices(Aggregation)
RMSE_EPS = 1e-6
_CHUNK = 128  # rows of [n, vocab] processed at once, to bound temporaries


@dataclass
class RegContext:
    """What the heal loop hands each regulariser for one micro-batch."""

    student: Float[Tensor, "n vocab"]  # log-probs at completion positions (with grad)
    reference: Float[Tensor, "n vocab"] | None  # same positions under the reference (no grad)
    targets: Int[Tensor, " n"]  # the completion token at each position
    rows: Int[Tensor, " n"]  # which completion (batch row) each position belongs to
    mask: Bool[Tensor, "batch seq"]  # positions whose next token is a completion token
    round: int  # heal round r (drives the lambda decay)
    adapter: str  # name of the adapter being trained
    modules: Mapping[str, nn.Module]  # peft LoRA layers holding `adapter`, by module name
    params: Sequence[nn.Parameter]  # the trainable parameters (the current adapter only)


@dataclass
class Penalty:
    """A regulariser's contribution: a scalar added to the loss, plus numbers to log."""

    loss: Float[Tensor, ""]
    logs: dict[str, float] = field(default_factory=dict)
    # False promises a zero gradient (an idle barrier, a constant): the loop then skips
    # backpropagating this term, which saves a pass over [n, vocab] and the network
    active: bool = True


@runtime_checkable
class Regularizer(Protocol):
    name: str
    needs_reference: bool  # the loop runs a reference forward only if some regulariser asks
    weight_decay: float  # decoupled decay for the optimiser; 0 for loss-only regularisers

    def __call__(self, ctx: RegContext) -> Penalty: ...


def _check_nonneg(what: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise InputError(f"{what} must be a finite number >= 0, got {value}")
    return value


def _zero(ctx: RegContext) -> Tensor:
    return ctx.student.new_zeros(())


# ---------------------------------------------------------------- divergences


def _work_dtype(t: Tensor) -> torch.dtype:
    """At least fp32: bf16/fp16 log-probs are summed over the vocabulary in fp32."""
    return torch.promote_types(t.dtype, torch.float32)


class _KLRevFn(torch.autograd.Function):
    """Row-wise KL(e^s || e^q); backward recomputes e^s so nothing [n, vocab] is saved
    beyond s (already kept by log_softmax) and q (the caller holds it anyway)."""

    @staticmethod
    def forward(ctx, s: Tensor, q: Tensor) -> Tensor:
        work = _work_dtype(s)
        out = s.new_empty(s.shape[0], dtype=work)
        for a in range(0, s.shape[0], _CHUNK):
            sc, qc = s[a : a + _CHUNK].to(work), q[a : a + _CHUNK].to(work)
            p = sc.exp()
            # 0 * log 0 = 0: positions the student rules out contribute nothing
            out[a : a + _CHUNK] = torch.where(p > 0, p * (sc - qc), 0.0).sum(-1)
        ctx.save_for_backward(s, q)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        s, q = ctx.saved_tensors
        grad_s, work = torch.empty_like(s), _work_dtype(s)
        for a in range(0, s.shape[0], _CHUNK):
            sc, qc = s[a : a + _CHUNK].to(work), q[a : a + _CHUNK].to(work)
            p = sc.exp()
            # d/ds_v [e^{s_v}(s_v - q_v)] = e^{s_v}(s_v - q_v + 1)
            g = torch.where(p > 0, p * (sc - qc + 1.0), 0.0)
            grad_s[a : a + _CHUNK] = (grad[a : a + _CHUNK, None] * g).to(s.dtype)
        return grad_s, None


class _KLFwdFn(torch.autograd.Function):
    """Row-wise KL(e^q || e^s); d/ds = -e^q, recomputed in backward."""

    @staticmethod
    def forward(ctx, s: Tensor, q: Tensor) -> Tensor:
        work = _work_dtype(s)
        out = s.new_empty(s.shape[0], dtype=work)
        for a in range(0, s.shape[0], _CHUNK):
            sc, qc = s[a : a + _CHUNK].to(work), q[a : a + _CHUNK].to(work)
            pq = qc.exp()
            out[a : a + _CHUNK] = torch.where(pq > 0, pq * (qc - sc), 0.0).sum(-1)
        ctx.save_for_backward(q)
        ctx.s_dtype = s.dtype
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        (q,) = ctx.saved_tensors
        grad_s = torch.empty(q.shape, dtype=ctx.s_dtype, device=q.device)
        for a in range(0, q.shape[0], _CHUNK):
            pq = q[a : a + _CHUNK].to(_work_dtype(grad_s)).exp()
            grad_s[a : a + _CHUNK] = (-grad[a : a + _CHUNK, None] * pq).to(ctx.s_dtype)
        return grad_s, None


def kl_rev(student: Float[Tensor, "n vocab"], reference: Float[Tensor, "n vocab"]) -> Float[Tensor, " n"]:
    """Per-position KL(student || reference) in nats, from log-probs (at least fp32)."""
    return _KLRevFn.apply(student, reference.detach())


def kl_fwd(student: Float[Tensor, "n vocab"], reference: Float[Tensor, "n vocab"]) -> Float[Tensor, " n"]:
    """Per-position KL(reference || student) in nats, from log-probs (at least fp32)."""
    return _KLFwdFn.apply(student, reference.detach())


def aggregate(d: Float[Tensor, " n"], rows: Int[Tensor, " n"], n_rows: int, agg: str) -> Float[Tensor, " rows"]:
    """Aggregate per-position values into one number per completion (row), in fp32.

    `rows` must be sorted (positions of a row contiguous), as the heal loop gathers them.
    """
    if agg not in AGGREGATIONS:
        raise InputError(f"unknown aggregation {agg!r}; choose one of {', '.join(AGGREGATIONS)}")
    d = d.float()
    counts = torch.bincount(rows, minlength=n_rows).tolist()
    if len(counts) != n_rows or min(counts) == 0:
        raise InputError(f"every one of the {n_rows} rows needs at least one position, got counts {counts}")
    out = []
    for chunk in d.split(counts):
        if agg == "mean":
            out.append(chunk.mean())
        elif agg == "rmse":
            out.append(torch.sqrt(chunk.square().mean() + RMSE_EPS) - math.sqrt(RMSE_EPS))
        elif agg == "p95":
            out.append(torch.quantile(chunk, 0.95))
        else:
            out.append(chunk.max())
    return torch.stack(out)


def barrier(per_row: Float[Tensor, " rows"], lam: float, tau: float) -> Float[Tensor, ""]:
    """`lam * mean_i relu(D_i - tau)`: zero value and zero gradient while every D_i <= tau."""
    return lam * torch.relu(per_row - tau).mean()


@dataclass(frozen=True)
class _KLBarrier:
    lam: Number = 1.0
    tau: Number = 0.5
    agg: str = "rmse"  # an `Aggregation` (checked with its own message, not by the annotation)
    lam_round_pow: Number = -0.5
    needs_reference: bool = field(default=True, init=False)
    weight_decay: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        name = type(self).__name__
        object.__setattr__(self, "lam", _check_nonneg(f"{name} lam", self.lam))
        object.__setattr__(self, "tau", _check_nonneg(f"{name} tau", self.tau))
        if self.agg not in AGGREGATIONS:
            raise InputError(f"{name} agg must be one of {', '.join(AGGREGATIONS)}, got {self.agg!r}")
        if not math.isfinite(float(self.lam_round_pow)):
            raise InputError(f"{name} lam_round_pow must be finite, got {self.lam_round_pow}")

    @property
    def name(self) -> str:
        return f"{type(self).__name__.lower()}_{self.agg}"

    def lam_at(self, r: int) -> float:
        """lam_r = lam * (1 + r) ** lam_round_pow."""
        if r < 0:
            raise InputError(f"round must be >= 0, got {r}")
        return self.lam * (1 + r) ** self.lam_round_pow

    def divergence(self, ctx: RegContext) -> Float[Tensor, " n"]:
        raise NotImplementedError

    def __call__(self, ctx: RegContext) -> Penalty:
        if ctx.reference is None:
            raise InputError(f"{self.name} needs reference log-probs; the heal loop must run the reference")
        per_row = aggregate(self.divergence(ctx), ctx.rows, ctx.mask.shape[0], self.agg)
        lam_r = self.lam_at(ctx.round)
        loss = barrier(per_row, lam_r, self.tau)
        detached = per_row.detach()
        logs = {
            "divergence": float(detached.mean()),
            "divergence_max": float(detached.max()),
            "fired": float((detached > self.tau).float().mean()),
            "barrier": float(loss.detach()),
            "lam_r": lam_r,
        }
        return Penalty(loss, logs, active=bool((detached > self.tau).any()) and lam_r > 0)


@dataclass(frozen=True)
class KLRev(_KLBarrier):
    """Barrier on reverse KL(student || ref), aggregated per completion."""

    def divergence(self, ctx: RegContext) -> Float[Tensor, " n"]:
        return kl_rev(ctx.student, ctx.reference)


@dataclass(frozen=True)
class KLFwd(_KLBarrier):
    """Barrier on forward KL(ref || student), aggregated per completion."""

    def divergence(self, ctx: RegContext) -> Float[Tensor, " n"]:
        return kl_fwd(ctx.student, ctx.reference)


ANCHOR_DIVERGENCES = tuple(name for name in choices(AnchorName) if name != "none")
MIN_ANCHOR = 8  # anchor completions heal needs: fewer would revisit the same few texts every step


@dataclass(frozen=True)
class Anchor:
    """Hold the register: a divergence to the *base* on the base's own neutral completions.

    Every heal step also runs a batch of anchor examples (the base model's own sampled
    completions of neutral prompts, `data/anchor_prompts.txt`, made once per run) through
    the student and the base, and adds `lam * mean_i D_i`, with `D_i` the mean over anchor
    completion i's positions of `KL(student || base)` (`div = "klrev"`) or `KL(base || student)`
    (`"klfwd"`): the KLRev / KLFwd barrier with `tau = 0`, mean aggregation and no decay over
    rounds. It composes with any other regulariser: they see the trait batch, it sees the
    anchor batch.

    The reference is always the base, whatever `heal(reference=...)` says: against the previous
    student, each round would only be held to the last one, so drift that accumulates a little
    per round is never pulled back (tests/test_heal.py shows it on a folded, drifted round).
    """

    lam: Number = 1.0
    div: str = "klrev"
    name: str = field(default="anchor", init=False)
    needs_reference: bool = field(default=False, init=False)  # for the trait batch: it brings its own
    weight_decay: float = field(default=0.0, init=False)
    on_anchor: bool = field(default=True, init=False)  # heal hands it the anchor batch's context

    def __post_init__(self) -> None:
        lam = float(self.lam)
        if not math.isfinite(lam) or lam <= 0:
            raise InputError(
                f"Anchor lam must be a finite number > 0, got {self.lam}; leave the anchor out to turn it off"
            )
        object.__setattr__(self, "lam", lam)
        if self.div not in ANCHOR_DIVERGENCES:
            raise InputError(f"Anchor div must be one of {', '.join(ANCHOR_DIVERGENCES)}, got {self.div!r}")

    def __call__(self, ctx: RegContext) -> Penalty:
        inner = (KLRev if self.div == "klrev" else KLFwd)(lam=self.lam, tau=0.0, agg="mean", lam_round_pow=0.0)
        penalty = inner(ctx)
        logs = {"divergence": penalty.logs["divergence"], "divergence_max": penalty.logs["divergence_max"]}
        return Penalty(penalty.loss, logs, active=penalty.active)


def on_anchor(reg: Regularizer) -> bool:
    """Whether a regulariser reads the anchor batch (`Anchor`) rather than the trait batch."""
    return bool(getattr(reg, "on_anchor", False))


# ---------------------------------------------------------------- the others


@dataclass(frozen=True)
class NLL:
    """The control: next-token NLL alone (the loop always computes it)."""

    name: str = field(default="nll", init=False)
    needs_reference: bool = field(default=False, init=False)
    weight_decay: float = field(default=0.0, init=False)

    def __call__(self, ctx: RegContext) -> Penalty:
        return Penalty(_zero(ctx), active=False)


@dataclass(frozen=True)
class WeightDecay:
    """Decoupled weight decay on the adapter (an optimiser setting; adds no loss)."""

    wd: Number = 0.01
    name: str = field(default="weight_decay", init=False)
    needs_reference: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "wd", _check_nonneg("WeightDecay wd", self.wd))

    @property
    def weight_decay(self) -> float:
        return self.wd

    def __call__(self, ctx: RegContext) -> Penalty:
        return Penalty(_zero(ctx), active=False)


def top_singular(
    a: Float[Tensor, "rank fan_in"],
    b: Float[Tensor, "fan_out rank"],
    scale: float,
    v: Float[Tensor, " fan_in"],
    n_iter: int,
) -> tuple[Float[Tensor, ""], Float[Tensor, " fan_in"]]:
    """sigma_max(scale * b @ a) by power iteration from `v`; returns (sigma with grad, new v)."""
    with torch.no_grad():
        af, bf = a.float(), b.float()
        for _ in range(n_iter):
            w = af.T @ (bf.T @ (bf @ (af @ v)))
            norm = w.norm()
            if not torch.isfinite(norm) or norm < 1e-30:
                break  # W v = 0 (e.g. B = 0 at init): keep v, sigma is 0 anyway
            v = w / norm
    sigma = (scale * (b.float() @ (a.float() @ v))).norm()
    return sigma, v


@dataclass
class SpectralNorm:
    """`lam * mean over adapted modules of sigma_max(scale * B @ A)` (power iteration)."""

    lam: Number = 1e-2
    n_iter: int = 3
    name: str = field(default="spectral_norm", init=False)
    needs_reference: bool = field(default=False, init=False)
    weight_decay: float = field(default=0.0, init=False)
    # warm starts per (adapter, module): a few iterations per step then track the top vector
    _v: dict[tuple[str, str], Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.lam = _check_nonneg("SpectralNorm lam", self.lam)
        if isinstance(self.n_iter, bool) or not isinstance(self.n_iter, int) or self.n_iter < 1:
            raise InputError(f"SpectralNorm n_iter must be an int >= 1, got {self.n_iter!r}")

    def __call__(self, ctx: RegContext) -> Penalty:
        sigmas = []
        for name, module in ctx.modules.items():
            a = module.lora_A[ctx.adapter].weight
            b = module.lora_B[ctx.adapter].weight
            key = (ctx.adapter, name)
            v = self._v.get(key)
            if v is None or v.shape[0] != a.shape[1] or v.device != a.device:
                # a fixed-seed start: deterministic and leaves the global RNG alone
                gen = torch.Generator().manual_seed(len(sigmas))
                v = torch.randn(a.shape[1], generator=gen).to(a.device)
                v = v / v.norm()
            sigma, self._v[key] = top_singular(a, b, float(module.scaling[ctx.adapter]), v, self.n_iter)
            sigmas.append(sigma)
        if not sigmas:
            raise InputError("SpectralNorm found no adapted modules for the current adapter")
        mean_sigma = torch.stack([s.to(sigmas[0].device) for s in sigmas]).mean()  # layers may span devices
        return Penalty(self.lam * mean_sigma, {"sigma_mean": float(mean_sigma.detach())}, active=self.lam > 0)
