"""Does heal keep the trait at restored coherence? The experiments of docs/results.md, on the
embedded SmolLM2-135M, one phase per device call (each well under 10 minutes on one H200).

    python benchmarks/science/science.py gate1 --out OUT --state STATE   # what the vector carries, per dose and variant
    python benchmarks/science/science.py q1 --out OUT --state STATE      # heal vs undo vs imitate (and Q1b)
    python benchmarks/science/science.py loop --out OUT --state STATE    # Q2/Q3: the loop, KLRev vs NLL

Instruments (the same in every phase):
- `AnswerLogOdds` on the axis's 32 held-out scenarios: stance S, wording W and off-axis
  shifts against the base, paired over scenarios, with bootstrap 95% intervals; retain =
  healed shift / steered shift with a paired interval;
- coherence: the 7-way vignette probe's coherence on a fixed stratified subset of 42 items;
  and, for sampled text, the calibrated filter's kept share and the base model's
  perplexity of the samples.

Pre-registered rules (written before the data):
- **operating dose** (gate 1, the default vector): the largest dose on the grid whose
  vignette coherence is >= 0.95 x the base's and whose calibrated kept share is >= 0.5;
- **claimed component**: stance if its shift is >= 5 SE at the operating dose, else wording;
- **Q1b dose**: 2 x the operating dose.

Everything is float32. The state folder (on the device, kept while it stays warm) carries
the operating doses from one phase to the next. Results go to OUT/<phase>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from steer_heal import SteeringVector, load_model
from steer_heal.data import load_axis, load_contexts
from steer_heal.evaluate import AnswerLogOdds, Vignettes, load_vignettes, retain, shift, stratified_subset
from steer_heal.filters import calibrate_on_pool
from steer_heal.filters.dose import collect
from steer_heal.filters.perplexity import completion_logprobs
from steer_heal.healing.history import History
from steer_heal.healing.lora import LoraSettings
from steer_heal.healing.regularizers import NLL, KLFwd, KLRev, WeightDecay
from steer_heal.healing.train import TrainSettings, heal
from steer_heal.models.model import (
    Depth,
    chat_prompt,
    decoder_blocks,
    encode,
    hidden_size,
    input_device,
    left_pad,
    model_id,
    n_layers,
    pad_id,
    resolve_layers,
)
from steer_heal.run.config import RunConfig
from steer_heal.sampling import Sampling
from steer_heal.steering.generation import generate

AXES = ("authority", "love")
SAMPLED = RunConfig().generate  # the loop's sampling: 96 tokens, temperature 1, batch 16
COMPONENTS = ("stance", "wording", "off_axis")


class Bench:
    """The model, one axis's instruments and the base measurements."""

    def __init__(self, model, tok, axis_name: str):
        self.model, self.tok, self.axis = model, tok, load_axis(axis_name)
        self.probe = AnswerLogOdds.from_axis(self.axis, batch_size=64)
        self.vignettes = Vignettes(items=stratified_subset(load_vignettes(), 42, seed=0), think_tokens=0)
        self.base = self.probe(model, tok)
        self.base_coherence = self.coherence()

    def coherence(self, system: str | None = None) -> float:
        return float(replace(self.vignettes, system=system)(self.model, self.tok).metrics["coherence"])

    def shifts(self, result) -> dict:
        return {c: shift(self.base, result, c).to_dict() for c in COMPONENTS}

    def measure(self, system: str | None = None) -> dict:
        result = replace(self.probe, system=system)(self.model, self.tok)
        return {"shift": self.shifts(result), "coherence": self.coherence(system), "result": result}


def strip(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "result"}


def vector(bench: Bench, contexts: list[str], layers=Depth(0.45, 0.55)) -> SteeringVector:
    a = bench.axis
    return SteeringVector.from_persona_pair(
        bench.model, bench.tok, a.pos, a.neg, contexts, layers=layers, batch_size=64
    )


