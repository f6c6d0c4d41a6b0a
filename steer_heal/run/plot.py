"""Figures and reports from `events.jsonl` alone (`steer-heal plot RUN_DIR`).

- `trajectory.png`: the answer log-odds shifts (stance, wording, off-axis; mean and 95% CI
  against the base) per stage; 1 - coherence on a log axis; the 7-way probe's target
  foundation (nats) per stage. Stages are coloured base/prompted/steered/healed.
- `stages.md`: a few plain sentences (what steering moved, at what coherence cost, what the
  heal kept, and whether that beats the persona prompt), then the log-odds shift table,
  then the paired 7-way stage table per vignette probe (`evaluate.stage_table`).
- `report.md`: the same, per-round dose / filter / cosines, time per stage, and samples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..data import load_axis
from ..errors import InputError
from ..evaluate import EvalResult, foundation_key, min_coherence, retain, shift, shift_table, stage_table
from ..evaluate.compare import BROKEN_BELOW
from ..io import atomic_write_bytes, atomic_write_text
from .runlog import read_events

COLOURS = {
    "base": "#444444",
    "prompted": "#8e44ad",
    "prompted_neg": "#c39bd3",
    "steered": "#e67e22",
    "healed": "#2980b9",
}


def _colour(label: str) -> str:
    """A stage label's colour: 'healed r2' -> healed; the persona's other wordings as the prompt."""
    stage = label.split()[0]
    return COLOURS.get(stage) or COLOURS["prompted" if stage.startswith("prompted") else stage]


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


LOGODDS = "logodds"
# The stance control's effect-size floor: a persona prompt that moves the crossed stance by less than
# 0.1 nats (about 10% in the odds) has not shown that the probe sees stance, however large its z (a
# random 4-layer model read +0.029 nats at z 25). On SmolLM2 the controls read +1.84 (love), +0.70 (authority).
CONTROL_MIN_NATS = 0.1


def stage_tables(events: list[dict[str, Any]], target: str, direction: int) -> str:
    """The log-odds shift table first (the trait), then each vignette probe's 7-way table."""
    parts = []
    for probe, stages in sorted(_stages(events).items(), key=lambda kv: kv[0] != LOGODDS):
        first_steered = next((k for k in stages if k.startswith("steered")), None)
        if probe == LOGODDS:
            head = f"### answer log-odds ({direction:+d} = the pos persona's stance): shifts against the base"
            parts.append(f"{head}\n\n" + shift_table(stages, base="base", steered=first_steered))
        else:
            parts.append(
                f"### {probe} (7-way forced choice)\n\n"
                + stage_table(stages, base="base", steered=first_steered, target=target, direction=direction)
            )
    return "\n\n".join(parts)


def _coherence(stage: str, stages: dict[str, dict[str, EvalResult]]) -> float | None:
    return min_coherence(results[stage] for results in stages.values() if stage in results)


def _said(s) -> str:
    return f"{s.mean:+.3f} nats [{s.ci[0]:+.3f}, {s.ci[1]:+.3f}]" + (" (noise)" if s.noise else "")


