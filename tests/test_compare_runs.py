"""`steer-heal compare` and event sinks (issue 30): a table across runs read from their
events alone, markdown and JSON; sinks get every event and a failing one does not end a run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from runners.cli import main
from steer_heal.errors import InputError, MissingPackage, RunDirError
from steer_heal.run import config as cfg
from steer_heal.run import loop
from steer_heal.run.runlog import RunDir
from steer_heal.run.sinks import mlflow_sink, round_scalars, tensorboard_sink
from steer_heal.run.table import COLUMNS, markdown, run_row, runs_table

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "docs" / "runs" / "demo"
AUTHORITY = ROOT / "docs" / "runs" / "science" / "anchor_authority" / "authority_klrev+a1+c0.1_seed=1"


def test_the_recorded_runs_read_back_as_their_reports_say():
    demo, authority = runs_table([DEMO, AUTHORITY])
    # the demo's report: stance +1.852 [+1.649, +2.061], retain 0.51 [0.46, 0.57], 0.996 x coherence
    assert round(demo["stance"]["mean"], 3) == 1.852 and round(demo["retain"]["mean"], 2) == 0.51
    assert round(demo["coherence"], 3) == 0.996 and demo["rounds"] == 1 and demo["stopped"] is None
    # docs/results.md: authority, anchor, seed 1: 5 rounds, stance +14.56, AUC 0.51, coherence 0.964 x
    assert authority["rounds"] == 5 and round(authority["stance"]["mean"], 2) == 14.56
    assert round(authority["auc"], 2) == 0.51 and round(authority["coherence"], 3) == 0.964
    assert authority["heal"] == "klrev+anchor 1"
    table = markdown([demo, authority])
    assert table.splitlines()[0] == "| " + " | ".join(COLUMNS) + " |" and len(table.splitlines()) == 4


def test_compare_command_prints_markdown_and_json():
    text = CliRunner().invoke(main, ["compare", str(DEMO), str(AUTHORITY)])
    assert text.exit_code == 0 and "| demo | love |" in text.output, text.output
    rows = json.loads(CliRunner().invoke(main, ["compare", "--json", str(DEMO)]).output)
    assert rows[0]["run"] == "demo" and set(COLUMNS) <= set(rows[0])


def test_compare_refuses_what_is_not_a_run(tmp_path):
    with pytest.raises(RunDirError, match="is not a run directory"):
        run_row(tmp_path)
    with pytest.raises(InputError, match="at least one run directory"):
        runs_table([])


@pytest.mark.slow
def test_a_sink_gets_every_event_and_a_failing_one_does_not_end_the_run(tmp_path, caplog):
    config = cfg.resolve("tiny")
    seen, calls = [], {"n": 0}

    def broken(record):
        calls["n"] += 1
        raise RuntimeError("tracker down")

    with RunDir.create(tmp_path / "run", config) as run:
        run.add_sink(seen.append)
        run.add_sink(broken)
        assert loop.run(config, run, progress=False)["stopped"] is None
        logged = run.events()
    assert [e["event"] for e in seen] == [e["event"] for e in logged]  # every event, in order
    assert calls["n"] == 1 and "event sink" in caplog.text and "tracker down" in caplog.text
    scalars = round_scalars(next(e for e in seen if e["event"] == "round"))
    assert {"coeff", "coherence", "drift/auc", "seconds/heal"} <= set(scalars)


def test_sinks_name_the_package_they_need():
    for make, package in ((lambda: tensorboard_sink("tb"), "tensorboard"), (mlflow_sink, "mlflow")):
        try:
            sink = make()
        except MissingPackage as exc:
            assert f"pip install {package}" in str(exc)
            continue
        sink({"event": "round", "round": 0, "coeff": 1.0})  # installed here: it takes a round event
    with pytest.raises(InputError, match="a sink is a callable"):
        RunDir(Path("."), cfg.resolve("tiny")).add_sink("not callable")
