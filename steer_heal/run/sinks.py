"""Event sinks: stream a run's events to the experiment tracker you already run.

`run_dir.add_sink(sink)` calls `sink(record)` after every event is on disk (`RunDir.log`).
A sink is any callable taking the event dict; the two here turn each finished round's
numbers (dose, kept, coherence, cosines, drift) into scalars at step = round:

    run_dir.add_sink(tensorboard_sink("tb/"))   # needs `tensorboard` installed
    run_dir.add_sink(mlflow_sink())             # needs `mlflow`, logs to the active run

Neither package is a dependency; a missing one is one line naming what to install.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import MissingPackage


def round_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a `round` event worth plotting against the round (others: empty)."""
    if record.get("event") != "round":
        return {}
    out = {
        k: float(record[k]) for k in ("coeff", "n_kept", "coherence", "cos_v0", "cos_student_teacher") if k in record
    }
    for key, value in (record.get("drift") or {}).items():
        out[f"drift/{key}"] = float(value)
    for stage, seconds in (record.get("timings") or {}).items():
        out[f"seconds/{stage}"] = float(seconds)
    return out


def tensorboard_sink(logdir: str) -> Callable[[dict[str, Any]], None]:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise MissingPackage("the TensorBoard sink needs tensorboard: pip install tensorboard") from None
    writer = SummaryWriter(logdir)

    def sink(record: dict[str, Any]) -> None:
        for key, value in round_scalars(record).items():
            writer.add_scalar(key, value, global_step=record["round"])
        if record.get("event") == "stop":
            writer.add_text("stop", record.get("reason", ""), global_step=record["round"])
        writer.flush()

    return sink


def mlflow_sink() -> Callable[[dict[str, Any]], None]:
    try:
        import mlflow
    except ImportError:
        raise MissingPackage("the MLflow sink needs mlflow: pip install mlflow") from None

    def sink(record: dict[str, Any]) -> None:
        scalars = {k.replace("/", "."): v for k, v in round_scalars(record).items()}
        if scalars:
            mlflow.log_metrics(scalars, step=record["round"])
        if record.get("event") == "stop":
            mlflow.set_tag("steer_heal.stop", record.get("reason", ""))

    return sink
