"""Run configuration: typed sections, presets, TOML in and out, validation.

A config is resolved in layers: defaults <- preset <- TOML file <- command-line overrides.
Unknown keys are errors that list the valid ones; incompatible combinations are checked
once, here, before any work starts.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..sampling import Sampling
from ..vocab import (
    DEVICE_NAMES,
    DEVICE_PATTERN,
    Aggregation,
    AnchorName,
    CalibrateOn,
    DTypeName,
    ItemSet,
    Reference,
    RegName,
    choices,
)

_PATH = re.compile(r"^(|[A-Za-z_]\w*(\.\w+)*)$")  # '' or a dotted attribute path


@dataclass(frozen=True)
class RunSection:
    model: str = "smollm2-135m"
    axis: str = "authority"
    rounds: int = 3
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps (steer_heal.models.devices)
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device_map: str = ""  # "" (one device) or "auto" (accelerate shards a model larger than one card)
    blocks: str = ""  # override: the decoder-block ModuleList path ("" = table, then structural discovery)
    writer: str = ""  # override: the MLP output linear inside a block ("" = table / discovery)
    # decode the dose walk and collection compiled (static cache + one SteeringSlot): false | true | auto.
    # auto decodes eager: measured over two loop rounds on an H100 with the compile cache warm, compiled
    # decoding lost at SmolLM2's shape (1.62 x eager over five rounds) and at the 4B shape (1.06 x): the
    # compiled walk cannot be speculative and recompiles after every fold (docs/benchmarks.md)
    compiled: str = "false"


@dataclass(frozen=True)
class ExtractSection:
    layers: list = field(default_factory=lambda: [0.45, 0.55])
    n_contexts: int = 256
    batch_size: int = 16


@dataclass(frozen=True)
class DoseSection:
    target: float = 0.75  # kept fraction a probe must reach
    c_min: float = 0.25
    c_max: float = 8.0
    steps: int = 4
    probe_size: int = 8
    multiples: list = field(default_factory=lambda: [1.0])  # collect at these multiples of the dose
    coherence_floor: float = 0.9  # a probe's calibrated coherence must be >= this x the unsteered one
    confirm: int = 0  # a failed c_min probe (it ends a loop): this many more there, judged pooled with it
    # decode all 2**steps + 1 probes the bisection may ask for in one batch (per-row coefficients), then
    # walk the tree: auto | true | false. auto = on CUDA with eager decoding, where a batch of 136 rows costs
    # about what 8 do (docs/benchmarks.md); on a CPU it would be 2.8x the compute of a sequential walk
    speculative: str = "auto"  # auto | true | false: every candidate probe in one batch (auto: CUDA, eager)


def _loop_sampling() -> Sampling:
    """[generate]: how the dose walk and collect decode (sampled, so probes see variety)."""
    return Sampling(max_new_tokens=96, do_sample=True, batch_size=16)


@dataclass(frozen=True)
class CollectSection:
    n_keep: int = 48
    max_batches: int = 6
    min_keep: int = 8


@dataclass(frozen=True)
class FilterSection:
    calibrate: bool = True  # thresholds from the unsteered model's own completions (filters.calibrate)
    # whose unsteered completions set those thresholds (always scored under the base model): base, or
    # the round's student, so that a student whose own text has drifted from the base's can still be dosed
    calibrate_on: str = "base"  # a `vocab.CalibrateOn`
    calibration_n: int = 16  # unsteered completions to calibrate on (>= 8)
    ppl_k: float = 3.0  # calibrated tail-ppl threshold = this x the unsteered median
    surprise_percentile: float = 5.0  # token log-probs below this percentile of the unsteered ones are surprising
    ppl_tau: float = 50.0  # absolute tail-ppl threshold, used when calibrate = false
    tail: float = 0.25


@dataclass(frozen=True)
class HealSection:
    reg: str = "klrev"  # a `vocab.RegName`
    lam: float = 1.0
    tau: float = 0.5
    agg: str = "rmse"  # a `vocab.Aggregation`
    lam_round_pow: float = -0.5
    reference: str = "prev"  # a `vocab.Reference`
    last_good_threshold: float | None = None  # coherence a round must clear to become last_good
    weight_decay: float = 0.0
    rank: int = 32
    alpha: int = 64
    lora_layers: list = field(default_factory=lambda: [0.2, 0.8])
    epochs: int = 6
    batch_size: int = 4
    # micro-batches of batch_size per optimiser step; under a launch (run.parallel) they are
    # spread over the ranks, so an N-way heal needs grad_accum a multiple of N
    grad_accum: int = 1
    lr: float = 1e-4
    # also differentiate the NLL and the regularisers apart, to log each gradient's norm: one more backward
    # a step while a barrier is active (on a 30-layer model's heal, KLRev + anchor: 1.05-1.2 x a step)
    split_grads: bool = False
    frozen_cache_gib: float = 2.0  # keep the reference's and the anchor base's log-probs per example (0: recompute)
    # auto: joint on a GPU unless padding the two to one width adds over half the tokens (a CPU pays per
    # token); measured on an H100, a SmolLM2-shape heal took 0.59 x the time joint (docs/benchmarks.md)
    joint_anchor: str = "auto"  # auto | true | false: a step's trait and anchor batches in one student forward
    # hold the register: a divergence to the base on the base's own completions of neutral prompts
    # (data/anchor_prompts.txt), every step beside the trait batch (`healing.Anchor`); none | klrev | klfwd
    anchor: str = "none"
    anchor_lam: float = 1.0
    anchor_n: int = 64  # anchor prompts the base completes once per run (at least 8)


@dataclass(frozen=True)
class DriftSection:
    """The student's drift from the base on held-out neutral prompts, every round (evaluate.drift)."""

    enabled: bool = True  # NeutralKL and RegisterShift after every heal (needs the bundled MiniLM)
    n_prompts: int = 64  # held-out neutral prompts (data/neutral_prompts.txt); 0: all
    max_new_tokens: int = 48  # tokens per neutral (and anchor) completion
    controls: bool = True  # the register shift's positive and negative controls, once per run
    max_auc: float = 0.0  # stop when the register-shift AUC exceeds this (0: never)
    max_kl: float = 0.0  # stop when NeutralKL(student || base) exceeds this many nats per token (0: never)