@torch.no_grad()
def answer_read_vector(bench: Bench, contexts: list[str], layers=Depth(0.45, 0.55), tokens: int = 32) -> SteeringVector:
    """The read position averaged over an answer: each persona answers each context (greedy,
    `tokens` tokens); block outputs are averaged over that answer's positions; pos - neg."""
    model, tok, a = bench.model, bench.tok, bench.axis
    chosen = resolve_layers(layers, n_layers(model))
    blocks = decoder_blocks(model)
    sums = {layer: torch.zeros(hidden_size(model), dtype=torch.float64) for layer in chosen}
    for sign, persona in ((1.0, a.pos), (-1.0, a.neg)):
        answers = generate(
            model, tok, contexts, system=persona, sampling=Sampling(max_new_tokens=tokens, batch_size=64)
        )
        for start in range(0, len(answers), 32):
            chunk = answers[start : start + 32]
            seqs, spans = [], []
            for c in chunk:
                prompt = encode(tok, chat_prompt(tok, c.prompt, system=persona))
                seqs.append(prompt + list(c.token_ids or (pad_id(tok),)))
                spans.append((len(prompt), len(seqs[-1])))
            ids, mask, positions = left_pad(seqs, pad_id(tok), input_device(model))
            width = ids.shape[1]
            seen = {}
            handles = [
                blocks[layer].register_forward_hook(
                    lambda m, i, o, layer=layer: seen.__setitem__(layer, (o[0] if isinstance(o, tuple) else o).float())
                )
                for layer in chosen
            ]
            try:
                model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
            finally:
                for h in handles:
                    h.remove()
            for row, (lo, hi) in enumerate(spans):
                offset = width - hi  # left padding
                for layer in chosen:
                    sums[layer] += sign * seen[layer][row, offset + lo : offset + hi].mean(0).double().cpu()
    directions = {layer: (s / len(contexts)).float() for layer, s in sums.items()}
    return SteeringVector(
        directions, hidden_size(model), n_layers(model), model_id(model), method="answer_mean", pos=a.pos, neg=a.neg
    )


def text_quality(bench: Bench, filt, vec: SteeringVector | None, coeff: float, n: int = 32, seed: int = 7) -> dict:
    """Sampled completions at this dose: the calibrated filter's kept share and the base
    model's perplexity of them (per token, over all completion tokens)."""
    prompts = [bench.axis.prompts[i % len(bench.axis.prompts)] for i in range(n)]
    if vec is None or coeff == 0:
        out = generate(bench.model, bench.tok, prompts, sampling=SAMPLED, seed=seed, progress=False)
    else:
        with vec.apply(bench.model, coeff):
            out = generate(bench.model, bench.tok, prompts, sampling=SAMPLED, seed=seed, progress=False)
    kept = sum(v.keep for v in filt(out))
    lps = completion_logprobs(
        bench.model, bench.tok, [c.formatted_prompt(bench.tok) for c in out], [c.text for c in out]
    )
    tokens = np.concatenate([lp for lp in lps if lp.size]) if any(lp.size for lp in lps) else np.zeros(1)
    return {"kept_share": kept / n, "base_ppl": float(math.exp(-tokens.mean())), "n": n}


