"""The tables of docs/results.md that combine runs, from the events committed under docs/runs/.

    python docs/runs/tables.py

Q1 puts the KLRev and the NLL heal of the same round-0 data (seed 0) side by side; the loop
table lists, per round, the dose, the steered and healed shift of the target foundation,
the healed coherence relative to the base, and the two cosines.
"""

from __future__ import annotations

from pathlib import Path

from steer_heal.evaluate import EvalResult, compare, stage_table
from steer_heal.run.plot import _stages
from steer_heal.run.runlog import read_events

RUNS = Path(__file__).resolve().parent
TARGET, DIRECTION = "Care", 1


def q1() -> str:
    klrev = _stages(read_events(RUNS / "klrev_s0" / "events.jsonl"))
    nll = _stages(read_events(RUNS / "nll_s0" / "events.jsonl"))
    parts = []
    for probe in klrev:
        stages: dict[str, EvalResult] = {k: klrev[probe][k] for k in ("base", "prompted", "steered r0")}
        stages["healed r0, KLRev"] = klrev[probe]["healed r0"]
        stages["healed r0, NLL"] = nll[probe]["healed r0"]
        parts.append(f"#### {probe}\n\n" + stage_table(stages, steered="steered r0", target=TARGET, direction=DIRECTION))
    return "\n\n".join(parts)


def loop(name: str) -> str:
    events = read_events(RUNS / name / "events.jsonl")
    stages = _stages(events)
    rounds = [e for e in events if e["event"] == "round"]
    probes = list(stages)
    head = ["round", "dose", "kept", *(f"{p}: steered d / healed d / healed coh / base" for p in probes),
            "cos(v_r, v_0)", "cos(v_student, v_r)", "max layer norm"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for e in rounds:
        r = e["round"]
        cells = [str(r), f"{e['coeff']:g}", str(e["n_kept"])]
        for p in probes:
            base = stages[p]["base"]
            steered = compare(base, stages[p][f"steered r{r}"], target=TARGET, direction=DIRECTION)
            healed = compare(base, stages[p][f"healed r{r}"], target=TARGET, direction=DIRECTION)
            ratio = healed.coherence / base.metrics["coherence"]
            cells.append(f"{steered.d_target:+.3f} / {healed.d_target:+.3f} / {ratio:.3f}")
        cells += [f"{e['cos_v0']:.3f}", f"{e['cos_student_teacher']:.3f}", f"{max(e['norms'].values()):.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def samples(name: str, k: int = 3) -> str:
    """The first k greedy samples of every steered and healed stage, in full."""
    parts = []
    for e in read_events(RUNS / name / "events.jsonl"):
        if e["event"] == "samples" and e["round"] >= 0:
            rows = "\n\n".join(f"> **{x['prompt']}**\n>\n> " + x["text"].strip().replace("\n", "\n> ") for x in e["rows"][:k])
            parts.append(f"#### {e['stage']}, round {e['round']}\n\n{rows}")
    return "\n\n".join(parts)


def main() -> None:
    print("### Q1: KLRev vs NLL on the same round-0 data (seed 0)\n")
    print(q1())
    for name in ("klrev_s0_r3", "klrev_s1_r3"):
        if (RUNS / name / "events.jsonl").exists():
            print(f"\n### Loop, {name}\n")
            print(loop(name))
    if (RUNS / "klrev_s0_r3" / "events.jsonl").exists():
        print("\n### Samples, klrev_s0_r3\n")
        print(samples("klrev_s0_r3"))


if __name__ == "__main__":
    main()
