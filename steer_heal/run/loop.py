"""The distill-and-heal loop, as plain functions over the primitives (docs/method.md, steps 1-6).

    base, prompted  = evaluate(model), evaluate(model, persona as system prompt)
    for r in rounds:
        v_r      = extract(student)                      # re-extracted from the current student
        c_r      = walk_dose(v_r, filter)                 # largest dose keeping >= target fraction
        kept     = collect(v_r, c_r, filter)              # steered completions that pass the filter
        steered  = evaluate(student + c_r * v_r)
        adapter  = heal(student, kept, reference)         # LoRA, NLL + divergence barrier
        history.fold(adapter)                             # the student absorbs the round
        healed   = evaluate(student)
        drift    = NeutralKL, RegisterShift(student vs base on held-out neutral prompts)
        record cos(v_r, v_0), cos(v_student, v_r)
        stop if healed coherence < floor * base coherence, or drift past drift.max_auc / max_kl

With `heal.anchor` the heal also holds the student to the base on the base's own completions
of neutral anchor prompts (`healing.Anchor`); those and the drift set come from `run/neutral.py`.

The filter scores perplexity under the base model (`history.base`), never the steered
student. Every stage is logged to the run directory; each round ends with a checkpoint
from which `run(..., resume=True)` continues with the same numbers.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..data import Axis, load_axis, load_contexts
from ..errors import ConfigError, DoseError, InputError
from ..evaluate import (
    AnswerLogOdds,
    EvalResult,
    Samples,
    Vignettes,
    load_mfv,
    load_vignettes,
    min_coherence,
    stratified_subset,
)
from ..evaluate.judge import minilm_folder
from ..filters import Calibration, calibrate_on_pool, default_filter
from ..filters.dose import collect, walk_dose
from ..healing.history import Adapter, History
from ..healing.lora import LoraSettings
from ..healing.regularizers import NLL, Anchor, KLFwd, KLRev, Regularizer, SpectralNorm, WeightDecay
from ..healing.train import TrainSettings, heal
from ..models.devices import attention_backends
from ..models.loading import load_model
from ..models.model import chat_prompt, input_device, n_layers
from ..shards import Sharder, sharded
from ..steering.extract import last_token_states
from ..steering.generation import compiled_graphs
from ..steering.vector import SteeringVector
from ..vocab import RegName
from .config import RunConfig
from .neutral import Neutral, neutral_stage, prompt_sets
from .runlog import RunDir

log = logging.getLogger("steer_heal")  # one progress line per stage (INFO); the CLI shows it on stderr


@dataclass
class Setup:
    """What a run needs besides the config: the model under its history, data, probes."""

    history: History
    tok: Any
    axis: Axis
    contexts: list[str]
    probes: dict[str, Any]  # name -> Evaluator (AnswerLogOdds, Vignettes)
    neutral: Neutral | None = None  # the run's neutral text and drift instruments (`neutral_stage`)

    @property
    def model(self) -> nn.Module:
        return self.history.model


def regularizers(config: RunConfig) -> list[Regularizer]:
    """The config's main regulariser (one per `vocab.RegName`), plus weight decay if set."""
    h = config.heal
    registry: dict[RegName, Any] = {
        "klrev": lambda: KLRev(lam=h.lam, tau=h.tau, agg=h.agg, lam_round_pow=h.lam_round_pow),
        "klfwd": lambda: KLFwd(lam=h.lam, tau=h.tau, agg=h.agg, lam_round_pow=h.lam_round_pow),
        "spectral": lambda: SpectralNorm(lam=h.lam),
        "nll": NLL,
    }
    main = registry[h.reg]()
    decay = [WeightDecay(wd=h.weight_decay)] if h.weight_decay > 0 else []
    anchor = [Anchor(lam=h.anchor_lam, div=h.anchor)] if h.anchor != "none" else []
    return [main, *decay, *anchor]


