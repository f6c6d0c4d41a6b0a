"""The instruments on the embedded SmolLM2-135M: what the answer log-odds probe sees, and
what the calibrated filter and dose walk choose.

    python benchmarks/science/instruments.py --device cuda --out OUT      # about 5 minutes on one H200
    python benchmarks/science/instruments.py --only probe --axes authority  # the probe table alone

1. Probe (per axis): a vector from the persona pair (256 contexts, the default band);
   AnswerLogOdds on the axis's held-out scenarios at c = 0, 1, 2, 3 and under both persona
   prompts; stance, wording and off-axis shifts against the base with 95% intervals; the
   7-way coherence at each dose. Positive controls: the pos-minus-neg persona stance shift
   (z = mean / SE) and the vector's wording shift at c = 2.
2. Salad: sampled completions at c = 4, 6, 8 (for labelling new filter items).
3. Loops: `--preset quick` (the demo) and `--preset full --rounds 1` on the same device:
   their stage tables, the dose the walk chose and why, and the steered 7-way coherence.

Writes OUT/instruments.json, OUT/instruments.md, OUT/salad.jsonl and OUT/runs.tar.gz.
"""

from __future__ import annotations

import argparse
import json
import tarfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from steer_heal import SteeringVector, load_model
from steer_heal.data import load_axis, load_contexts
from steer_heal.evaluate import AnswerLogOdds, Vignettes, load_vignettes, shift, stratified_subset
from steer_heal.run import config as cfg
from steer_heal.run import loop, plot
from steer_heal.run.runlog import RunDir
from steer_heal.sampling import Sampling
from steer_heal.steering.generation import generate