def summary(events: list[dict[str, Any]]) -> str:
    """Two or three plain sentences from the measured numbers: what steering moved (stance,
    wording, off-axis), at what coherence cost, what the last heal kept, and whether that
    beats the persona prompt at equal or better coherence."""
    stages = _stages(events)
    logodds = stages.get(LOGODDS)
    if not logodds or "base" not in logodds:
        return "No answer log-odds probe in this run (the axis defines no [[answers]]); read the 7-way table."
    steered = [k for k in logodds if k.startswith("steered")]
    healed = [k for k in logodds if k.startswith("healed")]
    base = logodds["base"]
    base_coh = _coherence("base", stages)
    if base_coh is not None and base_coh < BROKEN_BELOW:
        # the 7-way table reads every stage broken: no sentence may claim an effect it contradicts
        return " ".join(
            [
                f"The base model answers the 7-way vignettes at coherence {base_coh:.3f} (< {BROKEN_BELOW}: its "
                "stage table reads broken), so no shift in this run is read as a trait effect and no verdict "
                "against the persona prompt is given; this model cannot be judged by these probes."
            ]
            + drift_sentences(events)
        )
    trusted = True
    out = []
    if "prompted" in logodds and "prompted_neg" in logodds:
        control = shift(logodds["prompted_neg"], logodds["prompted"], "stance")
        trusted = control.mean >= CONTROL_MIN_NATS and control.z >= 3
        out.append(
            f"Stance control: the pos persona prompt moved the stance by {_said(control)} against the neg one "
            f"(z {control.z:+.1f}); "
            + (
                "the probe sees a stance effect, so its stance numbers below are read as stance."
                if trusted
                else f"it FAILED (needs >= {CONTROL_MIN_NATS:g} nats and z >= 3 in the pos direction), so no stance "
                "number below is trusted, a null least of all; read the wording part."
            )
        )

    def coh(k):
        return "" if _coherence(k, stages) is None or not base_coh else f"{_coherence(k, stages) / base_coh:.3f}"

    if steered:
        k = steered[0]
        st, wd, off = (shift(base, logodds[k], c) for c in ("stance", "wording", "off_axis"))
        out.append(
            f"Steering ({k}) moved the stance by {_said(st)} and the wording by {_said(wd)}, with an off-axis "
            f"shift of {_said(off)}, at {coh(k)} x the base coherence."
        )
    if healed and steered:
        k = healed[-1]
        st = shift(base, logodds[k], "stance")
        wd = shift(base, logodds[k], "wording")
        r_st, (lo, hi) = retain(base, logodds[steered[0]], logodds[k], "stance")
        r_wd, _ = retain(base, logodds[steered[0]], logodds[k], "wording")
        out.append(
            f"After healing ({k}) the stance shift is {_said(st)} (retain {r_st:.2f} [{lo:.2f}, {hi:.2f}] of the "
            f"steered one) and the wording shift {_said(wd)} (retain {r_wd:.2f}), at {coh(k)} x the base coherence."
        )
        if "prompted" in logodds and not trusted:
            out.append(
                "Whether the healed model beats the persona prompt on stance cannot be judged while the control fails."
            )
        elif "prompted" in logodds:
            out.append(prompt_verdict(events, stages, k, st))
    return " ".join(out + drift_sentences(events))


def prompt_verdict(events: list[dict[str, Any]], stages: dict, healed: str, st: Any) -> str:
    """Does the healed model beat the persona prompt, in every wording the run evaluated
    (`prompted`, `prompted_2`, ...)? Beating one wording is not claimed as beating the prompt:
    another wording can reverse the verdict. Each prompt is named."""
    logodds = stages[LOGODDS]
    base = logodds["base"]
    systems = {e["stage"]: e.get("system") for e in events if e["event"] == "eval" and e["round"] < 0}
    wordings = [k for k in logodds if k == "prompted" or (k.startswith("prompted_") and k[9:].isdigit())]
    healed_coh = _coherence(healed, stages)
    parts, beaten, equals = [], [], []
    for k in wordings:
        p = shift(base, logodds[k], "stance")
        prompt_coh = _coherence(k, stages)
        equal = healed_coh is not None and prompt_coh is not None and healed_coh >= prompt_coh
        beaten.append(st.mean > p.mean and not st.noise and equal)
        equals.append(equal)
        named = f' ("{systems[k]}")' if systems.get(k) else ""
        parts.append(f"{_said(p)}{named}{'' if equal else ' at higher coherence than the healed model'}")
    if len(wordings) == 1:
        p = shift(base, logodds["prompted"], "stance")
        return (
            f"The persona prompt moved the stance by {_said(p)}; the healed model "
            f"{'beats' if beaten[0] else 'does not beat'} it {'at equal or better' if equals[0] else 'at lower'} coherence."
        )
    if all(beaten):
        verdict = f"beats all {len(wordings)} wordings at equal or better coherence"
    elif any(beaten):
        verdict = f"beats {sum(beaten)} of the {len(wordings)} wordings, so it is not said to beat the prompt"
    else:
        verdict = f"beats none of the {len(wordings)} wordings"
    return f"The persona prompt, in {len(wordings)} wordings, moved the stance by {'; '.join(parts)}; the healed model {verdict}."