def probes(config: RunConfig, seed: int, axis: Axis | None = None) -> dict[str, Any]:
    """The stage probes: the axis's answer log-odds first (when it defines answers), then the
    7-way vignettes (bundled and/or MFV). The vignettes give the coherence the loop stops on."""
    e = config.eval
    out: dict[str, Any] = {}
    if axis is not None and axis.answers:
        probe = AnswerLogOdds.from_axis(axis, batch_size=e.batch_size)
        if e.logodds_scenarios:
            probe = replace(probe, scenarios=probe.scenarios[: e.logodds_scenarios])
        out["logodds"] = probe
    sets: dict[str, list] = {}
    if e.items in ("bundled", "both"):
        sets["vignettes"] = load_vignettes()
    if e.items in ("mfv", "both"):
        if not e.mfv_dir:
            raise InputError("eval.items includes 'mfv' but eval.mfv_dir is empty; point it at the MFV JSONL folder")
        sets["mfv"] = load_mfv(e.mfv_dir)
    for name, items in sets.items():
        out[name] = Vignettes(
            items=stratified_subset(items, e.n_items, seed=seed) if 0 < e.n_items < len(items) else items,
            think_tokens=e.think_tokens,
            batch_size=e.batch_size,
            name=name,
        )
    return out


def setup(config: RunConfig) -> Setup:
    """Data first (cheap to check), then the model (slow to load)."""
    axis = load_axis(config.run.axis)
    contexts = load_contexts()[: config.extract.n_contexts]
    chosen = probes(config, config.run.seed, axis)
    prompt_sets(config, axis)  # neutral and anchor prompts disjoint from the axis's, before the model loads
    if config.drift.enabled:
        try:  # the register shift's embedder
            minilm_folder()
        except (ModuleNotFoundError, FileNotFoundError) as exc:
            raise ConfigError(f"{exc}, or set drift.enabled = false") from None
    log.info("loading %s", config.run.model)
    model, tok = load_model(
        config.run.model,
        dtype=config.run.dtype,
        device=config.run.device,
        device_map=config.run.device_map or None,
        blocks=config.run.blocks or None,
        writer=config.run.writer or None,
    )
    return Setup(History(model), tok, axis, contexts, chosen)


def evaluate(s: Setup, system: str | None = None) -> dict[str, EvalResult]:
    """Every probe on the model as it is now (the caller steers or not around this)."""
    return {name: replace(probe, system=system)(s.model, s.tok) for name, probe in s.probes.items()}


def log_stage(run: RunDir, stage: str, r: int, results: dict[str, EvalResult], **extra: Any) -> None:
    # with the per-row records, so `steer-heal plot` can recompute paired intervals from events alone
    run.log("eval", r, stage=stage, results={k: v.to_dict(rows=True) for k, v in results.items()}, **extra)


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    return fn(*args, **kwargs), time.perf_counter() - t0


def base_coherence(run: RunDir) -> float:
    """The lowest coherence of the base stage over the probes (the floor is relative to it)."""
    for e in run.events():
        if e["event"] == "eval" and e["stage"] == "base":
            value = min_coherence(EvalResult.from_dict(x) for x in e["results"].values())
            if value is None:
                raise InputError(f"{run.path}: the base evaluation has no probe that reports coherence")
            return value
    raise InputError(f"{run.path}/events.jsonl has no base evaluation; resume it from the start")


def neutral_shift(s: Setup, layers: tuple[int, ...], batch_size: int = 8) -> SteeringVector:
    """v_student: mean hidden-state shift of the student vs the base under the neutral persona."""
    texts = [chat_prompt(s.tok, c, system=s.axis.neutral) for c in s.contexts]
    student = last_token_states(s.model, s.tok, texts, layers, batch_size=batch_size)
    with s.history.base():
        base = last_token_states(s.model, s.tok, texts, layers, batch_size=batch_size)
    directions = {layer: (student[layer] - base[layer]).double().mean(0).float() for layer in layers}
    return SteeringVector(
        directions, hidden_size=directions[layers[0]].numel(), n_layers=n_layers(s.model), method="student_shift"
    )


def samples(config: RunConfig, s: Setup) -> list[dict]:
    probe = Samples(
        s.axis.sample_prompts or s.axis.prompts[:3],
        max_new_tokens=config.eval.sample_tokens,
        cuda_graphs=config.generate.cuda_graphs,
    )
    return probe(s.model, s.tok).rows


