"""One table across run directories: what `steer-heal compare RUN...` prints.

Per run, from its events alone: the axis, model, heal (regulariser, anchor), the rounds it
finished and why it stopped; the last healed round's stance and wording shifts against the
base (answer log-odds, mean and 95% interval), the stance that heal retained of its own
round's steered shift, its 7-way coherence as a multiple of the base's, and the last round's drift
(register-shift AUC and NeutralKL) where the run logged them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import InputError, RunDirError
from ..evaluate import min_coherence, retain, shift
from ..io import RUN_FILES
from .config import load as load_config
from .plot import LOGODDS, _stages
from .runlog import read_events

COLUMNS = (
    "run",
    "axis",
    "model",
    "heal",
    "rounds",
    "stopped",
    "stance",
    "wording",
    "retain",
    "coherence",
    "auc",
    "kl",
)


def run_row(path: str | os.PathLike) -> dict[str, Any]:
    """The table's row for one run directory (numbers as floats; None where the run has none)."""
    path = Path(path)
    if not (path / "config.toml").is_file() or not any(
        (path / n).is_file() for n in RUN_FILES[1:] + ("events.jsonl.gz",)
    ):
        raise RunDirError(f"{path} is not a run directory (needs {' and '.join(RUN_FILES)})")
    config = load_config(path / "config.toml")
    events = read_events(path / "events.jsonl")
    rounds = [e for e in events if e["event"] == "round"]
    stop = next((e["reason"] for e in reversed(events) if e["event"] == "stop"), None)
    row: dict[str, Any] = {
        "run": path.name,
        "axis": config.run.axis,
        "model": config.run.model,
        "heal": config.heal.reg + ("" if config.heal.anchor == "none" else f"+anchor {config.heal.anchor_lam:g}"),
        "rounds": len(rounds),
        "stopped": stop,
        **{k: None for k in ("stance", "wording", "retain", "coherence", "auc", "kl")},
    }
    if not rounds:
        return row
    last = rounds[-1]["round"]
    stages = _stages(events)
    logodds = stages.get(LOGODDS, {})
    healed, steered = f"healed r{last}", f"steered r{last}"  # retain: what the last heal kept of its own round
    if "base" in logodds and healed in logodds:
        base = logodds["base"]
        for component in ("stance", "wording"):
            s = shift(base, logodds[healed], component)
            row[component] = {"mean": s.mean, "ci": list(s.ci)}
        if steered in logodds:
            value, (lo, hi) = retain(base, logodds[steered], logodds[healed], "stance")
            row["retain"] = {"mean": value, "ci": [lo, hi]}
    base_coh = min_coherence(results["base"] for results in stages.values() if "base" in results)
    healed_coh = min_coherence(results[healed] for results in stages.values() if healed in results)
    if base_coh and healed_coh is not None:
        row["coherence"] = healed_coh / base_coh
    drift = rounds[-1].get("drift")
    if drift:
        row["auc"], row["kl"] = drift["auc"], drift["kl_rev"]
    return row


def runs_table(paths: list[str | os.PathLike]) -> list[dict[str, Any]]:
    if not paths:
        raise InputError("name at least one run directory to compare")
    return [run_row(p) for p in paths]


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table: intervals in brackets, '-' where a run has no number."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, dict):
            return f"{value['mean']:+.2f} [{value['ci'][0]:+.2f}, {value['ci'][1]:+.2f}]"
        if isinstance(value, float):
            return f"{value:.3g}"
        return str(value).replace("|", "/")

    def short(row: dict[str, Any]) -> dict[str, Any]:  # the stop's instrument, not its whole sentence
        stopped = row["stopped"]
        return row | {"stopped": None if stopped is None else stopped.split(":", 1)[0]}

    rows = [short(r) for r in rows]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)
