"""Measure the vignette probe on SmolLM2-135M (CPU): speed, determinism, and how steering,
think budget and wording change the foundation profile. A script, not a test:

    OMP_NUM_THREADS=1 python benchmarks/science/vignette_sweep.py --out out/vignette_sweep.json

Prints markdown tables as it goes and writes every result (metrics + settings) to --out.
`--quick` runs a tiny version (a few items, two coefficients) to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from steer_heal import SteeringVector, load_model
from steer_heal.data import load_contexts
from steer_heal.evaluate import (
    FOUNDATIONS,
    EvalResult,
    HeldOutPerplexity,
    TraitJudge,
    Vignettes,
    foundation_key,
    load_mfv,
    load_vignettes,
    stage_table,
    stratified_subset,
)

POS = "You are someone who looks after others' wellbeing even when it means defying authority."
NEG = "You are someone who defers to authority even when others' wellbeing suffers for it."
MFV = Path(__file__).resolve().parents[3] / "shared" / "data" / "mfv"
SHORT = {f: f.split()[0][:5] for f in FOUNDATIONS}


def log(text: str = "") -> None:
    print(text, flush=True)


def profile_table(title: str, results: list[tuple[str, dict]]) -> None:
    log(f"\n#### {title}\n")
    head = " | ".join(SHORT[f] for f in FOUNDATIONS)
    log(f"| run | {head} | coher | unsc | pNLL | top1 | lbias | s |")
    log("|---|" + "---:|" * (len(FOUNDATIONS) + 6))
    for name, r in results:
        m = r["metrics"]
        cells = " | ".join(f"{m[f'{foundation_key(f)}_nats']:.3f}" for f in FOUNDATIONS)
        log(
            f"| {name} | {cells} | {m['coherence']:.3f} | {m['frac_unscorable']:.2f} | {m['prefill_nll']:.2f} "
            f"| {m['top1_acc']:.3f} | {m.get('label_bias', float('nan')):.3f} | {r['seconds']:.0f} |"
        )


def run(model, tok, evaluator, coeff: float = 0.0, vec: SteeringVector | None = None) -> dict:
    start = time.perf_counter()
    if vec is not None and coeff != 0.0:
        with vec.apply(model, coeff):
            result = evaluator(model, tok)
    else:
        result = evaluator(model, tok)
    return {"metrics": result.metrics, "meta": result.meta, "seconds": time.perf_counter() - start, "rows": result.rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="out/vignette_sweep.json")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--coeffs", default="0,1,2,3,4,6")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--sections",
        default="timing,sweep,prompted,text,positions,positions_think,wording,stages",
        help="comma-separated subset of: timing, sweep, prompted, text, positions, positions_think, wording, stages",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    coeffs = [float(c) for c in args.coeffs.split(",")]
    sections = set(args.sections.split(","))
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    record: dict = {
        "env": {
            "torch": torch.__version__,
            "threads": args.threads,
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "load_avg_start": os.getloadavg(),
        }
    }

    def save() -> None:
        slim = json.loads(json.dumps(record, default=str))
        for section in slim.values():
            if isinstance(section, dict):
                for value in section.values():
                    if isinstance(value, dict):
                        value.pop("rows", None)
        out_path.write_text(json.dumps(slim, indent=1))

    model, tok = load_model("smollm2-135m")
    bundled = load_vignettes()
    mfv = load_mfv(MFV) if MFV.exists() else None
    think_full = 32
    if args.quick:
        bundled, coeffs, think_full = stratified_subset(bundled, 7, seed=0), coeffs[:2], 4
        mfv = stratified_subset(mfv, 7, seed=0) if mfv else None

    # ---- speed and determinism (default settings)
    if "timing" in sections:
        timing(model, tok, bundled, mfv, think_full, args, record)
        save()

    # ---- the steering vector
    contexts = load_contexts()
    step = max(1, len(contexts) // 64)
    contexts = contexts[::step][:64]
    start = time.perf_counter()
    vec = SteeringVector.from_persona_pair(model, tok, pos=POS, neg=NEG, contexts=contexts, layers=(0.45, 0.55))
    record["vector"] = {
        "layers": list(vec.layers),
        "norms": vec.norms(),
        "n_contexts": len(contexts),
        "seconds": time.perf_counter() - start,
    }
    log(
        f"\nvector: layers {vec.layers}, norms {[round(n, 2) for n in vec.norms().values()]}, "
        f"{len(contexts)} contexts, {record['vector']['seconds']:.0f} s"
    )

    if "sweep" in sections:
        sweep(model, tok, vec, bundled, mfv, think_full, coeffs, record, save)
    if "prompted" in sections:
        prompted(model, tok, bundled, think_full, record)
        save()
    if "text" in sections:
        free_text(model, tok, vec, coeffs, record)
        save()
    if "positions" in sections:
        positions(model, tok, vec, bundled, [c for c in coeffs if c <= 3], think_full, record, save)
    if "positions_think" in sections:
        positions(model, tok, vec, bundled, [], think_full, record, save, think=True)
    if "wording" in sections:
        wording(model, tok, vec, bundled, record)
        save()
    if "stages" in sections:
        stages(model, tok, vec, bundled, mfv, record)
    record["env"]["load_avg_end"] = os.getloadavg()
    save()
    log(f"\nwrote {out_path}")


def timing(model, tok, bundled, mfv, think_full, args, record) -> None:
    log(f"## speed and determinism (threads={args.threads}, load avg {os.getloadavg()[0]:.1f})")
    timing: dict = {}
    first = run(model, tok, Vignettes(bundled, think_tokens=think_full, orders="reversed"))
    second = run(model, tok, Vignettes(bundled, think_tokens=think_full, orders="reversed"))
    same = first["metrics"] == second["metrics"] and first["rows"] == second["rows"]
    timing["bundled_think32"] = {k: first[k] for k in ("metrics", "seconds")} | {"seconds_2": second["seconds"]}
    log(
        f"bundled set: {len(bundled)} items x 2 orders, think {think_full}: {first['seconds']:.1f} s, "
        f"again {second['seconds']:.1f} s; identical metrics and rows: {same}"
    )
    timing["deterministic"] = same
    if mfv:
        for think in (think_full, 0):
            r = run(model, tok, Vignettes(mfv, think_tokens=think, orders="reversed"))
            timing[f"mfv_think{think}"] = {k: r[k] for k in ("metrics", "seconds")}
            log(f"MFV classic: {len(mfv)} items x 2 orders, think {think}: {r['seconds']:.1f} s")
    record["timing"] = timing


def sweep(model, tok, vec, bundled, mfv, think_full, coeffs, record, save) -> None:
    """Profile vs coefficient, think budget and wording."""
    results: dict = {}
    sets = [("bundled", bundled, think, wording) for think in (0, think_full) for wording in ("described", "plain")]
    if mfv:
        sets.append(("mfv", mfv, 0, "described"))
    for set_name, items, think, wording in sets:
        rows = []
        for coeff in coeffs:
            r = run(model, tok, Vignettes(items, think_tokens=think, wording=wording, orders="reversed"), coeff, vec)
            results[f"{set_name}|think{think}|{wording}|c{coeff:g}"] = r
            rows.append((f"c={coeff:g}", r))
        profile_table(f"{set_name}, think {think}, wording {wording}: nats per foundation vs steering coeff", rows)
        record["sweep"] = results
        save()


def prompted(model, tok, bundled, think_full, record) -> None:
    """The persona as a system prompt, no steering."""
    results: dict = {}
    for think in (0, think_full):
        rows = []
        for name, system in (("no system", None), ("pos persona", POS), ("neg persona", NEG)):
            r = run(model, tok, Vignettes(bundled, think_tokens=think, system=system, orders="reversed"))
            results[f"think{think}|{name}"] = r
            rows.append((name, r))
        profile_table(f"prompted baseline, bundled, think {think}, wording described", rows)
    record["prompted"] = results


def free_text(model, tok, vec, coeffs, record) -> None:
    """Judge score and neutral perplexity vs coefficient."""
    judge = TraitJudge("authority", max_new_tokens=48)
    ppl = HeldOutPerplexity()
    results: dict = {}
    log("\n#### free text vs coeff (judge: authority axis, 8 prompts, greedy 48 tokens)\n")
    log("| coeff | judge score [95% CI] | neutral ppl | sample |")
    log("|---:|---|---:|---|")
    for coeff in coeffs:
        j = run(model, tok, judge, coeff, vec)
        p = run(model, tok, ppl, coeff, vec)
        results[f"c{coeff:g}"] = {"judge": j, "perplexity": p}
        m = j["metrics"]
        sample = j["rows"][0]["text"].replace("\n", " ").replace("|", "/")[:110]
        log(
            f"| {coeff:g} | {m['authority_score']:+.3f} [{m['authority_ci_low']:+.3f}, {m['authority_ci_high']:+.3f}] "
            f"| {p['metrics']['perplexity']:.2f} | {sample} |"
        )
    record["text"] = results


def positions(model, tok, vec, bundled, coeffs, think_full, record, save, think: bool = False) -> None:
    """Position control: all 7 rotations (every foundation at every label) vs reversal.

    Think 0 on the full bundled set; with `think`, the think budget on a stratified 49-item
    subset instead (cyclic costs 3.5x the rows) at the base and the largest coherent coeff (2).
    """
    results: dict = record.setdefault("positions", {})
    subset = stratified_subset(bundled, min(49, len(bundled)), seed=0)
    if think:
        plans = [(f"{len(subset)} stratified", subset, think_full, [0.0, 2.0])]
    else:
        plans = [("bundled", bundled, 0, coeffs)]
    for set_name, items, think_tokens, plan_coeffs in plans:
        for orders in ("reversed", "cyclic"):
            rows = []
            for coeff in plan_coeffs:
                r = run(model, tok, Vignettes(items, think_tokens=think_tokens, orders=orders), coeff, vec)
                results[f"{set_name}|think{think_tokens}|{orders}|c{coeff:g}"] = r
                rows.append((f"c={coeff:g}", r))
            profile_table(f"{set_name}, think {think_tokens}, wording described, orders {orders}", rows)
            save()


def wording(model, tok, vec, bundled, record) -> None:
    """The plain wording under cyclic orders, think 0 (the described one is in `positions`)."""
    rows = []
    for coeff in (0.0, 2.0):
        r = run(model, tok, Vignettes(bundled, think_tokens=0, orders="cyclic", wording="plain"), coeff, vec)
        record.setdefault("wording", {})[f"plain|cyclic|c{coeff:g}"] = r
        rows.append((f"c={coeff:g}", r))
    profile_table("bundled, think 0, wording plain, orders cyclic", rows)


def stages(model, tok, vec, bundled, mfv, record) -> None:
    """Stage tables at the default Vignettes settings, with paired bootstrap intervals."""
    probe = Vignettes(bundled)
    log(f"\n#### stage tables, bundled, defaults (think {probe.think_tokens}, orders {probe.orders})\n")
    runs = {
        "base": (None, 0.0),
        "base again": (None, 0.0),
        "prompted pos": (POS, 0.0),
        "prompted neg": (NEG, 0.0),
        "steered c=1": (None, 1.0),
        "steered": (None, 2.0),
        "steered c=3": (None, 3.0),
    }
    results: dict[str, EvalResult] = {}
    for name, (system, coeff) in runs.items():
        probe = Vignettes(bundled, system=system)
        start = time.perf_counter()
        if coeff:
            with vec.apply(model, coeff):
                results[name] = probe(model, tok)
        else:
            results[name] = probe(model, tok)
        log(f"{name}: {time.perf_counter() - start:.0f} s")
    again = results.pop("base again")
    log(
        f"defaults, two base runs identical (metrics and rows): "
        f"{again.metrics == results['base'].metrics and again.rows == results['base'].rows}"
    )
    if mfv:
        start = time.perf_counter()
        mfv_result = Vignettes(mfv)(model, tok)
        log(
            f"MFV classic at the defaults: {len(mfv)} items x {len(mfv_result.rows) // len(mfv)} orders, "
            f"{time.perf_counter() - start:.0f} s, coherence {mfv_result['coherence']:.3f}, "
            f"top1 {mfv_result['top1_acc']:.3f}, human_match {mfv_result['human_match']:.3f}"
        )
        record["mfv_defaults"] = mfv_result.to_dict()
    for target, direction in (("Authority", -1), ("Care", 1)):
        log(f"\ntarget {target}, direction {direction:+d} (steered = c=2)\n")
        log(stage_table(results, target=target, direction=direction))
    record["stages"] = {name: r.to_dict() for name, r in results.items()}


if __name__ == "__main__":
    main()