def drift_sentences(events: list[dict[str, Any]]) -> list[str]:
    """The drift line (controls first, then the last round's instruments) and the stop reason."""
    out = []
    neutral = next((e for e in events if e["event"] == "neutral"), None)
    drifts = [e for e in events if e["event"] == "drift"]
    controls = neutral.get("controls") if neutral else None
    if drifts:
        m, r = drifts[-1]["result"]["metrics"], drifts[-1]["round"]
        if controls is None:
            trust = "Its controls were not run, so the AUC is read with care."
        elif controls["passed"]:
            trust = "It passed its controls" + f" ({neutral['verdict'].split(': ', 1)[1]})."
        else:
            trust = f"It FAILED its controls ({neutral['verdict'].split(': ', 1)[1]}), so its AUC is not read as drift."
        out.append(
            f"Drift on held-out neutral prompts after round {r}: NeutralKL {m['kl_rev']:.3g} nats/token "
            f"(reverse; forward {m['kl_fwd']:.3g}), register-shift AUC {m['auc']:.2f} (0.5: the student's text "
            f"cannot be told from the base's), base perplexity of the student's text {m['student_base_ppl']:.1f} "
            f"(of the base's own {m['base_base_ppl']:.1f}). {trust}"
        )
    stop = next((e for e in reversed(events) if e["event"] == "stop"), None)
    if stop is not None:
        out.append(f"The loop stopped: {stop['reason']}.")
    return out