def gate1(model, tok, out: dict, state: dict, deadline: float, axes=AXES, only: tuple[str, ...] = ()) -> None:
    """Every variant per axis; `only` (name prefixes) runs just those, besides the default vector
    the operating dose is chosen on, without its per-dose text quality (a follow-up run)."""
    contexts = load_contexts()
    for axis_name in axes:
        t0 = time.perf_counter()
        bench = Bench(model, tok, axis_name)
        filt, _ = calibrate_on_pool(model, tok, bench.axis.prompts, n=32, sampling=SAMPLED, seed=30)
        rec = {"base_coherence": bench.base_coherence, "base_quality": text_quality(bench, filt, None, 0.0)}
        pos, neg = bench.measure(bench.axis.pos), bench.measure(bench.axis.neg)
        rec["pos persona"], rec["neg persona"] = strip(pos), strip(neg)
        control = shift(neg["result"], pos["result"], "stance")
        rec["persona_stance_control"] = {**control.to_dict(), "z": control.z}
        variants = {
            "default (last token, 0.45-0.55, 256 contexts)": (
                lambda: vector(bench, contexts[:256]),
                (0.5, 1, 1.5, 2, 3, 4),
            ),
            "band 0.20-0.30": (lambda: vector(bench, contexts[:256], Depth(0.2, 0.3)), (1, 2, 3)),
            "band 0.65-0.75": (lambda: vector(bench, contexts[:256], Depth(0.65, 0.75)), (1, 2, 3)),
            "band 0.30-0.70": (lambda: vector(bench, contexts[:256], Depth(0.3, 0.7)), (0.5, 1, 2)),
            "64 contexts": (lambda: vector(bench, contexts[:64]), (1, 2, 3)),
            "axis prompts as contexts (on-topic dilemmas)": (lambda: vector(bench, bench.axis.prompts), (1, 2, 3)),
            "answer-averaged read (64 contexts, 32 tokens)": (
                lambda: answer_read_vector(bench, contexts[:64]),
                (1, 2, 3),
            ),
        }
        rec["variants"] = {}
        if only:  # the default vector at its operating dose only, then the chosen variants
            default_name = next(iter(variants))
            variants = {default_name: (variants[default_name][0], (2,))} | {
                k: v for k, v in variants.items() if k.startswith(only)
            }
        for name, (make, doses) in variants.items():
            if time.perf_counter() > deadline and not name.startswith("default"):
                rec["variants"][name] = "skipped: out of time"
                continue
            vec = make()
            rows = {"norms": vec.norms()}
            for c in doses:
                with vec.apply(model, c):
                    m = bench.measure()
                row = strip(m)
                row["stance_z"] = row["shift"]["stance"]["mean"] / max(row["shift"]["stance"]["se"], 1e-12)
                row["wording_z"] = row["shift"]["wording"]["mean"] / max(row["shift"]["wording"]["se"], 1e-12)
                if name.startswith("default"):
                    row["quality"] = text_quality(bench, filt, vec, c)
                rows[f"c={c:g}"] = row
                print(
                    axis_name,
                    name,
                    f"c={c:g}",
                    json.dumps({k: row["shift"][k]["mean"] for k in COMPONENTS}),
                    f"coh {row['coherence']:.3f}",
                    row.get("quality", ""),
                    flush=True,
                )
            rec["variants"][name] = rows
        default = rec["variants"][next(iter(variants))]
        ok = [
            float(k[2:])
            for k, row in default.items()
            if k.startswith("c=")
            and row["coherence"] >= 0.95 * bench.base_coherence
            and row["quality"]["kept_share"] >= 0.5
        ]
        c_op = max(ok) if ok else min(float(k[2:]) for k in default if k.startswith("c="))
        at = default[f"c={c_op:g}"]
        claimed = "stance" if at["stance_z"] >= 5 else "wording"
        rec["operating_dose"] = {"coeff": c_op, "claimed": claimed, "rule_met_by": ok}
        state[axis_name] = {"c_op": c_op, "claimed": claimed}
        rec["seconds"] = time.perf_counter() - t0
        out[axis_name] = rec
        print(axis_name, "operating dose", c_op, claimed, f"{rec['seconds']:.0f}s", flush=True)


HEALS = {
    "nll": lambda: [NLL()],
    "klrev lam=0.03": lambda: [KLRev(lam=0.03)],
    "klrev lam=0.1": lambda: [KLRev(lam=0.1)],
    "klrev lam=0.3": lambda: [KLRev(lam=0.3)],
    "klrev lam=1": lambda: [KLRev(lam=1.0)],
    "klfwd lam=1": lambda: [KLFwd(lam=1.0)],
    "weight decay 0.1": lambda: [NLL(), WeightDecay(wd=0.1)],
}
HEALS_1B = ("nll", "klrev lam=0.1", "klrev lam=1", "klfwd lam=1")


def fired(result) -> dict:
    """How often the barrier was active: share of steps with any row over tau, mean share of rows."""
    keys = [k for k in (result.steps[0].extra if result.steps else {}) if k.endswith(".fired")]
    if not keys:
        return {"steps_active": 0.0, "rows_over_tau": 0.0, "has_barrier": False}
    values = [s.extra[keys[0]] for s in result.steps]
    return {
        "steps_active": float(np.mean([v > 0 for v in values])),
        "rows_over_tau": float(np.mean(values)),
        "has_barrier": True,
    }


