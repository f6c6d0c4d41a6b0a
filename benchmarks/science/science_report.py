"""Tables and figures of docs/results.md from the JSON that benchmarks/science/science.py wrote.

    python benchmarks/science/science_report.py [--dir docs/runs/science]   # prints markdown, writes PNGs

Reads gate1_*.json, q1_<axis>.json and the loop runs under loops/ (one folder per run with
its events.jsonl.gz); writes retain_vs_coherence.png (Q1 and Q1b, both axes) and
loop_trajectories.png into the same folder. Means over seeds are plain means; each seed's own
paired 95% interval (over the 32 held-out scenarios) is kept in the JSON.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import tomllib
from pathlib import Path

from steer_heal.evaluate import EvalResult, shift


def ci(s: dict) -> str:
    return f"{s['mean']:+.2f} [{s['ci'][0]:+.2f}, {s['ci'][1]:+.2f}]"


def gate1_tables(gate: dict) -> list[str]:
    lines = []
    for axis in ("authority", "love"):
        a = gate[axis]
        base = a["base_coherence"]
        control = a["persona_stance_control"]
        lines += [
            f"#### Gate 1, {axis}: the default vector per dose (base coherence {base:.3f}; base samples kept "
            f"{a['base_quality']['kept_share']:.2f}, base ppl {a['base_quality']['base_ppl']:.2f})",
            "",
            f"Stance positive control (pos minus neg persona prompt): {control['mean']:+.3f} "
            f"[{control['ci'][0]:+.3f}, {control['ci'][1]:+.3f}], z {control['z']:+.1f}"
            + (" - **fails: this probe's stance is not validated on this axis**" if control["z"] < 5 else " - holds"),
            "",
            "| condition | d stance | d wording | d off-axis | stance z | coherence (x base) | kept share | base ppl |",
            "|---|---|---|---|---:|---:|---:|---:|",
        ]
        for name in ("pos persona", "neg persona"):
            p = a[name]
            lines.append(
                f"| {name} prompt | {ci(p['shift']['stance'])} | {ci(p['shift']['wording'])} | "
                f"{ci(p['shift']['off_axis'])} | | {p['coherence'] / base:.3f} | | |"
            )
        default = next(v for k, v in a["variants"].items() if k.startswith("default"))
        for key, row in default.items():
            if not key.startswith("c="):
                continue
            q = row["quality"]
            lines.append(
                f"| vector {key} | {ci(row['shift']['stance'])} | {ci(row['shift']['wording'])} | "
                f"{ci(row['shift']['off_axis'])} | {row['stance_z']:+.1f} | {row['coherence'] / base:.3f} | "
                f"{q['kept_share']:.2f} | {q['base_ppl']:.2f} |"
            )
        op = a["operating_dose"]
        lines += [
            "",
            f"Operating dose by the rule: c = {op['coeff']:g} (doses meeting it: {op['rule_met_by']}).",
            "",
            f"#### Gate 1, {axis}: what else could make the stance carry (shifts against the base)",
            "",
            "| variant | dose | d stance | d wording | d off-axis | coherence (x base) |",
            "|---|---|---|---|---|---:|",
        ]
        for name, rows in a["variants"].items():
            if name.startswith("default") or isinstance(rows, str):
                if isinstance(rows, str):
                    lines.append(f"| {name} | {rows} | | | | |")
                continue
            for key, row in rows.items():
                if key.startswith("c="):
                    lines.append(
                        f"| {name} | {key} | {ci(row['shift']['stance'])} | {ci(row['shift']['wording'])} | "
                        f"{ci(row['shift']['off_axis'])} | {row['coherence'] / base:.3f} |"
                    )
        lines.append("")
    return lines


def heal_rows(grid: dict, base: float) -> dict[str, list[dict]]:
    """{variant: [row per seed]} for the heals that ran."""
    out: dict[str, list[dict]] = {}
    for key, row in grid["heals"].items():
        if isinstance(row, str):
            continue
        name, seed = key.rsplit(" seed=", 1)
        out.setdefault(name, []).append({**row, "seed": int(seed)})
    return out


def q1_tables(axis: str, q: dict) -> list[str]:
    base = q["base_coherence"]
    lines = []
    for which, title in (("q1", "Q1 (operating dose)"), ("q1b", "Q1b (2 x the operating dose)")):
        grid = q[which]
        steered = grid["steered"]
        lines += [
            f"#### {title}, {axis}: c = {grid['coeff']:g}, {grid['n_kept']} kept of {grid['n_generated']} generated; "
            f"steered stance {ci(steered['shift']['stance'])}, wording {ci(steered['shift']['wording'])}, "
            f"off-axis {ci(steered['shift']['off_axis'])}, coherence {steered['coherence'] / base:.3f} x base",
            "",
            "| heal | seeds | d stance (per seed) | retain stance (per seed, 95% CI) | retain wording | d off-axis | "
            "coherence x base (per seed) | barrier active (share of steps) |",
            "|---|---:|---|---|---|---|---|---:|",
        ]
        for name, rows in heal_rows(grid, base).items():
            stance = ", ".join(f"{r['shift']['stance']['mean']:+.2f}" for r in rows)
            kept = ", ".join(
                f"{r['retain']['stance'][0]:.2f} [{r['retain']['stance'][1][0]:.2f}, {r['retain']['stance'][1][1]:.2f}]"
                for r in rows
            )
            words = ", ".join(f"{r['retain']['wording'][0]:.2f}" for r in rows)
            off = ", ".join(f"{r['shift']['off_axis']['mean']:+.2f}" for r in rows)
            coh = ", ".join(f"{r['coherence'] / base:.3f}" for r in rows)
            fired = statistics.mean(r["fired"]["steps_active"] for r in rows)
            lines.append(
                f"| {name} | {len(rows)} | {stance} | {kept} | {words} | {off} | {coh} | "
                f"{fired:.2f}{'' if rows[0]['fired']['has_barrier'] else ' (none)'} |"
            )
        lines.append("")
    return lines


def scatter(folder: Path, q1s: dict[str, dict]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    markers = {
        "nll": "o",
        "klrev lam=0.03": "v",
        "klrev lam=0.1": "^",
        "klrev lam=0.3": "<",
        "klrev lam=1": ">",
        "klfwd lam=1": "s",
        "weight decay 0.1": "x",
    }
    colours = {"authority": "tab:blue", "love": "tab:red"}
    for panel, which in zip(axes, ("q1", "q1b")):
        for axis, q in q1s.items():
            base = q["base_coherence"]
            grid = q[which]
            for name, rows in heal_rows(grid, base).items():
                panel.scatter(
                    [r["coherence"] / base for r in rows],
                    [r["retain"]["stance"][0] for r in rows],
                    marker=markers.get(name, "o"),
                    color=colours[axis],
                    label=f"{axis}: {name}",
                    alpha=0.8,
                )
            panel.scatter(
                [grid["steered"]["coherence"] / base],
                [1.0],
                marker="*",
                s=160,
                color=colours[axis],
                edgecolor="black",
                label=f"{axis}: steered (retain 1 by definition)",
            )
        panel.axvline(0.98, color="grey", linestyle="--", linewidth=0.8)
        panel.axhline(0.5, color="grey", linestyle=":", linewidth=0.8)
        panel.set_title({"q1": "Q1: the operating dose", "q1b": "Q1b: 2 x the operating dose"}[which])
        panel.set_xlabel("7-way coherence / base coherence")
    axes[0].set_ylabel("retain (healed / steered stance shift)")
    fig.suptitle(
        "stance retained vs healed coherence, one point per heal and seed (authority: stance probe not validated)"
    )
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=4, bbox_to_anchor=(0.5, -0.18))
    path = folder / "retain_vs_coherence.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


# the component each axis's vector carries (gate 1): authority's stance probe fails its own control
CLAIMED = {"love": "stance", "authority": "wording"}


def loop_run(folder: Path) -> dict:
    """One loop run's rounds, from its compressed events: shifts against the base stage,
    coherence as a fraction of the base's, and the calibration each round's filter used."""
    with gzip.open(folder / "events.jsonl.gz", "rt") as f:
        events = [json.loads(line) for line in f]
    evals = {(e["stage"], e["round"]): e["results"] for e in events if e["event"] == "eval"}
    base = {k: EvalResult.from_dict(v) for k, v in evals[("base", -1)].items()}
    base_coherence = base["vignettes"].metrics["coherence"]

    def stage(name: str, r: int) -> dict | None:
        if (name, r) not in evals:
            return None
        res = {k: EvalResult.from_dict(v) for k, v in evals[(name, r)].items()}
        out = {c: shift(base["logodds"], res["logodds"], c).to_dict() for c in ("stance", "wording", "off_axis")}
        return {**out, "coherence": res["vignettes"].metrics["coherence"] / base_coherence}

    calibrations = {e["round"]: e for e in events if e["event"] == "calibration"}
    rounds = []
    for e in (e for e in events if e["event"] == "round"):
        r = e["round"]
        rounds.append(
            {
                "round": r,
                "coeff": e["coeff"],
                "n_kept": e["n_kept"],
                "steered": stage("steered", r),
                "healed": stage("healed", r),
                "median_ppl": calibrations[r]["median_ppl"] if r in calibrations else None,
                "cos_v0": e["cos_v0"],
                "cos_student": e["cos_student_teacher"],
            }
        )
    stops = [e for e in events if e["event"] == "stop"]
    config = tomllib.loads((folder / "config.toml").read_text())
    return {
        "name": folder.name,
        "axis": config["run"]["axis"],
        "reg": config["heal"]["reg"],
        "seed": config["run"]["seed"],
        "student_calibrated": config["filter"].get("calibrate_on", "base") == "student",
        "prompted": stage("prompted", -1),
        "rounds": rounds,
        "stop": stops[-1]["reason"] if stops else None,
        "next_calibration_ppl": calibrations[len(rounds)]["median_ppl"] if len(rounds) in calibrations else None,
    }


def loop_tables(runs: list[dict]) -> list[str]:
    groups: dict[str, list[dict]] = {}
    for run in runs:
        key = f"{run['axis']}, filter calibrated on the {'student' if run['student_calibrated'] else 'base'}"
        groups.setdefault(key, []).append(run)
    lines = []
    for key, group in groups.items():
        lines += [
            f"#### The loop, {key}",
            "",
            "| run | round | dose | kept | steered d stance | healed d stance | healed d wording | healed d off-axis "
            "| healed coherence x base | calibration text ppl | cos(v_r, v_0) | cos(v_student, v_r) |",
            "|---|---:|---:|---:|---|---|---|---|---:|---:|---:|---:|",
        ]
        for run in sorted(group, key=lambda x: x["name"]):
            reg, seed = run["reg"], run["seed"]
            for row in run["rounds"]:
                h, st = row["healed"], row["steered"]
                lines.append(
                    f"| {reg} s{seed} | {row['round']} | {row['coeff']:.2f} | {row['n_kept']} | {ci(st['stance'])} "
                    f"| {ci(h['stance'])} | {ci(h['wording'])} | {ci(h['off_axis'])} | {h['coherence']:.3f} "
                    f"| {row['median_ppl']:.2f} | {row['cos_v0']:.3f} | {row['cos_student']:.3f} |"
                )
        lines.append("")
        lines.append("Why each run ended:")
        lines.append("")
        for run in sorted(group, key=lambda x: x["name"]):
            after = run["next_calibration_ppl"]
            drift = (
                f" (the unsteered text of the student it stopped on: median ppl {after:.2f} under the base)"
                if after is not None and run["student_calibrated"]
                else ""
            )
            lines.append(f"- {run['name']}: {len(run['rounds'])} rounds; {run['stop'] or '5 rounds done'}{drift}")
        lines.append("")
    return lines


def loop_figure(folder: Path, runs: list[dict]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["axis"], r["student_calibrated"]) for r in runs})
    fig, axes = plt.subplots(2, len(keys), figsize=(4.2 * len(keys), 6.5), sharex=True, squeeze=False)
    colours = {"klrev": "tab:blue", "nll": "tab:red"}
    for col, (axis, student) in enumerate(keys):
        for run in sorted(runs, key=lambda x: x["name"]):
            if (run["axis"], run["student_calibrated"]) != (axis, student):
                continue
            reg, seed = run["reg"], run["seed"]
            xs = [row["round"] for row in run["rounds"]]
            style = dict(color=colours[reg], linestyle=("-", "--", ":")[seed % 3], marker="o", markersize=3)
            claimed = [row["healed"][CLAIMED[axis]]["mean"] for row in run["rounds"]]
            axes[0, col].plot(xs, claimed, label=f"{reg} s{seed}", **style)
            axes[1, col].plot(xs, [row["healed"]["coherence"] for row in run["rounds"]], **style)
        prompted = next(r for r in runs if r["axis"] == axis)["prompted"]
        axes[0, col].axhline(prompted[CLAIMED[axis]]["mean"], color="grey", linewidth=0.8, label="persona prompt")
        axes[1, col].axhline(0.95, color="grey", linestyle="--", linewidth=0.8)
        axes[0, col].set_title(
            f"{axis} ({CLAIMED[axis]}), filter calibrated on the {'student' if student else 'base'}", fontsize=9
        )
        axes[1, col].set_xlabel("round")
    axes[0, 0].set_ylabel("healed shift vs base, claimed component (nats)")
    axes[1, 0].set_ylabel("healed 7-way coherence / base")
    axes[0, 0].legend(fontsize=7)
    path = folder / "loop_trajectories.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="docs/runs/science")
    folder = Path(ap.parse_args().dir)
    gate = json.loads(next(folder.glob("gate1_*.json")).read_text())
    lines = [f"Card: {gate['card']}, torch {gate['torch']}, float32.", ""]
    lines += gate1_tables(gate)
    q1s = {}
    for axis in ("authority", "love"):
        path = folder / f"q1_{axis}.json"
        if path.exists():
            q1s[axis] = json.loads(path.read_text())[axis]
            lines += q1_tables(axis, q1s[axis])
    if q1s:
        lines.append(f"Figure: {scatter(folder, q1s)}")
    runs = [loop_run(run) for run in sorted((folder / "loops").glob("*")) if (run / "events.jsonl.gz").exists()]
    if runs:
        lines += loop_tables(runs)
        lines.append(f"Figure: {loop_figure(folder, runs)}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