def base_stage(config: RunConfig, s: Setup, run: RunDir) -> None:
    """Round -1: the base model and the prompted baseline (persona as system prompt; also
    `prompted_2`, ... for the axis's other `pos_wordings`). With a
    log-odds probe, the neg persona too: pos minus neg persona is the stance probe's positive
    control, which the report checks before it trusts a stance number."""
    log.info(
        "base: evaluate the base model, the persona prompt (%d wordings) and the neg persona",
        1 + len(s.axis.pos_wordings),
    )
    results, seconds = timed(evaluate, s)
    log_stage(run, "base", -1, results, seconds=seconds)
    results, seconds = timed(evaluate, s, system=s.axis.pos)
    log_stage(run, "prompted", -1, results, seconds=seconds, system=s.axis.pos)
    for i, wording in enumerate(s.axis.pos_wordings, start=2):  # the verdict must hold for each wording
        results, seconds = timed(evaluate, s, system=wording)
        log_stage(run, f"prompted_{i}", -1, results, seconds=seconds, system=wording)
    if "logodds" in s.probes:
        t0 = time.perf_counter()
        control = {"logodds": replace(s.probes["logodds"], system=s.axis.neg)(s.model, s.tok)}
        log_stage(run, "prompted_neg", -1, control, seconds=time.perf_counter() - t0)
    rows, seconds = timed(samples, config, s)
    run.log("samples", -1, stage="base", rows=rows, seconds=seconds)
    run.checkpoint(-1)


def use_compiled(config: RunConfig, model: nn.Module) -> bool:
    """`run.compiled`: true decodes the walk and collect compiled (static cache, one slot per walk).
    auto decodes eager: the rule measured in docs/benchmarks.md (issue 26) found compiled decoding
    slower over a loop's rounds at both shapes measured, SmolLM2's and 4B, with the compile cache warm."""
    return config.run.compiled == "true"


def use_speculative(config: RunConfig, model: nn.Module, compiled: bool) -> bool:
    """`dose.speculative`: auto walks speculatively on CUDA when decoding eager."""
    if config.dose.speculative == "auto":
        return not compiled and input_device(model).type == "cuda"
    return config.dose.speculative == "true"


def round_filter(config: RunConfig, s: Setup, seed: int) -> tuple[Any, Calibration | None]:
    """The round's filter, scoring under the base model (adapters off, no steering), never
    the steered student. Calibrated (the default): thresholds from the base model's own
    sampled completions of the prompt pool (or, with `filter.calibrate_on = "student"`, the
    unsteered student's, still scored under the base); else the absolute `filter.ppl_tau`."""
    f = config.filter
    if not f.calibrate:
        flt = default_filter(
            s.history.base, s.tok, tau=f.ppl_tau, tail=f.tail, narration_patterns=s.axis.narration_patterns
        )
        return flt, None
    return calibrate_on_pool(
        s.history.base,
        s.tok,
        s.axis.prompts,
        n=f.calibration_n,
        sampling=config.generate,
        seed=seed + 30,
        k=f.ppl_k,
        percentile=f.surprise_percentile,
        tail=f.tail,
        narration_patterns=s.axis.narration_patterns,
        sampler=s.model if f.calibrate_on == "student" else None,  # the student as folded so far
    )