class HealGrid:
    """One dose's kept completions (collected once) and the heals trained on them."""

    def __init__(self, bench: Bench, vec: SteeringVector, coeff: float, settings: dict):
        model, tok = bench.model, bench.tok
        self.bench, self.settings = bench, settings
        filt, calibration = calibrate_on_pool(model, tok, bench.axis.prompts, n=32, sampling=SAMPLED, seed=30)
        t0 = time.perf_counter()
        self.kept = collect(
            model,
            tok,
            vec,
            bench.axis.prompts,
            filt,
            coeff,
            n_keep=64,
            max_batches=8,
            sampling=SAMPLED,
            seed=50,
            calibration=calibration,
        )
        with vec.apply(model, coeff):
            self.steered = bench.measure()
        self.record = {
            "coeff": coeff,
            "n_kept": len(self.kept.kept),
            "n_generated": len(self.kept.completions),
            "collect_s": time.perf_counter() - t0,
            "settings": settings,
            "steered": strip(self.steered),
            "heals": {},
        }

    def run(self, name: str, seed: int) -> None:
        bench, t0 = self.bench, time.perf_counter()
        history = History(bench.model)
        try:
            result = heal(
                history,
                bench.tok,
                self.kept.kept,
                HEALS[name](),
                reference="base",
                lora=LoraSettings(r=32, alpha=64),
                train=TrainSettings(seed=seed, split_grads=False, **self.settings),
                progress=False,
            )
            history.fold(result)
            healed = bench.measure()
        finally:
            history.close()
        row = strip(healed)
        row["retain"] = {
            c: retain(bench.base, self.steered["result"], healed["result"], c) for c in ("stance", "wording")
        }
        row["fired"] = fired(result)
        row["val_nll"] = [result.val_nll_start] + [e.val_nll for e in result.epochs]
        row["heal_s"], row["seconds"] = result.seconds, time.perf_counter() - t0
        self.record["heals"][f"{name} seed={seed}"] = row
        print(
            bench.axis.name,
            f"c={self.record['coeff']:g}",
            name,
            seed,
            json.dumps({k: round(row["shift"][k]["mean"], 3) for k in COMPONENTS}),
            f"coh {row['coherence']:.3f}",
            f"retain S {row['retain']['stance'][0]:.2f} W {row['retain']['wording'][0]:.2f}",
            f"fired {row['fired']['steps_active']:.2f}",
            f"{row['seconds']:.0f}s",
            flush=True,
        )


def q1(
    model,
    tok,
    out: dict,
    state: dict,
    deadline: float,
    axes=AXES,
    seeds=(0, 1, 2),
    band: tuple[float, float] = (0.45, 0.55),
    heals: tuple[str, ...] = (),
    grids: tuple[str, ...] = ("q1", "q1b"),
) -> None:
    """Seeds outermost, so a deadline leaves every variant with the same seeds done. `band`: the
    vector's layer band; `heals` (default: all) and `grids` pick a subset for a follow-up run."""
    contexts = load_contexts()[:256]
    settings = {"epochs": 6, "batch_size": 8, "lr": 2e-4}  # the full preset's heal at half the steps
    for axis_name in axes:
        bench = Bench(model, tok, axis_name)
        vec = vector(bench, contexts, Depth(*band))
        c_op = state[axis_name]["c_op"]
        made = {which: HealGrid(bench, vec, {"q1": 1, "q1b": 2}[which] * c_op, settings) for which in grids}
        out[axis_name] = {"base_coherence": bench.base_coherence, "band": list(band)}
        out[axis_name].update({which: grid.record for which, grid in made.items()})
        for seed in seeds:
            for which, names in (("q1", list(HEALS)), ("q1b", HEALS_1B)):
                for name in names:
                    if which not in made or (heals and name not in heals):
                        continue
                    if time.perf_counter() > deadline:
                        made[which].record["heals"][f"{name} seed={seed}"] = "skipped: out of time"
                        continue
                    made[which].run(name, seed)