def probe_axis(model, tok, axis_name: str, coeffs, out: dict, lines: list) -> SteeringVector:
    axis = load_axis(axis_name)
    probe = AnswerLogOdds.from_axis(axis, batch_size=64)
    vignettes = Vignettes(items=stratified_subset(load_vignettes(), 42, seed=0), think_tokens=0)
    vec = SteeringVector.from_persona_pair(model, tok, axis.pos, axis.neg, load_contexts()[:256], batch_size=32)
    results, coherence = {}, {}
    t0 = time.perf_counter()
    results["base"] = probe(model, tok)
    coherence["base"] = vignettes(model, tok).metrics["coherence"]
    for name, system in (("pos persona", axis.pos), ("neg persona", axis.neg)):
        results[name] = replace(probe, system=system)(model, tok)
        coherence[name] = replace(vignettes, system=system)(model, tok).metrics["coherence"]
    for c in coeffs:
        with vec.apply(model, c):
            results[f"c={c:g}"] = probe(model, tok)
            coherence[f"c={c:g}"] = vignettes(model, tok).metrics["coherence"]
    seconds = time.perf_counter() - t0
    table = {}
    lines += [
        f"### {axis_name}: shifts against the base ({len(probe.scenarios)} held-out scenarios, {len(probe.pairs)} "
        f"crossed pairs, {len(probe.off_axis)} off-axis pairs; {seconds:.0f} s for {len(results)} conditions)",
        "",
        "| condition | stance S | wording W | off-axis | naive orig | 7-way coherence (x base) |",
        "|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        row = {c: shift(results["base"], result, c).to_dict() for c in ("stance", "wording", "off_axis", "orig")}
        row["coherence"] = coherence[name]
        table[name] = row
        if name == "base":
            continue
        cells = [
            f"{row[c]['mean']:+.3f} [{row[c]['ci'][0]:+.3f}, {row[c]['ci'][1]:+.3f}] (SE {row[c]['se']:.3f})"
            for c in ("stance", "wording", "off_axis")
        ]
        lines.append(
            f"| {name} | "
            + " | ".join(cells)
            + f" | {row['orig']['mean']:+.3f} | {coherence[name]:.3f} ({coherence[name] / coherence['base']:.3f}) |"
        )
    control = shift(results["neg persona"], results["pos persona"], "stance")
    wording = shift(results["base"], results["c=2"], "wording") if 2 in coeffs else None
    out[axis_name] = {
        "table": table,
        "persona_control": control.to_dict() | {"z": control.z},
        "vector_wording_c2": None if wording is None else wording.to_dict() | {"z": wording.z},
        "vector_norms": vec.norms(),
    }
    lines += [
        "",
        f"Positive control, pos minus neg persona, stance: {control.mean:+.3f} (SE {control.se:.3f}, z {control.z:+.1f}, "
        f"95% CI [{control.ci[0]:+.3f}, {control.ci[1]:+.3f}]).",
    ]
    if wording is not None:
        lines.append(f"Vector wording shift at c=2: {wording.mean:+.3f} (SE {wording.se:.3f}, z {wording.z:+.1f}).")
    lines.append("")
    return vec


def run_preset(preset: str, device: str, dtype: str, root: Path, lines: list, out: dict, **overrides) -> None:
    config = cfg.resolve(preset, overrides={"run": {"device": device, "dtype": dtype, **overrides}})
    t0 = time.perf_counter()
    with RunDir.create(root / preset, config) as run_dir:
        result = loop.run(config, run_dir, progress=True)
        files = plot.render(run_dir.path)
    seconds = time.perf_counter() - t0
    events = run_dir.events()
    dose = next(e for e in events if e["event"] == "dose")
    lines += [
        f"### `--preset {preset}` ({', '.join(f'{k}={v}' for k, v in overrides.items()) or 'as is'}) on {device}: "
        f"{seconds:.0f} s",
        "",
        "Dose walk:",
        "",
        "| coeff | kept | coherence | pass | why |",
        "|---|---|---|---|---|",
        *(
            f"| {p['coeff']:.3g} | {p['kept']}/{p['n']} | {p['coherence'] if p['coherence'] is None else round(p['coherence'], 3)} "
            f"| {p['passed']} | {p['why']} |"
            for p in dose["probes"]
        ),
        "",
        files["stages"].read_text(),
        "",
        f"stopped: {result['stopped']}; time per stage: {plot.time_breakdown(events)}",
        "",
    ]
    out[preset] = {"seconds": seconds, "dose": dose["coeff"], "stopped": result["stopped"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="smollm2-135m", help="tiny-llama checks the script in seconds")
    ap.add_argument("--axes", default="authority,love")
    ap.add_argument("--coeffs", default="1,2,3")
    ap.add_argument("--only", choices=["probe", "salad", "loops"], default=None)
    ap.add_argument("--out", default="out/instruments")
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    card = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    results: dict = {"device": args.device, "card": card}
    lines = [f"# Instruments on SmolLM2-135M ({card}, fp32)", ""]
    model, tok = load_model(args.model, device=args.device)
    coeffs = [float(c) for c in args.coeffs.split(",")]
    vectors = {}
    if args.only in (None, "probe"):
        for name in args.axes.split(","):
            vectors[name] = probe_axis(model, tok, name, coeffs, results, lines)
            (out_dir / "instruments.md").write_text("\n".join(lines))
    if args.only in (None, "salad"):
        axis = load_axis("authority")
        vec = vectors.get("authority") or SteeringVector.from_persona_pair(
            model, tok, axis.pos, axis.neg, load_contexts()[:256], batch_size=32
        )
        with open(out_dir / "salad.jsonl", "w") as f:
            for c in (4.0, 6.0, 8.0):
                prompts = axis.prompts[:16]
                outs = generate(
                    model,
                    tok,
                    prompts,
                    steering=vec,
                    coeff=c,
                    sampling=Sampling(max_new_tokens=96, do_sample=True, batch_size=16),
                    seed=int(c),
                )
                for o in outs:
                    f.write(json.dumps({"coeff": c, "prompt": o.prompt, "text": o.text}) + "\n")
    if args.only in (None, "loops"):
        del model
        runs = out_dir / "runs"
        run_preset("quick", args.device, "float32", runs, lines, results, model=args.model)
        run_preset("full", args.device, "float32", runs, lines, results, model=args.model, rounds=1)
        with tarfile.open(out_dir / "runs.tar.gz", "w:gz") as tar:
            for path in runs.rglob("*"):
                if path.is_file() and path.suffix in (".jsonl", ".md", ".toml", ".png"):
                    tar.add(path, arcname=str(path.relative_to(runs)))
    (out_dir / "instruments.md").write_text("\n".join(lines))
    (out_dir / "instruments.json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