def trajectory(events: list[dict[str, Any]], target: str, path: Path) -> None:
    """Three panels: log-odds shifts per stage (stance, wording, off-axis; 95% CI), 1 -
    coherence per vignette probe (log), and the 7-way target foundation per stage."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = _stages(events)
    vignettes = {k: v for k, v in stages.items() if k != LOGODDS}
    logodds = stages.get(LOGODDS)
    labels = list((logodds or next(iter(vignettes.values()))).keys())
    xs = range(len(labels))
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    if logodds and "base" in logodds:
        for offset, (component, colour) in enumerate(
            (("stance", "#c0392b"), ("wording", "#16a085"), ("off_axis", "#7f8c8d"))
        ):
            shifts = [shift(logodds["base"], logodds[k], component) for k in labels]
            means = [sh.mean for sh in shifts]
            errors = [[sh.mean - sh.ci[0] for sh in shifts], [sh.ci[1] - sh.mean for sh in shifts]]
            positions = [x + (offset - 1) * 0.12 for x in xs]
            axes[0].errorbar(positions, means, yerr=errors, fmt="o", color=colour, label=component, capsize=2)
        axes[0].axhline(0, color="#999999", lw=0.8)
        axes[0].legend(fontsize=8)
        axes[0].set_title("answer log-odds shift vs base (nats, 95% CI)")
    else:
        axes[0].set_title("no answer log-odds probe in this run")
    key = f"{foundation_key(target)}_nats"
    for probe_name, results in vignettes.items():
        ordered = [results.get(k) for k in labels]
        points = [(x, r) for x, r in zip(xs, ordered) if r is not None]
        axes[1].semilogy(
            [x for x, _ in points],
            [max(1 - r.metrics["coherence"], 1e-6) for _, r in points],
            marker="o",
            label=probe_name,
        )
        colours = [_colour(labels[x]) for x, _ in points]
        axes[2].plot([x for x, _ in points], [r.metrics[key] for _, r in points], color="#bbbbbb", zorder=1)
        axes[2].scatter([x for x, _ in points], [r.metrics[key] for _, r in points], c=colours, zorder=2)
    for ax in axes[:3]:
        ax.set_xticks(list(xs), labels, rotation=45, ha="right", fontsize=8)
    drift_panel(events, axes[3])
    axes[1].set_title("1 - coherence (7-way probe; log, lower is better)")
    axes[1].legend(title="probe", fontsize=8)
    axes[2].set_title(f"{target} (7-way probe, nats)")
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=k) for k, c in COLOURS.items()]
    axes[2].legend(handles=handles, fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def drift_panel(events: list[dict[str, Any]], ax: Any) -> None:
    """Register-shift AUC (left axis) and NeutralKL (right axis) per round."""
    drifts = [(e["round"], e["result"]["metrics"]) for e in events if e["event"] == "drift"]
    if not drifts:
        ax.set_title("no drift instruments in this run")
        return
    rounds = [r for r, _ in drifts]
    ax.plot(rounds, [m["auc"] for _, m in drifts], marker="o", color="#8e44ad", label="register AUC")
    ax.axhline(0.5, color="#999999", lw=0.8)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("round")
    ax.set_ylabel("register-shift AUC (0.5 = no shift)")
    other = ax.twinx()
    other.plot(rounds, [m["kl_rev"] for _, m in drifts], marker="s", color="#d35400", label="NeutralKL")
    other.set_ylabel("NeutralKL(student || base), nats/token")
    ax.set_xticks(rounds)
    ax.set_title("drift on held-out neutral prompts")
    ax.legend(loc="upper left", fontsize=8)
    other.legend(loc="lower right", fontsize=8)


def rounds_table(events: list[dict[str, Any]]) -> str:
    lines = [
        "| round | dose | kept | coherence | cos(v_r, v_0) | cos(v_student, v_r) | NeutralKL | register AUC "
        "| student ppl (base) | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in events:
        if e["event"] == "round":
            seconds = sum(e.get("timings", {}).values())
            d = e.get("drift")
            drift = f"{d['kl_rev']:.3g} | {d['auc']:.2f} | {d['student_base_ppl']:.1f}" if d else " |  | "
            lines.append(
                f"| {e['round']} | {e['coeff']:.3g} | {e['n_kept']} | {e['coherence']:.3f} | {e['cos_v0']:.3f} "
                f"| {e['cos_student_teacher']:.3f} | {drift} | {seconds:.0f} |"
            )
    return "\n".join(lines)


def calibrations(events: list[dict[str, Any]]) -> str:
    """One line per round: the filter's calibration (thresholds from the unsteered model's text)."""
    from ..filters import Calibration

    fields = Calibration.__dataclass_fields__
    lines = []
    for e in events:
        if e["event"] == "calibration":
            values = {k: e[k] for k in fields}
            values["n"], values["n_tokens"] = int(values["n"]), int(values["n_tokens"])
            lines.append(f"- round {e['round']}: {Calibration(**values).describe()}")
    return "\n".join(lines) or "- not calibrated (the absolute filter.ppl_tau)"


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
        raise InputError(f"{run_dir}/events.jsonl has no evaluation events yet; nothing to plot")
    target, direction = _axis_target(run_dir)
    tables = stage_tables(events, target, direction)
    said = summary(events)
    out = {
        "stages": atomic_write_text(
            run_dir / "stages.md", f"# Stages ({target}, direction {direction:+d})\n\n{said}\n\n{tables}\n"
        ),
        "report": atomic_write_text(
            run_dir / "report.md",
            f"# Run report: {run_dir.name}\n\n{said}\n\n## Stage tables\n\n{tables}\n\n"
            f"## Rounds\n\n{rounds_table(events)}\n\n## Filter calibration\n\n{calibrations(events)}\n\n"
            f"Time per stage: {time_breakdown(events) or 'not recorded'}\n\n"
            f"## Samples (greedy)\n\n{_samples(events)}\n",
        ),
    }
    trajectory(events, target, run_dir / "trajectory.png")
    out["trajectory"] = run_dir / "trajectory.png"
    return out