def one_round(config: RunConfig, s: Setup, run: RunDir, r: int, v0: SteeringVector | None) -> dict[str, Any]:
    """Extract, dose, collect, steer-evaluate, heal, fold, evaluate: one round."""
    seed = config.run.seed * 1000 + r * 100  # every stochastic step of round r derives from this
    d, c = config.dose, config.collect
    t0 = time.perf_counter()
    log.info("round %d (of %d): extract the vector from %d contexts", r, config.run.rounds, len(s.contexts))
    vec = SteeringVector.from_persona_pair(
        s.model,
        s.tok,
        s.axis.pos,
        s.axis.neg,
        s.contexts,
        layers=config.extract.layers,
        batch_size=config.extract.batch_size,
    )
    timings = {"extract": time.perf_counter() - t0}

    t0 = time.perf_counter()
    filt, calibration = round_filter(config, s, seed)
    compiled = use_compiled(config, s.model)
    speculative = use_speculative(config, s.model, compiled)
    graphs = compiled_graphs()
    if calibration is not None:
        run.log("calibration", r, **calibration.to_dict())
    log.info(
        "round %d: dose walk in [%g, %g], up to %d probes of %d completions",
        r,
        d.c_min,
        d.c_max,
        d.steps + 2,
        d.probe_size,
    )
    dose = walk_dose(
        s.model,
        s.tok,
        vec,
        s.axis.prompts,
        filt,
        target=d.target,
        c_min=d.c_min,
        c_max=d.c_max,
        steps=d.steps,
        probe_size=d.probe_size,
        seed=seed,
        sampling=config.generate,
        calibration=calibration,
        coherence_floor=d.coherence_floor,
        compiled=compiled,
        speculative=speculative,
        confirm=d.confirm,
    )
    run.log(
        "dose",
        r,
        coeff=dose.coeff,
        steering={"operator": "add", "positions": "all"},  # how the loop steers (steering.operators, .positions)
        probes=dose.to_dict()["probes"],
        compiled=compiled,
        speculative=speculative,
        graphs=compiled_graphs() - graphs,
    )
    timings["dose"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    log.info("round %d: dose %.3g; collect %d completions that pass the filter", r, dose.coeff, c.n_keep)
    kept = collect(
        s.model,
        s.tok,
        vec,
        s.axis.prompts,
        filt,
        dose.coeff,
        multiples=d.multiples,
        n_keep=c.n_keep,
        max_batches=c.max_batches,
        min_keep=c.min_keep,
        seed=seed + 50,
        sampling=config.generate,
        calibration=calibration,
        compiled=compiled,
    )
    run.log(
        "gen",
        r,
        coeff=dose.coeff,
        report=kept.report.to_dict(),
        completions=[
            {**x.to_dict(), "keep": v.keep, "reasons": v.reasons, "scores": v.scores}
            for x, v in zip(kept.completions, kept.verdicts)
        ],
    )
    timings["collect"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    log.info("round %d: kept %d; evaluate the steered model (%s)", r, len(kept.kept), ", ".join(s.probes))
    with vec.apply(s.model, dose.coeff):
        log_stage(run, "steered", r, evaluate(s), coeff=dose.coeff)
        run.log("samples", r, stage="steered", rows=samples(config, s))
    timings["steered_eval"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    h = config.heal
    log.info(
        "round %d: heal (%s, %d epochs, batch %d) on %d completions", r, h.reg, h.epochs, h.batch_size, len(kept.kept)
    )
    result = heal(
        s.history,
        s.tok,
        kept.kept,
        regularizers(config),
        reference=h.reference,
        lora=LoraSettings(r=h.rank, alpha=h.alpha, layers=tuple(h.lora_layers)),
        train=TrainSettings(
            epochs=h.epochs,
            batch_size=h.batch_size,
            grad_accum=h.grad_accum,
            lr=h.lr,
            seed=seed + 70,
            split_grads=h.split_grads,
            frozen_cache_gib=h.frozen_cache_gib,
            joint_anchor={"auto": None, "true": True, "false": False}[h.joint_anchor],
        ),
        round=r,
        anchor=s.neutral.anchor if s.neutral is not None else (),
    )
    run.log(
        "heal",
        r,
        n_train=result.n_train,
        n_val=result.n_val,
        seconds=result.seconds,
        val_nll_start=result.val_nll_start,
        epochs=[vars(e) for e in result.epochs],
        steps=[vars(x) for x in result.steps],
    )
    s.history.fold(result)
    timings["heal"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    log.info("round %d: evaluate the healed student", r)
    healed = evaluate(s)
    log_stage(run, "healed", r, healed)
    run.log("samples", r, stage="healed", rows=samples(config, s))
    coherence = min_coherence(healed.values())
    if h.reference == "last_good":
        s.history.judge(coherence, h.last_good_threshold)
    shift = neutral_shift(s, vec.layers, config.extract.batch_size)
    summary = {
        "coeff": dose.coeff,
        "n_kept": len(kept.kept),
        "coherence": coherence,
        "cos_v0": 1.0 if v0 is None else vec.cosine(v0),
        "cos_student_teacher": shift.cosine(vec),
        "norms": vec.norms(),
    }
    timings["healed_eval"] = time.perf_counter() - t0
    if s.neutral is not None and s.neutral.drift is not None:
        t0 = time.perf_counter()
        log.info("round %d: drift on the held-out neutral prompts (NeutralKL, register shift)", r)
        drift = s.neutral.drift(s.model, s.tok)
        run.log("drift", r, result=drift.to_dict(rows=True))
        summary["drift"] = {k: drift.metrics[k] for k in ("kl_rev", "kl_fwd", "auc", "student_base_ppl")}
        timings["drift"] = time.perf_counter() - t0
    run.save_round(r, vec, s.history)
    run.log("round", r, **summary, timings=timings)
    run.checkpoint(r)
    return {**summary, "vector": vec}


def restore(config: RunConfig, s: Setup, run: RunDir) -> tuple[int, SteeringVector | None]:
    """Fold the saved adapters of finished rounds; return the next round and v_0."""
    last = run.last_checkpoint()
    if last is None or last < 0:
        return (0 if last == -1 else -1), None
    coherence = {e["round"]: e["coherence"] for e in run.events() if e["event"] == "round"}
    for r in range(last + 1):
        s.history.fold(Adapter.load(run.round_dir(r) / "adapter"))
        if config.heal.reference == "last_good":  # replay the judgements in order
            s.history.judge(coherence[r], config.heal.last_good_threshold)
    return last + 1, SteeringVector.load(run.round_dir(0) / "vector.safetensors")


def stop_reason(config: RunConfig, summary: dict[str, Any], floor: float, r: int) -> str | None:
    """Why the loop ends after round r (one line naming the instrument), or None to go on."""
    if summary["coherence"] < floor:
        return (
            f"coherence: {summary['coherence']:.3f} < {config.eval.coherence_floor} x base coherence = {floor:.3f} "
            f"after round {r}"
        )
    drift, n = summary.get("drift"), config.drift
    if drift is not None and n.max_auc and drift["auc"] > n.max_auc:
        return f"drift: register-shift AUC {drift['auc']:.3f} > drift.max_auc = {n.max_auc:g} after round {r}"
    if drift is not None and n.max_kl and drift["kl_rev"] > n.max_kl:
        return f"drift: NeutralKL {drift['kl_rev']:.4f} nats/token > drift.max_kl = {n.max_kl:g} after round {r}"
    return None


def run(
    config: RunConfig,
    run_dir: RunDir,
    s: Setup | None = None,
    progress: bool = True,
    sharder: Sharder | None = None,
) -> dict[str, Any]:
    """The whole loop into `run_dir`, continuing after its last checkpoint. `progress=False`
    keeps its per-stage lines (the `steer_heal` logger at INFO) quiet for this call.
    `sharder`: the processes every stage's batches are spread over (`run.parallel.launch()`
    under torchrun; None: this process alone)."""
    torch.manual_seed(config.run.seed)
    level = log.level
    if not progress:
        log.setLevel(max(logging.WARNING, log.getEffectiveLevel()))
    try:
        s = s or setup(config)
        with attention_backends(input_device(s.model)), sharded(sharder):
            return _run(config, run_dir, s)
    finally:
        log.setLevel(level)


def _run(config: RunConfig, run_dir: RunDir, s: Setup) -> dict[str, Any]:
    start, v0 = restore(config, s, run_dir)
    if start == -1:
        base_stage(config, s, run_dir)
        start = 0
    s.neutral = neutral_stage(config, s, run_dir)
    if s.neutral.controls is not None:
        log.info(s.neutral.controls.verdict())
    stopped = None
    floor = config.eval.coherence_floor * base_coherence(run_dir)
    finished = [e for e in run_dir.events() if e["event"] == "round"]
    if finished:  # a resumed run that had stopped stays stopped
        r = finished[-1]["round"]
        stopped = stop_reason(config, finished[-1], floor, r)
        if stopped:
            run_dir.log("stop", r, reason=stopped)
            return {"run_dir": str(run_dir.path), "stopped": stopped}
    for r in range(start, config.run.rounds):
        try:
            summary = one_round(config, s, run_dir, r, v0)
        except DoseError as exc:
            if r == 0:
                raise  # no round could run: the dose or filter settings are wrong, not a result
            # the student can no longer be steered coherently at any dose: the loop ends here,
            # after its last finished round (a result, logged like a coherence stop)
            stopped = f"filter: round {r}: {exc}"
            run_dir.log("stop", r, reason=stopped)
            break
        v0 = v0 or summary["vector"]
        drift = summary.get("drift")
        drift_line = f", drift AUC {drift['auc']:.2f} KL {drift['kl_rev']:.4f}" if drift else ""
        log.info(
            f"round {r} done: coeff {summary['coeff']:.3g}, kept {summary['n_kept']}, coherence "
            f"{summary['coherence']:.3f}, cos(v_r, v_0) {summary['cos_v0']:.3f}, cos(v_student, v_r) "
            f"{summary['cos_student_teacher']:.3f}{drift_line}"
        )
        stopped = stop_reason(config, summary, floor, r)
        if stopped:
            run_dir.log("stop", r, reason=stopped)
            break
    return {"run_dir": str(run_dir.path), "stopped": stopped}