@dataclass(frozen=True)
class EvalSection:
    items: str = "bundled"  # a `vocab.ItemSet`
    n_items: int = 0  # 0: all; else a stratified subset of this size
    think_tokens: int = 0  # measured on SmolLM2: thinking cost coherence (benchmarks/science/vignette_sweep.py)
    mfv_dir: str = ""  # where the public MFV JSONL files are (for items = mfv | both)
    coherence_floor: float = 0.95  # stop when a healed round's coherence < this x the base model's
    sample_tokens: int = 64
    batch_size: int = 16  # sequences per forward in the probes (vignette rows, log-odds sequences)
    logodds_scenarios: int = 0  # held-out scenarios for the answer log-odds probe (0: all of the axis's)


@dataclass(frozen=True)
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    extract: ExtractSection = field(default_factory=ExtractSection)
    dose: DoseSection = field(default_factory=DoseSection)
    generate: Sampling = field(default_factory=_loop_sampling)
    collect: CollectSection = field(default_factory=CollectSection)
    filter: FilterSection = field(default_factory=FilterSection)
    heal: HealSection = field(default_factory=HealSection)
    eval: EvalSection = field(default_factory=EvalSection)
    drift: DriftSection = field(default_factory=DriftSection)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return asdict(self)

    def validate(self) -> RunConfig:
        """Every key's range and every cross-key rule, as one-line `ConfigError`s."""
        r, x, d, c, f, h, e = self.run, self.extract, self.dose, self.collect, self.filter, self.heal, self.eval
        n = self.drift
        checks = [
            (bool(r.model.strip()), "run.model is empty; name an HF model id, a local path or 'smollm2-135m'"),
            (bool(r.axis.strip()), "run.axis is empty; name a bundled axis (authority, love) or an axis .toml file"),
            (r.rounds >= 1, f"run.rounds must be >= 1, got {r.rounds}"),
            (r.seed >= 0, f"run.seed must be >= 0, got {r.seed}"),
            (
                r.seed <= MAX_SEED,
                f"run.seed must be <= {MAX_SEED}: every round derives its seeds as seed * 1000 + round * 100 + "
                f"0..999, which must stay a 64-bit integer; got {r.seed}",
            ),
            (r.rounds <= MAX_ROUNDS, f"run.rounds must be <= {MAX_ROUNDS}, got {r.rounds}"),
            (r.dtype in DTYPE_NAMES, f"run.dtype must be one of {', '.join(DTYPE_NAMES)}, got {r.dtype!r}"),
            (
                DEVICE_PATTERN.match(r.device) is not None,
                f"run.device must be one of {', '.join(DEVICE_NAMES)}, got {r.device!r}",
            ),
            (r.compiled in ("auto", "true", "false"), f"run.compiled must be auto, true or false, got {r.compiled!r}"),
            (r.device_map in ("", "auto"), f'run.device_map must be "" or "auto", got {r.device_map!r}'),
            (
                _PATH.match(r.blocks) is not None,
                f"run.blocks must be a dotted module path like model.layers, got {r.blocks!r}",
            ),
            (
                _PATH.match(r.writer) is not None,
                f"run.writer must be a dotted module path like mlp.down_proj, got {r.writer!r}",
            ),
            (_layer_spec_error(x.layers) is None, f"extract.layers: {_layer_spec_error(x.layers)}"),
            (x.n_contexts >= 1, f"extract.n_contexts must be >= 1, got {x.n_contexts}"),
            (x.batch_size >= 1, f"extract.batch_size must be >= 1, got {x.batch_size}"),
            (0 < d.target <= 1, f"dose.target must be in (0, 1], got {d.target}"),
            (0 < d.c_min < d.c_max, f"dose needs 0 < c_min < c_max, got {d.c_min} and {d.c_max}"),
            (d.steps >= 0, f"dose.steps must be >= 0, got {d.steps}"),
            (d.probe_size >= 1, f"dose.probe_size must be >= 1, got {d.probe_size}"),
            (d.confirm >= 0, f"dose.confirm is a number of extra probes at c_min (>= 0), got {d.confirm}"),
            (
                len(d.multiples) > 0 and all(_is_number(m) and m > 0 for m in d.multiples),
                f"dose.multiples must be a non-empty list of numbers > 0, got {d.multiples!r}",
            ),
            (
                d.speculative in ("auto", "true", "false"),
                f"dose.speculative must be auto, true or false, got {d.speculative!r}",
            ),
            (
                d.speculative != "true" or r.compiled != "true",
                "dose.speculative = true decodes eager (per-row coefficients); set run.compiled = false, "
                "or dose.speculative = auto",
            ),
            (c.n_keep >= 1, f"collect.n_keep must be >= 1, got {c.n_keep}"),
            (c.max_batches >= 1, f"collect.max_batches must be >= 1, got {c.max_batches}"),
            (c.min_keep >= 1, f"collect.min_keep must be >= 1, got {c.min_keep}"),
            (c.min_keep <= c.n_keep, "collect.min_keep must be <= collect.n_keep"),
            (f.ppl_tau > 0, f"filter.ppl_tau must be > 0, got {f.ppl_tau}"),
            (0 < f.tail <= 1, f"filter.tail must be in (0, 1], got {f.tail}"),
            (f.calibration_n >= 8, f"filter.calibration_n must be >= 8, got {f.calibration_n}"),
            (f.ppl_k > 0, f"filter.ppl_k must be > 0, got {f.ppl_k}"),
            (
                f.calibrate_on in choices(CalibrateOn),
                f"filter.calibrate_on must be {'|'.join(choices(CalibrateOn))}, got {f.calibrate_on!r}",
            ),
            (
                0 < f.surprise_percentile < 50,
                f"filter.surprise_percentile must be in (0, 50), got {f.surprise_percentile}",
            ),
            (
                0 <= d.coherence_floor <= 1,
                f"dose.coherence_floor is a fraction of the unsteered coherence in [0, 1], got {d.coherence_floor}",
            ),
            (h.reg in choices(RegName), f"heal.reg must be {'|'.join(choices(RegName))}, got {h.reg!r}"),
            (h.agg in choices(Aggregation), f"heal.agg must be {'|'.join(choices(Aggregation))}, got {h.agg!r}"),
            (
                h.reference in choices(Reference),
                f"heal.reference must be {'|'.join(choices(Reference))}, got {h.reference!r}",
            ),
            (
                h.reference != "last_good" or h.last_good_threshold is not None,
                "heal.reference = 'last_good' needs heal.last_good_threshold (the coherence a round must clear)",
            ),
            (
                h.last_good_threshold is None or 0 <= h.last_good_threshold <= 1,
                f"heal.last_good_threshold is a coherence in [0, 1], got {h.last_good_threshold}",
            ),
            (h.lam >= 0 and h.tau >= 0, f"heal.lam and heal.tau must be >= 0, got {h.lam} and {h.tau}"),
            (h.frozen_cache_gib >= 0, f"heal.frozen_cache_gib must be >= 0 (0: off), got {h.frozen_cache_gib}"),
            (
                h.joint_anchor in ("auto", "true", "false"),
                f"heal.joint_anchor must be auto, true or false, got {h.joint_anchor!r}",
            ),
            (h.weight_decay >= 0, f"heal.weight_decay must be >= 0, got {h.weight_decay}"),
            (h.rank >= 1, f"heal.rank must be >= 1, got {h.rank}"),
            (h.alpha > 0, f"heal.alpha must be > 0, got {h.alpha}"),
            (_layer_spec_error(h.lora_layers) is None, f"heal.lora_layers: {_layer_spec_error(h.lora_layers)}"),
            (h.epochs >= 1, f"heal.epochs must be >= 1, got {h.epochs}"),
            (h.batch_size >= 1, f"heal.batch_size must be >= 1, got {h.batch_size}"),
            (h.grad_accum >= 1, f"heal.grad_accum must be >= 1, got {h.grad_accum}"),
            (h.lr > 0, f"heal.lr must be > 0, got {h.lr}"),
            (
                h.anchor in choices(AnchorName),
                f"heal.anchor must be {'|'.join(choices(AnchorName))}, got {h.anchor!r}",
            ),
            (
                h.anchor == "none" or (_is_number(h.anchor_lam) and h.anchor_lam > 0),
                f"heal.anchor_lam must be a number > 0 with heal.anchor = {h.anchor!r}, got {h.anchor_lam}; "
                "set heal.anchor = 'none' to turn the anchor off",
            ),
            (
                h.anchor == "none" or h.anchor_n >= 8,
                f"heal.anchor_n must be >= 8 anchor completions, got {h.anchor_n}",
            ),
            (n.n_prompts == 0 or n.n_prompts >= 10, f"drift.n_prompts must be 0 (all) or >= 10, got {n.n_prompts}"),
            (n.max_new_tokens >= 1, f"drift.max_new_tokens must be >= 1, got {n.max_new_tokens}"),
            (0 <= n.max_auc <= 1, f"drift.max_auc is an AUC in [0, 1] (0: no stop), got {n.max_auc}"),
            (n.max_kl >= 0, f"drift.max_kl must be >= 0 nats (0: no stop), got {n.max_kl}"),
            (
                n.enabled or (n.max_auc == 0 and n.max_kl == 0),
                "drift.max_auc and drift.max_kl stop on the drift instruments; set drift.enabled = true",
            ),
            (e.items in choices(ItemSet), f"eval.items must be {'|'.join(choices(ItemSet))}, got {e.items!r}"),
            (e.batch_size >= 1, f"eval.batch_size must be >= 1, got {e.batch_size}"),
            (e.n_items >= 0, f"eval.n_items must be >= 0 (0: all items), got {e.n_items}"),
            (e.think_tokens >= 0, f"eval.think_tokens must be >= 0, got {e.think_tokens}"),
            (
                0 <= e.coherence_floor <= 1,
                f"eval.coherence_floor is a fraction of the base coherence in [0, 1], got {e.coherence_floor}",
            ),
            (e.sample_tokens >= 1, f"eval.sample_tokens must be >= 1, got {e.sample_tokens}"),
            (
                e.logodds_scenarios == 0 or e.logodds_scenarios >= 2,
                f"eval.logodds_scenarios must be 0 (all) or >= 2, got {e.logodds_scenarios}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self


DTYPE_NAMES = choices(DTypeName)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _layer_spec_error(spec: Any) -> str | None:
    """Why a layer spec from a config cannot be resolved (None if it can, for any depth)."""
    if not isinstance(spec, list) or not spec:
        return f"must be a non-empty list: [lo, hi] depth fractions or block indices, got {spec!r}"
    if len(spec) == 2 and all(isinstance(v, float) for v in spec):
        lo, hi = spec
        return None if 0 <= lo <= hi <= 1 else f"depth fractions must satisfy 0 <= lo <= hi <= 1, got {spec!r}"
    if all(isinstance(v, int) and not isinstance(v, bool) for v in spec):
        return None
    return f"must be [lo, hi] depth fractions (two floats) or block indices (ints), got {spec!r}"


PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # a random 4-layer model built in-process: the whole loop in seconds (CI, dry runs)
    "tiny": {
        "run": {"model": "tiny-llama", "rounds": 1},
        "extract": {"n_contexts": 16, "layers": [0.25, 0.75]},
        "dose": {"c_min": 0.5, "c_max": 4.0, "steps": 2, "probe_size": 4, "target": 0.0001},
        "generate": {"max_new_tokens": 12, "batch_size": 8},
        "collect": {"n_keep": 8, "max_batches": 2, "min_keep": 1},
        # the absolute filter switched off: random text is all "word salad"; the calibrated
        # path is exercised by tests/test_loop.py::test_tiny_run_with_the_calibrated_filter
        "filter": {"calibrate": False, "ppl_tau": 1e9},
        "heal": {"rank": 4, "alpha": 8, "epochs": 1, "batch_size": 4},
        "eval": {"n_items": 14, "think_tokens": 2, "sample_tokens": 8, "coherence_floor": 0.0},
        "drift": {"n_prompts": 10, "max_new_tokens": 8},
    },
    # the embedded SmolLM2-135M, one round sized for ~6 minutes on 2 CPU cores
    # both SmolLM2 presets use the love axis: its vector's stance part carries (its probe's positive
    # control holds, z 25; authority's holds since its answers were rewritten, z 13.6). One round heals with NLL: on the same kept completions a KL
    # barrier only pulled the trait back toward the base without buying coherence (Q1, docs/results.md:
    # NLL retained 0.86-1.02 of the stance at 1.01 x base coherence). The full preset's loop uses KLRev
    "quick": {
        "run": {"model": "smollm2-135m", "rounds": 1, "axis": "love"},
        "extract": {"n_contexts": 64},
        # c_max 2: past it SmolLM2's vignette coherence drops below 0.95 x base (docs/results.md, gate 1)
        "dose": {"c_max": 2.0, "steps": 2, "probe_size": 8},
        "generate": {"max_new_tokens": 48},
        "collect": {"n_keep": 16, "max_batches": 2},
        # lr 5e-4: at the default 1e-4 the quick heal's 8 steps moved the validation NLL by 0.05 nats
        "heal": {"reg": "nll", "epochs": 2, "rank": 8, "alpha": 16, "lr": 5e-4},
        # 16 of the 32 held-out scenarios: the log-odds probe is the demo's slowest stage on 2 CPU cores
        "eval": {"n_items": 21, "think_tokens": 0, "sample_tokens": 32, "logodds_scenarios": 16},
        # half the neutral prompts, shorter: the drift instruments and their controls in about a minute
        "drift": {"n_prompts": 32, "max_new_tokens": 32},
    },
    "full": {
        # 5 rounds, with the arm that lasted (issue 25, docs/results.md): the anchor (reverse KL to the base
        # on its own completions of neutral prompts, lam 1) held the register on both axes (AUC <= 0.59
        # against 0.82-0.97 without), and with the dose floor at 0.1 it made 5 rounds with the stance
        # growing on 2 of 3 authority seeds and 1 of 3 love seeds; no other arm made 5 on any seed.
        # Probes of 16 completions: the preset's 8 ended a KLRev loop on one completion in eight.
        # confirm 3: a failed c_min probe is judged again pooled with 3 more (64 completions); with it the
        # same arm made 5 rounds on 2 of 3 love seeds (its one stop at two dropped completions was overturned,
        # its stop at ten stood; rule written before the runs in benchmarks/science/science.py)
        "run": {"model": "smollm2-135m", "rounds": 5, "axis": "love"},
        "dose": {"c_min": 0.1, "probe_size": 16, "confirm": 3},
        # 64 rows a forward everywhere: on a GPU a round is host-bound (Python per forward, not FLOPs), so
        # fewer, larger forwards are faster. Collect's 48 survivors usually come from one batch; on one
        # H200 that took collect from 13.4-14.2 s to 2.7 s (docs/benchmarks.md)
        "extract": {"batch_size": 64},
        "generate": {"batch_size": 64},
        # batch 8 at lr 2e-4: the heal every Q1 and loop result was measured with, in half the steps of
        # batch 4. KLRev (the default), not NLL: over rounds the barrier kept the student's own text near
        # enough the base's for the dose walk to go on (love, 3 seeds: 3, 3, 4 rounds against NLL's 1, 2,
        # 4), and where the loop was let go on, NLL's coherence fell to 0.77-0.80 x base in round 4 while
        # KLRev's held at 0.97-1.08 x (docs/results.md, the loop). In one round NLL keeps more stance (Q1)
        "heal": {"batch_size": 8, "lr": 2e-4, "anchor": "klrev", "anchor_lam": 1.0},
        "eval": {"batch_size": 64},
    },
}


def _merge(config: RunConfig, updates: dict[str, Any], where: str) -> RunConfig:
    sections = {f.name: f for f in fields(RunConfig)}
    out = config
    for name, values in updates.items():
        if name not in sections:
            raise ConfigError(f"{where}: unknown section [{name}]; valid sections: {', '.join(sections)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: [{name}] must be a table of keys")
        section = getattr(out, name)
        valid = {f.name: f for f in fields(section)}
        for key in values:
            if key not in valid:
                raise ConfigError(f"{where}: unknown key {name}.{key}; valid keys: {', '.join(valid)}")
        try:
            updated = replace(section, **_coerce(section, values, where, name))
        except ConfigError:
            raise
        except ValueError as exc:  # a section that validates itself (e.g. Sampling)
            raise ConfigError(f"{where}: [{name}] {exc}") from None
        out = replace(out, **{name: updated})
    return out


_KINDS = {"int": int, "float": float, "str": str, "bool": bool, "list": list}


def _coerce(section: Any, values: dict[str, Any], where: str, name: str) -> dict[str, Any]:
    """Check each value against its field's declared type; ints are accepted where floats
    are expected (TOML writes 1 for 1.0), and a bool is never a number."""
    declared = {f.name: str(f.type) for f in fields(section)}
    out = {}
    for key, value in values.items():
        kinds = [k.strip() for k in declared[key].split("|")]
        nullable = "None" in kinds
        kinds = [k for k in kinds if k != "None"]
        if value is None and not nullable:
            raise ConfigError(f"{where}: {name}.{key} must be set ({' or '.join(kinds)})")
        if value is not None:
            if "float" in kinds and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            ok = any(
                isinstance(value, _KINDS[k]) and (k == "bool" or not isinstance(value, bool))
                for k in kinds
                if k in _KINDS
            )
            if not ok:
                raise ConfigError(f"{where}: {name}.{key} must be {' or '.join(kinds)}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}: {name}.{key} must be finite, got {value}")
        if isinstance(value, float) and abs(value) > FLOAT32_MAX:  # every number is used in float32 or lower
            raise ConfigError(f"{where}: {name}.{key} = {value:g} is not finite in float32 (largest {FLOAT32_MAX:.3g})")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:
            raise ConfigError(f"{where}: {name}.{key} = {value} does not fit a 64-bit integer")
        out[key] = value
    return out


FLOAT32_MAX = 3.4028234663852886e38
MAX_ROUNDS = 10_000
MAX_SEED = (2**63 - 1 - MAX_ROUNDS * 100 - 999) // 1000  # derived seeds stay below 2**63


def resolve(
    preset: str | None = None, file: str | Path | None = None, overrides: dict[str, dict[str, Any]] | None = None
) -> RunConfig:
    config = RunConfig()
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        config = _merge(config, PRESETS[preset], f"preset {preset}")
    if file is not None:
        config = _merge(config, read_toml(file), str(file))
    if overrides:
        config = _merge(config, overrides, "command line")
    return config.validate()


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file as a dict; a syntax error or unreadable file is one line naming the file."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None


def load(path: str | Path) -> RunConfig:
    return _merge(RunConfig(), read_toml(path), str(path)).validate()


def from_toml_text(text: str, where: str) -> RunConfig:
    """A config from TOML text (`where` names it in errors)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where} is not valid TOML: {exc}") from None
    return _merge(RunConfig(), raw, where).validate()


# keys a resumed run may change: they decide how far the loop goes, not what a finished round computed
RESUMABLE = ("run.rounds", "eval.coherence_floor", "drift.max_auc", "drift.max_kl")


def override(config: RunConfig, overrides: dict[str, dict[str, Any]], where: str = "options") -> RunConfig:
    """`config` with some keys replaced, validated (unknown keys are errors)."""
    return _merge(config, overrides, where).validate()


def diff(a: RunConfig, b: RunConfig) -> list[str]:
    """`section.key: a -> b` for every differing value."""
    out = []
    for name, values in a.to_dict().items():
        other = b.to_dict()[name]
        out += [f"{name}.{key}: {value!r} -> {other[key]!r}" for key, value in values.items() if other[key] != value]
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ConfigError(f"cannot write {value!r} to TOML")


def to_toml(config: RunConfig) -> str:
    """TOML text of the config; None values are omitted (TOML has no null)."""
    lines = []
    for name, values in config.to_dict().items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items() if value is not None]
        lines.append("")
    return "\n".join(lines)
