"""Heal: distil kept completions into a fresh LoRA with a divergence barrier.

Each completion becomes `prompt_ids + completion_ids (+ end_of_turn)` (`steer_heal.healing.encoding`).
The loss is

    L = (1/N) sum_{t in completion} -log p_student(x_t | x_<t)  +  sum_k R_k(ctx)

over the N completion tokens of a micro-batch (token-weighted), with the regularisers R_k
of `steer_heal.healing.regularizers`. Log-probs come from the one engine, `steer_heal.models.logprobs`:
only the completion positions reach the output head, so logits are `[N, vocab]` and never
`[batch, seq, vocab]`. The adapter's shape comes from `LoraSettings` (`steer_heal.healing.lora`).

The adapter is peft LoRA with B = 0 at init, so the first step's student equals the
reference `prev` exactly (KL = 0). The reference is the same weights with other adapters
active (see `History`): `base` (none), `prev` (all folded rounds), `last_good` (the first k).
Optimiser: AdamW on the adapter only, decoupled weight decay = sum of the regularisers'
`weight_decay`, linear warmup then cosine (or linear / constant) decay, gradient clipping.
Regularisers whose `Penalty.active` is False (an idle barrier) are not differentiated. When
one is active, its gradient and the NLL's are computed separately (one more backward
through the network) so the log can compare their norms (`split_grads=False` saves that).
A non-finite loss or gradient stops the run before the update is applied: the raised
`HealDiverged` names the step and carries the last good adapter. The frozen views' log-probs
(the reference's, the base's on the anchor) are computed once per example, not once per
epoch (`steer_heal.healing.frozen`, `frozen_cache_gib`); with `joint_anchor` the student reads a
step's trait and anchor micro-batches in one forward.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .._version import __version__
from ..errors import InputError, OutOfMemory, SteerHealError, is_out_of_memory
from ..models.logprobs import Batch, Example, make_batch, mean_nll, target_logprobs
from ..models.model import hidden_size, input_device, model_id, n_layers, pad_id, unwrap
from ..runtime import eval_mode, seeded
from ..shards import map_batches, send, width
from ..steering.generation import Completion
from ..vocab import Number, Reference, Schedule, check_choice, choices
from .encoding import context_length, encode_completions
from .frozen import FrozenLogprobs
from .history import Adapter, History, TrainSlot
from .lora import LoraSettings
from .regularizers import MIN_ANCHOR, KLRev, Penalty, RegContext, Regularizer, on_anchor

__all__ = ["EpochLog", "HealDiverged", "HealResult", "LoraSettings", "StepLog", "TrainSettings", "heal"]


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 6
    batch_size: int = 4
    grad_accum: int = 1
    lr: Number = 1e-4
    betas: tuple[Number, Number] = (0.9, 0.95)
    warmup: Number = 0.1  # fraction of the optimiser steps
    schedule: str = "cosine"  # a `Schedule`
    clip: Number | None = 1.0
    val_frac: Number = 1 / 8
    seed: int = 42
    max_len: int | None = None  # tokens per sequence; None: the model's context length
    max_steps: int | None = None  # stop after this many optimiser steps
    split_grads: bool = True  # log barrier vs NLL gradient norms (one more backward while a barrier is active)
    # keep the frozen views' log-probs (the reference's, the base's on the anchor) per example, up to this
    # many GiB for the heal (`steer_heal.healing.frozen`); 0: every micro-batch runs them again
    frozen_cache_gib: Number = 2.0
    # the student reads a step's trait and anchor micro-batches in one forward (True), in two (False),
    # or in one on an accelerator when padding to one width adds at most half the tokens (None, auto:
    # the default; on an H100 the full preset's SmolLM2-shape heal took 0.59 x the time, docs/benchmarks.md)
    joint_anchor: bool | None = None
    # blow-up check after each epoch: the held-out NLL (the training NLL without a held-out
    # set) may not exceed this multiple of its value before training (None: no check)
    max_nll_rise: Number | None = 2.0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"TrainSettings.{name} must be an int >= 1, got {value!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"TrainSettings.lr must be a finite number > 0, got {self.lr!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise InputError(f"TrainSettings.betas must be two numbers in [0, 1), got {self.betas!r}")
        if not 0 <= self.warmup < 1:
            raise InputError(f"TrainSettings.warmup is a fraction of the steps in [0, 1), got {self.warmup!r}")
        check_choice("TrainSettings.schedule", self.schedule, Schedule)
        if self.clip is not None and not (math.isfinite(self.clip) and self.clip > 0):
            raise InputError(f"TrainSettings.clip must be > 0 or None, got {self.clip!r}")
        if not 0 <= self.val_frac < 1:
            raise InputError(f"TrainSettings.val_frac must be in [0, 1), got {self.val_frac!r}")
        if self.max_len is not None and self.max_len < 2:
            raise InputError(f"TrainSettings.max_len must be >= 2 tokens or None, got {self.max_len!r}")
        if self.max_nll_rise is not None and not (math.isfinite(self.max_nll_rise) and self.max_nll_rise > 1):
            raise InputError(f"TrainSettings.max_nll_rise must be a number > 1 or None, got {self.max_nll_rise!r}")
        if not (math.isfinite(self.frozen_cache_gib) and self.frozen_cache_gib >= 0):
            raise InputError(f"TrainSettings.frozen_cache_gib must be a number >= 0, got {self.frozen_cache_gib!r}")
        if self.joint_anchor is not None and not isinstance(self.joint_anchor, bool):
            raise InputError(
                f"TrainSettings.joint_anchor must be True, False or None (auto), got {self.joint_anchor!r}"
            )
        if self.max_steps is not None and self.max_steps < 1:
            raise InputError(f"TrainSettings.max_steps must be >= 1 or None, got {self.max_steps!r}")

    def lr_factor(self, step: int, total: int) -> float:
        """Multiplier of lr at optimiser step `step` (0-based) of `total`."""
        warm = math.ceil(self.warmup * total)
        if step < warm:
            return (step + 1) / warm
        if self.schedule == "constant":
            return 1.0
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * progress)) if self.schedule == "cosine" else 1.0 - progress


@dataclass
class StepLog:
    step: int  # optimiser step, 1-based
    epoch: int
    nll: float  # token-weighted over the step's micro-batches
    lr: float
    grad_norm: float  # before clipping
    sft_grad_norm: float | None  # the NLL's gradient alone (None when not split)
    barrier_grad_norm: float | None  # the regularisers' gradient alone (0 while inactive)
    divergence: float | None  # first divergence regulariser's mean D (None without one)
    tokens: int  # completion tokens in the step
    extra: dict[str, float] = field(default_factory=dict)  # every regulariser's logs, "name.key"


@dataclass
class EpochLog:
    epoch: int
    train_nll: float  # running, token-weighted, during the epoch
    val_nll: float | None  # after the epoch, on the held-out completions


@dataclass
class HealResult:
    adapter: Adapter
    steps: list[StepLog]
    epochs: list[EpochLog]
    val_nll_start: float | None
    n_train: int
    n_val: int
    truncated: int
    round: int
    reference: str
    weight_decay: float
    seconds: float


class HealDiverged(SteerHealError, RuntimeError):
    """Training blew up (non-finite loss, gradient or weights, or a validation NLL at the
    uniform distribution's or rising past `TrainSettings.max_nll_rise` x its start);
    `result` holds the last good adapter (or the final one, for a check after training) and
    the logs. Nothing was folded."""

    def __init__(self, message: str, step: int, result: HealResult) -> None:
        super().__init__(message)
        self.step = step
        self.result = result


# ---------------------------------------------------------------- the loop


def _norm(grads: Sequence[Tensor | None]) -> float:
    """The L2 norm over all gradients, in float32: one multi-tensor kernel per device (a GPU heal is
    host-bound, and a LoRA on the 7 linears of 30 layers has 420 gradients)."""
    parts = [g.detach().float() for g in grads if g is not None]
    if not parts:
        return 0.0
    norms = torch._foreach_norm(parts)  # tensors on several devices take its per-tensor path
    return float(torch.stack([n.to(parts[0].device) for n in norms]).norm())  # grads may span devices


def _add_into(acc: list[Tensor | None], grads: Sequence[Tensor | None]) -> None:
    for i, g in enumerate(grads):
        if g is not None:
            acc[i] = g if acc[i] is None else acc[i] + g


class _NonFinite(Exception):
    def __init__(self, step: int, what: str) -> None:
        super().__init__(step, what)  # picklable: a launch re-raises it on every rank
        self.step, self.what = step, what


def heal(
    target: History | nn.Module,
    tok,
    completions: Sequence[Completion],
    regularizers: Sequence[Regularizer] = (KLRev(),),
    reference: str = "prev",  # a `Reference`: base | prev | last_good
    lora: LoraSettings = LoraSettings(),
    train: TrainSettings = TrainSettings(),
    round: int | None = None,
    progress: bool | None = None,
    anchor: Sequence[Completion] = (),
) -> HealResult:
    """Train one round's adapter on `completions`; the model is left as it was.

    `target` is a `History`: the adapter trains on top of its folded rounds and the
    reference is taken from it; fold the result with `history.fold(result)`. Or a plain
    model: then `prev` and `last_good` are the base model. `round` (default: rounds folded
    so far) drives the barrier's lambda decay. `anchor`: the base model's own completions of
    neutral prompts, which an `Anchor` regulariser holds the student to (at least 8; every
    step draws a batch of them, in a seeded order that cycles through all).
    """
    completions = list(completions)
    if not completions:
        raise InputError("no completions to heal on: pass at least one Completion (the filter kept none?)")
    regs = list(regularizers)
    for reg in regs:
        if not isinstance(reg, Regularizer):
            raise InputError(f"{reg!r} is not a Regularizer (needs name, needs_reference, weight_decay and __call__)")
    if reference not in choices(Reference):
        raise InputError(f"unknown reference {reference!r}; choose one of {', '.join(choices(Reference))}")
    anchored = [reg for reg in regs if on_anchor(reg)]
    if anchored and len(anchor) < MIN_ANCHOR:
        raise InputError(
            f"the Anchor regulariser needs at least {MIN_ANCHOR} anchor completions (the base's own completions of "
            f"neutral prompts), got {len(anchor)}; pass heal(..., anchor=...)"
        )
    if anchor and not anchored:
        raise InputError("anchor completions were given but no Anchor regulariser reads them; add Anchor(lam=...)")
    history = target if isinstance(target, History) else None
    r = (len(history) if history is not None else 0) if round is None else round
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise InputError(f"round must be an int >= 0, got {round!r}")
    model = history.model if history is not None else target
    if any(p.dtype == torch.float16 for p in model.parameters()):
        raise InputError(
            "heal refuses a float16 model: without loss scaling the LoRA gradients underflow in float16; load the "
            "model in bfloat16 (--dtype bfloat16) or float32"
        )
    max_len = context_length(model, train.max_len)
    examples, truncated = encode_completions(tok, completions, max_len)
    anchor_examples, _ = encode_completions(tok, list(anchor), max_len)
    if anchored and len(anchor_examples) < MIN_ANCHOR:
        raise InputError(f"only {len(anchor_examples)} anchor completions have tokens; Anchor needs {MIN_ANCHOR}")
    if not examples:
        raise InputError("every completion is empty and was cut at the token limit: nothing to train on")
    if len(examples) < len(completions):
        warnings.warn(
            f"{len(completions) - len(examples)} empty completions cut at the token limit were skipped", stacklevel=2
        )
    if truncated:
        warnings.warn(
            f"{truncated} of {len(completions)} completions exceed {max_len} tokens and were truncated", stacklevel=2
        )

    hist = history if history is not None else History(model)
    try:
        student = hist.model
        # no dropout: student and reference are the same deterministic network
        with eval_mode(student), seeded(train.seed, input_device(student)):
            config = lora.config(student)
            # enable_grad: a caller inside torch.no_grad() still gets a trained adapter
            with hist.train_adapter(config) as slot, torch.enable_grad():
                return _train(
                    hist, slot, tok, examples, anchor_examples, regs, reference, train, r, truncated, progress
                )
    finally:
        if history is None:
            hist.close()


def _anchor_batches(examples: Sequence[Example], size: int, seed: int):
    """Endless anchor micro-batches: seeded permutations, one after another, so every anchor
    completion is seen before any is seen twice."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(examples), generator=gen).tolist()
        for a in range(0, len(order), size):
            yield [examples[i] for i in order[a : a + size]]


def _train(
    hist: History,
    slot: TrainSlot,
    tok,
    examples,
    anchor_examples,
    regs,
    reference,
    train: TrainSettings,
    r,
    truncated,
    progress,
) -> HealResult:
    started = time.perf_counter()
    model, pad, device = hist.model, pad_id(tok), input_device(hist.model)
    gen = torch.Generator().manual_seed(train.seed)
    order = torch.randperm(len(examples), generator=gen).tolist()
    n_val = min(int(len(examples) * train.val_frac), len(examples) - 1)
    val = [examples[i] for i in order[:n_val]]
    trainset = [examples[i] for i in order[n_val:]]
    per_epoch = math.ceil(math.ceil(len(trainset) / train.batch_size) / train.grad_accum)
    total = per_epoch * train.epochs if train.max_steps is None else min(per_epoch * train.epochs, train.max_steps)
    weight_decay = sum(float(reg.weight_decay) for reg in regs)
    opt = torch.optim.AdamW(slot.params, lr=train.lr, betas=train.betas, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: train.lr_factor(step, total))
    need_ref = any(reg.needs_reference for reg in regs if not on_anchor(reg))
    anchors = _anchor_batches(anchor_examples, train.batch_size, train.seed + 1) if anchor_examples else None
    frozen = _frozen_views(hist, pad, device, reference if need_ref else None, trainset, anchor_examples, train)
    steps: list[StepLog] = []
    epochs: list[EpochLog] = []
    val_start = _val_nll(model, val, pad, train.batch_size)

    def result() -> HealResult:
        meta = {
            "model_id": model_id(model),
            "hidden_size": str(hidden_size(model)),
            "n_layers": str(n_layers(model)),
            "round": str(r),
            "reference": reference,
            "regularizers": ",".join(reg.name for reg in regs),
            "method": "steer_heal.heal",
            "version": __version__,
        }
        adapter = hist.adapter(slot.name)
        adapter = Adapter(adapter.config, adapter.state, meta)
        return HealResult(
            adapter,
            steps,
            epochs,
            val_start,
            len(trainset),
            n_val,
            truncated,
            r,
            reference,
            weight_decay,
            time.perf_counter() - started,
        )

    bar = tqdm(
        total=total, desc=f"heal round {r}", disable=not (progress if progress is not None else False), leave=False
    )
    try:
        step = 0
        for epoch in range(1, train.epochs + 1):
            if step >= total:
                break
            perm = torch.randperm(len(trainset), generator=gen).tolist()
            batches = [
                [trainset[i] for i in perm[a : a + train.batch_size]] for a in range(0, len(perm), train.batch_size)
            ]
            run_sum, run_count = 0.0, 0
            for g in range(0, len(batches), train.grad_accum):
                if step >= total:
                    break
                step += 1
                try:
                    log = _step(
                        hist,
                        slot,
                        batches[g : g + train.grad_accum],
                        regs,
                        frozen,
                        anchors,
                        train,
                        r,
                        pad,
                        device,
                        step,
                        epoch,
                        opt,
                        sched,
                    )
                except Exception as exc:
                    if not is_out_of_memory(exc):
                        raise
                    longest = max(len(x.ids) for b in batches[g : g + train.grad_accum] for x in b)
                    raise OutOfMemory(
                        f"out of memory healing a batch of {train.batch_size} sequences of up to {longest} tokens "
                        f"on {device}; lower the batch size (TrainSettings.batch_size; heal.batch_size in a run "
                        "config, with heal.grad_accum raised to keep the batch) or the completions' length "
                        "(generate.max_new_tokens)"
                    ) from None
                steps.append(log)
                run_sum, run_count = run_sum + log.nll * log.tokens, run_count + log.tokens
                bar.update(1)
                bar.set_postfix(nll=f"{log.nll:.3f}")
            epochs.append(EpochLog(epoch, run_sum / run_count, _val_nll(model, val, pad, train.batch_size)))
            blown = _blown_up(epochs[-1], val_start, steps, train, _uniform_nll(model))
            if blown:
                raise HealDiverged(
                    f"heal diverged after epoch {epoch}: {blown}; nothing was folded; lower lr or lam", step, result()
                )
    except _NonFinite as bad:
        raise HealDiverged(
            f"{bad.what} is not finite at step {bad.step}; stopped before applying it. The last good adapter "
            f"(after step {bad.step - 1}) is in err.result.adapter; lower lr or lam",
            bad.step,
            result(),
        ) from None
    finally:
        bar.close()
    final = result()
    bad = [k for k, v in final.adapter.state.items() if not torch.isfinite(v).all()]
    if bad:
        raise HealDiverged(
            f"heal diverged: {len(bad)} adapter tensors are not finite (e.g. {bad[0]}); nothing was folded; "
            "lower lr or lam",
            len(steps),
            final,
        )
    return final


def _uniform_nll(model: nn.Module) -> float:
    """ln(vocab): the NLL of a uniform next-token distribution, what a wrecked model scores."""
    return math.log(unwrap(model).get_output_embeddings().weight.shape[0])


def _blown_up(
    last: EpochLog, val_start: float | None, steps: list[StepLog], train: TrainSettings, uniform: float
) -> str:
    """Why the epoch just ended counts as a blow-up ("" if it does not)."""
    if last.val_nll is not None and val_start is not None:
        now, start, what = last.val_nll, val_start, "validation NLL"
    else:
        now, start, what = last.train_nll, (steps[0].nll if steps else None), "training NLL"
    if not math.isfinite(now):
        return f"{what} is {now}"
    # at the uniform distribution's NLL: wrecked, if the model started better than uniform
    # (a random test model starts there and is judged by the rise alone)
    if start is not None and start < uniform - 0.1 and now >= uniform:
        return f"{what} {now:.3f} >= ln(vocab) = {uniform:.3f} (uniform output; it started at {start:.3f})"
    if train.max_nll_rise is not None and start is not None and now > train.max_nll_rise * start:
        return f"{what} rose from {start:.3f} to {now:.3f}, past max_nll_rise = {train.max_nll_rise:g} x its start"
    return ""


def _val_nll(model: nn.Module, val: Sequence[Example], pad: int, batch_size: int) -> float | None:
    """Mean NLL per completion token of the held-out examples (None without any)."""
    if not val:
        return None
    return mean_nll(model, val, pad, batch_size)


def _frozen_views(hist, pad, device, reference, trainset, anchor_examples, train) -> dict[str, FrozenLogprobs]:
    """The frozen log-probs a heal reads: "reference" on the training completions (when a
    barrier needs it), "anchor" (the base) on the anchor's; one budget for both, the
    reference's first."""
    model = hist.model
    vocab = unwrap(model).get_output_embeddings().weight.shape[0]

    def under(view: str):
        def compute(batch):
            with torch.no_grad(), hist.reference(view):
                return target_logprobs(model, batch)

        return compute

    make = lambda examples: make_batch(examples, pad, device)  # noqa: E731
    budget = float(train.frozen_cache_gib) * 2**30
    views = {}
    for name, view, examples in (("reference", reference, trainset), ("anchor", "base", anchor_examples)):
        if view is not None and examples:
            views[name] = FrozenLogprobs(under(view), make, examples, vocab, budget)
            budget -= views[name].need if views[name].on else 0
    return views


# `joint_anchor=None` reads the trait and the anchor batch in one forward on an accelerator when
# padding them to one width adds at most this fraction of tokens (past it the padding's compute
# could cost more than the forward it saves on a compute-bound card: a bound, not a measured optimum)
JOINT_MAX_PADDING = 0.5


def _joins(trait: Sequence[Example], anchor: Sequence[Example], device, joint: bool | None) -> bool:
    """Whether the student reads a trait and an anchor micro-batch in one forward (`joint_anchor`).

    One forward and one backward graph for both: a host-bound heal (SmolLM2 on any GPU) pays
    per forward, not per row, and a row of a left-padded batch computes what it computes alone,
    up to rounding (`models.logprobs`); a CPU pays per token, padding included (the 30-layer
    proxy's heal of docs/benchmarks.md ran 1.09 x slower with it on). None: joint on an
    accelerator unless padding to one width would add more than `JOINT_MAX_PADDING` of the tokens:
    the default, since on an H100 a SmolLM2-shape heal at the full preset's size took 9.9 s joint
    against 16.8 s apart (docs/benchmarks.md)."""
    if joint is not None:
        return joint
    lengths = [[len(e.ids) for e in part] for part in (trait, anchor)]
    together = (len(trait) + len(anchor)) * max(max(lengths[0]), max(lengths[1]))
    apart = sum(len(part) * max(ls) for part, ls in zip((trait, anchor), lengths))
    return torch.device(device).type != "cpu" and together <= (1 + JOINT_MAX_PADDING) * apart


def _student_logprobs(
    model: nn.Module,
    parts: tuple[Sequence[Example], Sequence[Example]],
    batches: tuple[Batch, Batch],
    pad: int,
    device,
    joint: bool,
) -> tuple[Tensor, Tensor]:
    """The student's log-probs on a trait and an anchor micro-batch (`parts`, already made into
    `batches`), with grad: a forward each, or one forward for both if `joint` (see `_joins`)."""
    if not joint:
        return tuple(target_logprobs(model, batch) for batch in batches)
    counts = [int(batch.targets.numel()) for batch in batches]
    return tuple(target_logprobs(model, make_batch([*parts[0], *parts[1]], pad, device)).split(counts))  # row-major


def _step(hist, slot, group, regs, frozen, anchors, train, r, pad, device, step, epoch, opt, sched) -> StepLog:
    model, params = hist.model, slot.params
    split = train.split_grads
    # drawn for every micro-batch in order, whichever process computes it (`steer_heal.shards`)
    anchor_batches = [next(anchors) for _ in group] if anchors is not None else None
    for k, examples in enumerate(group):  # every rank records the home batches (`steer_heal.healing.frozen`)
        if "reference" in frozen:
            frozen["reference"].see(examples)
        if anchor_batches is not None:
            frozen["anchor"].see(anchor_batches[k])
    sft: list[Tensor | None] = [None] * len(params)
    reg_grads: list[Tensor | None] = [None] * len(params)
    spread = width() > 1  # micro-batches spread over processes (`steer_heal.shards`)
    grads: dict[int, tuple[Sequence[Tensor | None], Sequence[Tensor | None]]] = {}  # this process's, when spread

    def micro_batch(k: int) -> tuple[float, int, float | None, dict[str, float], list[bool], list[bool]]:
        """Micro-batch k's gradients (kept in `grads`) and its logs, with which gradients exist."""
        batch = make_batch(group[k], pad, device)
        ref = frozen["reference"].logprobs(group[k], batch) if "reference" in frozen else None
        anchor_ctx = None
        if anchor_batches is None:
            logp = target_logprobs(model, batch)
        else:  # the anchor batch, under the base (its reference, always) and the student
            on = make_batch(anchor_batches[k], pad, device)
            base = frozen["anchor"].logprobs(anchor_batches[k], on)
            joint = _joins(group[k], anchor_batches[k], device, train.joint_anchor)
            parts = (group[k], anchor_batches[k])
            logp, student = _student_logprobs(model, parts, (batch, on), pad, device, joint)
            anchor_ctx = RegContext(student, base, on.targets, on.rows, on.mask, r, slot.name, slot.modules, params)
        nll = -logp.gather(1, batch.targets[:, None]).mean()
        ctx = RegContext(logp, ref, batch.targets, batch.rows, batch.mask, r, slot.name, slot.modules, params)
        penalties: list[Penalty] = [reg(anchor_ctx if on_anchor(reg) else ctx) for reg in regs]
        reg_loss = sum((p.loss for p in penalties), logp.new_zeros(()))
        # only active terms are differentiated; an idle barrier's gradient is exactly zero
        reg_grad_loss = sum((p.loss for p in penalties if p.active), logp.new_zeros(()))
        if not torch.isfinite(nll + reg_loss):
            raise _NonFinite(step, f"loss (nll {float(nll.detach()):.4g}, regularisers {float(reg_loss.detach()):.4g})")
        logs = {f"{reg.name}.{key}": value for reg, pen in zip(regs, penalties) for key, value in pen.logs.items()}
        # the headline divergence is the first divergence regulariser's
        # (the anchor's divergence is on other text: it is logged as anchor.divergence only)
        first = next(
            (p.logs["divergence"] for g, p in zip(regs, penalties) if "divergence" in p.logs and not on_anchor(g)), None
        )
        scale = 1.0 / len(group)
        nones: list[Tensor | None] = [None] * len(params)
        if reg_grad_loss.requires_grad and split:
            sft_k = torch.autograd.grad(nll * scale, params, retain_graph=True, allow_unused=True)
            reg_k = torch.autograd.grad(reg_grad_loss * scale, params, allow_unused=True)
        else:
            sft_k, reg_k = torch.autograd.grad((nll + reg_grad_loss) * scale, params, allow_unused=True), nones
        if spread:
            grads[k] = (sft_k, reg_k)
        else:  # added at once, so one micro-batch's gradients are held at a time
            _add_into(sft, sft_k)
            _add_into(reg_grads, reg_k)
        has = lambda gs: [g is not None for g in gs]  # noqa: E731
        return float(nll.detach()), int(batch.targets.numel()), first, logs, has(sft_k), has(reg_k)

    nll_sum, tokens, divergence = 0.0, 0, None
    extra: dict[str, float] = {}
    # logs (and, when spread, gradients) added up in micro-batch order, as one process adds them:
    # each micro-batch's gradients are sent on by the process that computed them
    for k, (nll, n, first, logs, has_sft, has_reg) in enumerate(map_batches(micro_batch, len(group))):
        for key, value in logs.items():
            extra[key] = extra.get(key, 0.0) + value / len(group)
        if first is not None:
            divergence = (divergence or 0.0) + first / len(group)
        nll_sum, tokens = nll_sum + nll * n, tokens + n
        if spread:
            mine = grads.pop(k, None)
            for acc, has, which in ((sft, has_sft, 0), (reg_grads, has_reg, 1)):
                if mine is not None:
                    got = [g for g in mine[which] if g is not None]
                else:  # another process computed it: receive into buffers of the same shapes
                    got = [torch.empty_like(p) for p, h in zip(params, has) if h]
                if got:
                    send(k, got)
                received = iter(got)
                _add_into(acc, [next(received) if h else None for h in has])
    total = [s if b is None else (b if s is None else s + b) for s, b in zip(sft, reg_grads)]
    for p, g in zip(params, total):
        p.grad = g if g is not None else torch.zeros_like(p)
    # norms before clipping (clipping scales these same tensors in place)
    grad_norm = _norm(total)
    sft_norm, reg_norm = (_norm(sft), _norm(reg_grads)) if split else (None, None)
    if not math.isfinite(grad_norm):
        raise _NonFinite(step, "gradient norm")
    if train.clip is not None:
        torch.nn.utils.clip_grad_norm_(params, train.clip)
    lr = sched.get_last_lr()[0]
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return StepLog(step, epoch, nll_sum / tokens, lr, grad_norm, sft_norm, reg_norm, divergence, tokens, extra)