def loop_phase(
    model,
    tok,
    out: dict,
    state: dict,
    deadline: float,
    axis_name: str,
    seeds,
    root: Path,
    regs=("klrev", "nll"),
    probe_size: int = 16,
    calibrate_on: str = "base",
    device: str = "cuda",
    model_name: str = "smollm2-135m",
) -> None:
    """Q2/Q3: the library's loop, 5 rounds, reference prev with lambda decay, KLRev vs NLL. The dose
    walk's probe is 16 completions (the preset's 8 ended a KLRev loop on one completion in eight).
    `calibrate_on`: whose unsteered text sets the filter's thresholds (filter.calibrate_on).

    A reg written `<reg>+a<lam>` (e.g. `klrev+a1`) also heals with the anchor (issue 25): reverse KL
    to the base on its own completions of the anchor prompts, weight lam. Every run logs the drift
    instruments (NeutralKL, register-shift AUC, the base's perplexity of the student's samples) each
    round and the register shift's controls once.

    Issue 25's rules, written before the runs: an arm "lasts" on a seed when it makes 5 rounds with
    the default (base-calibrated) filter, its stance at round 4 is not below round 0's beyond their
    95% intervals, its register AUC stays <= 0.7 and its 7-way coherence >= 0.95 x base at every
    round. The anchor's lam is the one of the seed-0 sweep (0.3, 1, 3 with KLRev) that lasts with the
    smallest AUC; ties go to the smaller lam (less pull on the trait). An AUC read while the register
    shift's controls failed is reported as the instrument failing, not as no drift.

    A further `+c<x>` in an arm (e.g. `klrev+a1+c0.1`) lowers dose.c_min to x. Written before its
    run (after the 14 loops above, which all ended at c_min 0.25 while the re-extracted vector's
    norm grew): if the dose floor, not drift, ends the loop, then `klrev+a1+c0.1` makes 5 rounds on
    >= 2 of 3 seeds with AUC <= 0.7 and coherence >= 0.95 x base at every round; its stance at
    round 4 against round 0 is reported either way.

    The second axis (authority, with the answer pairs rewritten so its stance control passes:
    benchmarks/science/axis_control.py), written 2026-12-07 before its runs: no arm won on love, so
    the arm is the one that came closest there, `klrev+a1+c0.1`, against `klrev+c0.1` (the same
    floor without the anchor), 3 seeds each. Read: per arm, how many seeds last (the rule above),
    and whether the anchor lowers the last round's AUC and NeutralKL against no anchor on every
    seed. The student-calibrated love loops (`--calibrate-on student`, `klrev`, 3 seeds) are re-run
    only for the instrument: the drift target holds if their AUC is >= 0.8 in round 3 or 4 (where
    they reach it) and <= 0.7 in round 0, on every seed that reaches round 3.

    A further `+k<n>` (e.g. `klrev+a1+c0.1+k3`) sets dose.confirm = n: when the c_min probe
    fails, n more probes there, judged pooled with it. Written 2026-12-07 before its runs, from
    the stored runs' stops: 20 of the 35 loops (of 44 stored) that stopped at c_min dropped 2-4 of 16
    completions there, while the student's c_min probes failed 1.7 % of their completions at
    round 0 and 2.4 % at round 1 (pooled over all stored runs), 4.6 % at round 2, 13 % at 3 and
    24 % at 4, so a part of the stops are one probe's noise and a part real. Hypothesis: with
    three confirmations, `klrev+a1+c0.1+k3` on love lasts (the rule above: 5 rounds, stance at
    round 4 not below round 0's beyond the intervals, AUC <= 0.7, coherence >= 0.95 x base) on
    >= 2 of 3 seeds; `nll+a1+c0.1+k3` is run beside it, 3 seeds, under the same rule. If one
    arm meets it, the full preset takes dose.confirm = 3 (and that arm's regulariser); if
    neither does, the number of rounds each seed makes and its stop reason are reported, and
    the preset keeps confirm = 0. Either way, how many stops the confirmation overturned and
    what the pooled probe read are reported."""
    from steer_heal.run import config as cfg
    from steer_heal.run import loop
    from steer_heal.run.runlog import RunDir

    out["runs"] = {}
    for seed in seeds:
        for arm in regs:
            reg, *parts = arm.split("+")  # <reg>[+a<lam>][+c<c_min>][+k<confirm>]
            knobs = {part[0]: part[1:] for part in parts}
            if len(knobs) != len(parts) or not set(knobs) <= {"a", "c", "k"}:
                raise SystemExit(f"arm {arm!r}: write <reg>[+a<lam>][+c<c_min>][+k<confirm>], each at most once")
            anchor = {"anchor": "klrev", "anchor_lam": float(knobs["a"])} if "a" in knobs else {"anchor": "none"}
            # c_min explicit: the full preset's floor moved to 0.1 after these arms were defined
            dose = {"probe_size": probe_size, "c_min": float(knobs.get("c", 0.25)), "confirm": int(knobs.get("k", 0))}
            name = f"{axis_name} {arm} seed={seed}" + (
                "" if calibrate_on == "base" else f" calibrate_on={calibrate_on}"
            )
            per_round = out.get("round_s", 60.0)
            if time.perf_counter() + 5.5 * per_round > deadline:
                out["runs"][name] = "skipped: out of time"
                continue
            config = cfg.resolve(
                "full",
                overrides={
                    "run": {
                        "rounds": 5,
                        "seed": seed,
                        "axis": axis_name,
                        "device": device,
                        "dtype": "float32",
                        "model": model_name,
                    },
                    "dose": dose,
                    "filter": {"calibrate_on": calibrate_on},
                    "heal": {"reg": reg, "reference": "prev", "batch_size": 8, "lr": 2e-4, **anchor},
                    "eval": {"n_items": 42, "think_tokens": 0, "sample_tokens": 16, "coherence_floor": 0.0},
                },
            )
            t0 = time.perf_counter()
            s = loop.Setup(
                History(model),
                tok,
                load_axis(axis_name),
                load_contexts()[: config.extract.n_contexts],
                loop.probes(config, seed, load_axis(axis_name)),
            )
            stopped = None
            try:
                with RunDir.create(root / name.replace(" ", "_"), config) as run:
                    loop.run(config, run, s, progress=False)
            except Exception as exc:  # e.g. DoseError: the loop cannot go on; that is a result
                stopped = f"{type(exc).__name__}: {exc}"
            finally:
                s.history.close()
            seconds = time.perf_counter() - t0
            rounds = sum(1 for e in run.events() if e["event"] == "round")
            out["round_s"] = seconds / (rounds + 0.5)
            out["runs"][name] = {
                "seconds": seconds,
                "dir": name.replace(" ", "_"),
                "rounds": rounds,
                "stopped": stopped,
            }
            print(name, f"{seconds:.0f}s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=["gate1", "q1", "loop"])
    ap.add_argument("--axis", default="authority", help="loop: the axis")
    ap.add_argument("--axes", default=",".join(AXES), help="gate1, q1: comma-separated axes")
    ap.add_argument("--seeds", default=None, help="loop, q1: comma-separated seeds (loop: 0, q1: 0,1,2)")
    ap.add_argument("--regs", default="klrev,nll", help="loop: comma-separated heal regularisers")
    ap.add_argument("--band", default="0.45,0.55", help="q1: the vector's layer band as depth fractions lo,hi")
    ap.add_argument("--heals", default="", help="q1: comma-separated heal names (default: all)")
    ap.add_argument("--grids", default="q1,q1b", help="q1: q1 (the operating dose) and/or q1b (twice it)")
    ap.add_argument("--variants", default="", help="gate1: comma-separated variant-name prefixes to run (default: all)")
    ap.add_argument("--calibrate-on", default="base", choices=["base", "student"], help="loop: filter.calibrate_on")
    ap.add_argument("--model", default="smollm2-135m", help="tiny-llama for a smoke test")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", required=True)
    ap.add_argument("--state", default="/root/science_state")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds after which no new unit starts")
    args = ap.parse_args()
    start = time.perf_counter()
    state_file = Path(args.state) / "state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    if args.phase == "q1" and not state:
        raise SystemExit(f"no {state_file}: run gate1 first on this machine (it went cold?)")
    model, tok = load_model(args.model, device=args.device, dtype="float32")
    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    out = {"card": card, "torch": torch.__version__, "phase": args.phase}
    deadline = start + args.budget
    seeds = [int(x) for x in (args.seeds or ("0" if args.phase == "loop" else "0,1,2")).split(",")]
    axes = tuple(a for a in args.axes.split(",") if a)
    if args.phase == "loop":
        regs = tuple(args.regs.split(","))
        loop_phase(
            model,
            tok,
            out,
            state,
            deadline,
            args.axis,
            seeds,
            Path(args.out) / "runs",
            regs,
            calibrate_on=args.calibrate_on,
            device=args.device,
            model_name=args.model,
        )
    elif args.phase == "q1":
        band = tuple(float(x) for x in args.band.split(","))
        heals = tuple(h for h in args.heals.split(",") if h)
        q1(model, tok, out, state, deadline, axes, seeds, band, heals, tuple(args.grids.split(",")))
    else:
        gate1(model, tok, out, state, deadline, axes, tuple(v for v in args.variants.split(",") if v))
    out["seconds"] = time.perf_counter() - start
    Path(args.out).mkdir(parents=True, exist_ok=True)
    tag = args.phase if args.phase == "loop" else f"{args.phase}_{'_'.join(args.axes.split(','))}"
    (Path(args.out) / f"{tag}.json").write_text(json.dumps(out, indent=1, default=str))
    state_file.parent.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps(state))
    print(f"{args.phase} done in {out['seconds']:.0f}s", flush=True)


if __name__ == "__main__":
    main()
