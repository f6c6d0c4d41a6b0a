"""Figures and reports from `events.jsonl` alone (`steer-heal plot RUN_DIR`).

- `trajectory.png`: the target foundation (nats) per stage, base/prompted/steered/healed
  coloured; 1 - coherence on a log axis; an off-target foundation against the target.
- `stages.md`: the paired stage table per probe (base, prompted, then steered and healed
  per round), from `evaluate.stage_table`.
- `report.md`: the stage tables, per-round dose / filter / cosines, and samples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .data import load_axis
from .evaluate import FOUNDATIONS, EvalResult, foundation_key, stage_table
from .io import atomic_write_bytes, atomic_write_text
from .runlog import read_events

COLOURS = {"base": "#444444", "prompted": "#8e44ad", "steered": "#e67e22", "healed": "#2980b9"}


def _stages(events: list[dict[str, Any]]) -> dict[str, dict[str, EvalResult]]:
    """{probe: {stage label: result}} in run order, e.g. 'steered r0', 'healed r0'."""
    out: dict[str, dict[str, EvalResult]] = {}
    for e in events:
        if e["event"] != "eval":
            continue
        label = e["stage"] if e["round"] < 0 else f"{e['stage']} r{e['round']}"
        for probe, record in e["results"].items():
            out.setdefault(probe, {})[label] = EvalResult.from_dict(record)
    return out


def _axis_target(run_dir: Path) -> tuple[str, int]:
    import tomllib

    with open(run_dir / "config.toml", "rb") as f:
        axis_name = tomllib.load(f)["run"]["axis"]
    try:
        axis = load_axis(axis_name)
        return axis.target, axis.direction
    except (ValueError, OSError):
        return "Care", 1


def stage_tables(events: list[dict[str, Any]], target: str, direction: int) -> str:
    parts = []
    for probe, stages in _stages(events).items():
        first_steered = next((k for k in stages if k.startswith("steered")), None)
        parts.append(
            f"### {probe}\n\n"
            + stage_table(stages, base="base", steered=first_steered, target=target, direction=direction)
        )
    return "\n\n".join(parts)


def trajectory(events: list[dict[str, Any]], target: str, path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = _stages(events)
    probe = next(iter(stages))
    labels = list(stages[probe])
    key = f"{foundation_key(target)}_nats"
    off = next(f for f in FOUNDATIONS if f != target and f != "Social Norms")
    off_key = f"{foundation_key(off)}_nats"
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for probe_name, results in stages.items():
        xs = range(len(results))
        values = [r.metrics[key] for r in results.values()]
        colours = [COLOURS[label.split()[0]] for label in results]
        axes[0].plot(xs, values, color="#bbbbbb", zorder=1)
        axes[0].scatter(xs, values, c=colours, zorder=2, label=probe_name)
        axes[1].semilogy(
            xs, [max(1 - r.metrics["coherence"], 1e-6) for r in results.values()], marker="o", label=probe_name
        )
        axes[2].scatter(
            [r.metrics[key] for r in results.values()], [r.metrics[off_key] for r in results.values()], c=colours
        )
        for label, r in results.items():
            axes[2].annotate(label, (r.metrics[key], r.metrics[off_key]), fontsize=7)
    axes[0].set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    axes[1].set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    axes[0].set_title(f"{target} (nats; log mean prob)")
    axes[1].set_title("1 - coherence (log; lower is better)")
    axes[2].set_title(f"{off} vs {target} (nats)")
    axes[2].set_xlabel(target)
    axes[2].set_ylabel(off)
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=k) for k, c in COLOURS.items()]
    axes[0].legend(handles=handles, fontsize=8)
    axes[1].legend(title="probe", fontsize=8)  # one line per probe (e.g. bundled vignettes, MFV)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def rounds_table(events: list[dict[str, Any]]) -> str:
    lines = [
        "| round | dose | kept | coherence | cos(v_r, v_0) | cos(v_student, v_r) | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for e in events:
        if e["event"] == "round":
            seconds = sum(e.get("timings", {}).values())
            lines.append(
                f"| {e['round']} | {e['coeff']:.3g} | {e['n_kept']} | {e['coherence']:.3f} | {e['cos_v0']:.3f} "
                f"| {e['cos_student_teacher']:.3f} | {seconds:.0f} |"
            )
    return "\n".join(lines)


def time_breakdown(events: list[dict[str, Any]]) -> str:
    """Seconds per stage, from the events: the base stage's evaluations, then each round's timings."""
    base = {
        f"{e['stage']} eval" if e["event"] == "eval" else "base samples": e["seconds"]
        for e in events
        if e["round"] == -1 and "seconds" in e
    }
    parts = [", ".join(f"{k} {v:.0f} s" for k, v in base.items())] if base else []
    for e in events:
        if e["event"] == "round" and e.get("timings"):
            parts.append(f"round {e['round']}: " + ", ".join(f"{k} {v:.0f} s" for k, v in e["timings"].items()))
    return "; ".join(parts)


def _samples(events: list[dict[str, Any]]) -> str:
    parts = []
    for e in events:
        if e["event"] != "samples":
            continue
        head = e["stage"] if e["round"] < 0 else f"{e['stage']} (round {e['round']})"
        body = "\n\n".join(f"> **{row['prompt']}**\n\n{row['text'].strip() or '(empty)'}" for row in e["rows"])
        parts.append(f"#### {head}\n\n{body}")
    return "\n\n".join(parts)


def render(run_dir: str | Path) -> dict[str, Path]:
    """Write trajectory.png, stages.md and report.md into the run directory."""
    run_dir = Path(run_dir)
    events = read_events(run_dir / "events.jsonl")
    if not any(e["event"] == "eval" for e in events):
        raise ValueError(f"{run_dir}/events.jsonl has no evaluation events yet; nothing to plot")
    target, direction = _axis_target(run_dir)
    tables = stage_tables(events, target, direction)
    out = {
        "stages": atomic_write_text(
            run_dir / "stages.md", f"# Stages ({target}, direction {direction:+d})\n\n{tables}\n"
        ),
        "report": atomic_write_text(
            run_dir / "report.md",
            f"# Run report: {run_dir.name}\n\n## Stage table\n\n{tables}\n\n## Rounds\n\n{rounds_table(events)}\n\n"
            f"Time per stage: {time_breakdown(events) or 'not recorded'}\n\n"
            f"## Samples (greedy)\n\n{_samples(events)}\n",
        ),
    }
    trajectory(events, target, run_dir / "trajectory.png")
    out["trajectory"] = run_dir / "trajectory.png"
    return out
