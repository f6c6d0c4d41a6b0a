"""Tables of issue 25's loops (docs/runs/science/anchor/): per run and round the stance, wording,
7-way coherence, NeutralKL, register-shift AUC and the base's perplexity of the student's text.

    python benchmarks/science/anchor_report.py [--dir docs/runs/science/anchor]   # tables; writes anchor_loops.png
    (also --dir docs/runs/science/anchor_authority: the second axis; anchor_student: the instrument's check)

The seed-0 sweep was run before the register shift's folds kept each prompt's two answers
together; its AUCs are taken from auc_regrouped.json (drift_posthoc.py on the logged texts),
the later runs' as logged (the same computation).
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

from steer_heal.evaluate import EvalResult, shift


def load(run: Path) -> list[dict]:
    with gzip.open(run / "events.jsonl.gz", "rt") as f:
        return [json.loads(line) for line in f]


def table(run: Path, regrouped: dict) -> tuple[list[str], dict]:
    events = load(run)
    evals = {}
    for e in events:
        if e["event"] == "eval":
            label = e["stage"] if e["round"] < 0 else f"{e['stage']} r{e['round']}"
            evals[label] = {k: EvalResult.from_dict(v) for k, v in e["results"].items()}
    base = evals["base"]
    base_coh = base["vignettes"].metrics["coherence"]
    rows, facts = [], {"rounds": 0, "stance": [], "auc": [], "coh": [], "seconds": [], "kl": []}
    for e in events:
        if e["event"] != "round":
            continue
        r = e["round"]
        healed = evals[f"healed r{r}"]
        st = shift(base["logodds"], healed["logodds"], "stance")
        wd = shift(base["logodds"], healed["logodds"], "wording")
        d = e["drift"]
        auc = regrouped.get(run.name, {}).get(str(r), d["auc"])
        coh = e["coherence"] / base_coh
        facts["rounds"] += 1
        facts["stance"].append((st.mean, st.ci))
        facts["auc"].append(auc)
        facts["kl"].append(d["kl_rev"])
        facts["coh"].append(coh)
        facts["seconds"].append(sum(e["timings"].values()))
        rows.append(
            f"| {run.name} | {r} | {e['coeff']:.2f} | {st.mean:+.2f} [{st.ci[0]:+.2f}, {st.ci[1]:+.2f}] | {wd.mean:+.2f} "
            f"| {coh:.3f} | {d['kl_rev']:.4f} | {auc:.2f} | {d['student_base_ppl']:.1f} |"
        )
    stop = next((e["reason"].split(":")[0] for e in events if e["event"] == "stop"), "none")
    facts["stop"] = stop
    neutral = next(e for e in events if e["event"] == "neutral")
    facts["controls"] = neutral.get("controls")
    return rows, facts


def figure(summary: dict, path: Path) -> None:
    """Stance, register AUC and NeutralKL per round, one line per run, one colour per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {
        "klrev": "#c0392b",
        "nll": "#2980b9",
        "klrev+a1": "#e67e22",
        "nll+a1": "#16a085",
        "klrev+c0.1": "#c0392b",
        "klrev+a1+c0.1": "#e67e22",
    }
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    seen = set()
    for name, f in summary.items():
        arm = name.split("_", 1)[1].rsplit("_seed=", 1)[0]  # <axis>_<arm>_seed=<n>[_...]
        colour = colours.get(arm, "#999999")
        label = arm if arm not in seen else None
        seen.add(arm)
        rounds = list(range(f["rounds"]))
        axes[0].plot(rounds, [m for m, _ in f["stance"]], marker="o", color=colour, label=label)
        axes[1].plot(rounds, f["auc"], marker="o", color=colour, label=label)
        axes[2].semilogy(rounds, f["kl"], marker="o", color=colour, label=label)
    axes[0].set_title("stance shift vs base (nats)")
    axes[1].set_title("register-shift AUC (0.5: no shift)")
    axes[1].axhline(0.5, color="#999999", lw=0.8)
    axes[2].set_title("NeutralKL(student || base), nats/token")
    for ax in axes:
        ax.set_xlabel("round")
        ax.set_xticks(range(5))
    axes[0].legend(fontsize=8, title="arm (grey: lam 3, 10)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="docs/runs/science/anchor")
    args = ap.parse_args()
    root = Path(args.dir)
    regrouped_file = root / "auc_regrouped.json"  # only the first seed-0 sweep needs it
    regrouped = json.loads(regrouped_file.read_text()) if regrouped_file.exists() else {}
    print(
        "| run | round | dose | stance [95% CI] | wording | coherence x base | NeutralKL | register AUC | base ppl of its text |"
    )
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    summary = {}
    for run in sorted(p for p in root.iterdir() if p.is_dir()):
        rows, facts = table(run, regrouped)
        print("\n".join(rows))
        summary[run.name] = facts
    print()
    print("| run | rounds | stopped by | max AUC | min coherence | stance r0 -> last |")
    print("|---|---:|---|---:|---:|---|")
    for name, f in summary.items():
        first, last = f["stance"][0][0], f["stance"][-1][0]
        print(
            f"| {name} | {f['rounds']} | {f['stop']} | {max(f['auc']):.2f} | {min(f['coh']):.3f} | {first:+.2f} -> {last:+.2f} |"
        )
    figure(summary, root / "anchor_loops.png")
    # round times are compared only within one device call (docs/results.md): the calls differ in
    # card and in how many loops shared it, so no mean over all runs is printed here


if __name__ == "__main__":
    main()
