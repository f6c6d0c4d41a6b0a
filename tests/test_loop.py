"""The loop on the tiny preset: stages logged, files written, and SIGKILL + resume == uninterrupted."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from steer_heal.run import config as cfg
from steer_heal.run import loop
from steer_heal.run.plot import render
from steer_heal.run.runlog import RunDir, read_events

ROOT = Path(__file__).resolve().parents[1]


def final_numbers(run_dir: Path) -> list:
    """Everything numeric the run decided: dose, kept texts, healed metrics, cosines."""
    out = []
    for e in read_events(run_dir / "events.jsonl"):
        if e["event"] == "eval":
            out.append((e["stage"], e["round"], {k: v["metrics"] for k, v in e["results"].items()}))
        elif e["event"] == "gen":
            out.append(("gen", e["round"], [c["text"] for c in e["completions"]]))
        elif e["event"] == "round":
            out.append(("round", e["round"], e["coeff"], e["coherence"], e["cos_student_teacher"]))
    return out


def config_axis_wording(config) -> str:
    from steer_heal.data import load_axis

    return load_axis(config.run.axis).pos_wordings[0]


@pytest.mark.slow
def test_tiny_run_writes_everything(tmp_path):
    config = cfg.resolve("tiny")
    run = RunDir.create(tmp_path / "run", config)
    result = loop.run(config, run, progress=False)
    assert result["stopped"] is None
    events = run.events()
    stages = [(e["stage"], e["round"]) for e in events if e["event"] == "eval"]
    # prompted_2: the axis's other wording of pos; prompted_neg: the neg persona, the stance control
    assert stages == [
        ("base", -1),
        ("prompted", -1),
        ("prompted_2", -1),
        ("prompted_neg", -1),
        ("steered", 0),
        ("healed", 0),
    ]
    assert next(e for e in events if e.get("stage") == "prompted_2")["system"] == config_axis_wording(config)
    assert [e["round"] for e in events if e["event"] == "checkpoint"] == [-1, 0]
    assert (run.path / "round_0" / "vector.safetensors").exists()
    assert (run.path / "round_0" / "adapter" / "adapter_config.json").exists()
    gen = next(e for e in events if e["event"] == "gen")
    assert all({"keep", "reasons", "scores", "text"} <= set(c) for c in gen["completions"])
    dose = next(e for e in events if e["event"] == "dose")
    assert dose["steering"] == {"operator": "add", "positions": "all"}  # recorded in the run
    assert dose["compiled"] is False and dose["graphs"] == 0  # run.compiled false (the default): eager
    assert dose["speculative"] is False  # dose.speculative auto: sequential off CUDA
    heal_steps = next(e for e in events if e["event"] == "heal")["steps"]
    assert heal_steps and all(s["sft_grad_norm"] is None for s in heal_steps)  # heal.split_grads false: one backward
    files = render(run.path)
    assert "| healed r0 |" in files["stages"].read_text()
    assert files["trajectory"].stat().st_size > 10_000
    assert "round 0: extract" in files["report"].read_text() and "base eval" in files["report"].read_text()


@pytest.mark.slow
@pytest.mark.parametrize("speculative", ["false", "true"])
def test_tiny_run_with_the_calibrated_filter(tmp_path, speculative):
    """The loop's default filter path: calibrated on the base model's own completions, logged,
    and the dose walk's probes say why they passed or failed (calibrated coherence included),
    walked in sequence or speculatively (all candidate probes in one batch)."""
    config = cfg.resolve(
        "tiny",
        overrides={
            "filter": {"calibrate": True, "calibration_n": 8},
            "dose": {"target": 0.125, "coherence_floor": 0.5, "speculative": speculative},
        },
    )
    run = RunDir.create(tmp_path / "run", config)
    loop.run(config, run, progress=False)
    events = run.events()
    calibration = next(e for e in events if e["event"] == "calibration")
    assert calibration["n"] == 8 and calibration["tau"] == pytest.approx(3 * calibration["median_ppl"])
    dose = next(e for e in events if e["event"] == "dose")
    assert dose["speculative"] is (speculative == "true")
    assert all(p["coherence"] is not None and "x unsteered" in p["why"] for p in dose["probes"])
    gen = next(e for e in events if e["event"] == "gen")
    assert gen["report"]["calibration"]["max_share"] == calibration["max_share"]
    assert "round 0: calibrated on 8 unsteered completions" in render(run.path)["report"].read_text()


@pytest.mark.slow
def test_heal_split_grads_logs_both_gradient_norms(tmp_path):
    config = cfg.resolve("tiny", overrides={"heal": {"split_grads": True}})
    run = RunDir.create(tmp_path / "run", config)
    loop.run(config, run, progress=False)
    steps = next(e for e in run.events() if e["event"] == "heal")["steps"]
    assert steps and all(isinstance(s["sft_grad_norm"], float) for s in steps)


def test_coherence_floor_is_relative_to_the_base(tmp_path):
    """floor 1.0 stops exactly when round 0's coherence is below the base's, and says by how much."""
    config = cfg.resolve("tiny", overrides={"run": {"rounds": 2}, "eval": {"coherence_floor": 1.0}})
    run = RunDir.create(tmp_path / "run", config)
    result = loop.run(config, run, progress=False)
    base = loop.base_coherence(run)
    healed = next(e["coherence"] for e in run.events() if e["event"] == "round")
    rounds = [e["round"] for e in run.events() if e["event"] == "round"]
    if healed < base:
        assert (
            rounds == [0]
            and result["stopped"] == f"coherence: {healed:.3f} < 1.0 x base coherence = {base:.3f} after round 0"
        )
    else:
        assert rounds == [0, 1] and (result["stopped"] is None or "after round 1" in result["stopped"])


def _run_cli(args, env, log=None):
    return subprocess.Popen(
        [sys.executable, "-m", "runners.cli", "run", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(log, "w") if log else subprocess.DEVNULL,
    )


def round_files(run_dir: Path) -> dict[str, bytes]:
    """The bytes of every file a round saved (vector and adapter)."""
    return {
        str(p.relative_to(run_dir)): p.read_bytes() for p in sorted((run_dir / "round_0").rglob("*")) if p.is_file()
    }


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "1"}
    reference = tmp_path / "reference"
    assert _run_cli(["--preset", "tiny", "--out", str(reference)], env).wait(timeout=600) == 0
    expected = final_numbers(reference)
    files = round_files(reference)
    assert {"round_0/vector.safetensors", "round_0/adapter/adapter_model.safetensors"} <= set(files)
    # determinism: another process (another hash seed: set orders differ) writes the same bytes
    again = tmp_path / "again"
    assert _run_cli(["--preset", "tiny", "--out", str(again)], {**env, "PYTHONHASHSEED": "2"}).wait(timeout=600) == 0
    assert round_files(again) == files, "two identical runs wrote different vector or adapter bytes"
    # kill after the base stage, mid-collection (after the dose search) and after heal
    for kill_after in ("checkpoint", "dose", "heal"):
        run_dir = tmp_path / f"killed_{kill_after}"
        proc = _run_cli(["--preset", "tiny", "--out", str(run_dir)], env)
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            if any(e["event"] == kill_after for e in read_events(run_dir / "events.jsonl")):
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"run finished before reaching {kill_after!r}; cannot test the kill"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
        assert _run_cli(["--resume", str(run_dir), "--dry-run"], env).wait(timeout=600) == 0
        assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before, "a dry run wrote"
        log = tmp_path / f"resume_{kill_after}.log"
        code = _run_cli(["--resume", str(run_dir)], env, log).wait(timeout=600)
        assert code == 0, f"resume after a kill at {kill_after!r} failed:\n{log.read_text()[-2000:]}"
        assert final_numbers(run_dir) == expected, f"resume after a kill at {kill_after!r} changed the numbers"
        assert round_files(run_dir) == files, f"resume after a kill at {kill_after!r} changed the saved files"


def test_resume_refuses_changed_config(tmp_path):
    from click.testing import CliRunner

    from runners.cli import main

    config = cfg.resolve("tiny")
    RunDir.create(tmp_path / "run", config)
    result = CliRunner().invoke(main, ["run", "--resume", str(tmp_path / "run"), "--preset", "tiny", "--seed", "3"])
    assert result.exit_code == 1
    assert "different config (run.seed: 0 -> 3)" in result.output


def test_run_refuses_existing_out(tmp_path):
    from click.testing import CliRunner

    from runners.cli import main

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "x").write_text("x")
    result = CliRunner().invoke(main, ["run", "--preset", "tiny", "--out", str(tmp_path / "run")])
    assert result.exit_code == 1 and "exists; pass --resume" in result.output


def test_dry_run_prints_config_and_plan():
    from click.testing import CliRunner

    from runners.cli import main

    result = CliRunner().invoke(main, ["run", "--preset", "tiny", "--dry-run", "--lam", "2"])
    assert result.exit_code == 0
    assert "lam = 2.0" in result.output and "# plan:" in result.output


@pytest.mark.slow
def test_disk_failure_mid_round_leaves_the_run_resumable(tmp_path, monkeypatch):
    """A write that fails while round 0 saves its adapter: the run stops with the OS error,
    and resuming redoes round 0 from the base checkpoint, with no duplicated stages."""
    from steer_heal.healing.history import History

    config = cfg.resolve("tiny")
    run = RunDir.create(tmp_path / "run", config)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(History, "save_round", full_disk)
    with pytest.raises(OSError, match="No space left"):
        loop.run(config, run, progress=False)
    assert run.last_checkpoint() == -1
    monkeypatch.undo()
    run.close()  # the failed run's process would be gone: its lock with it
    resumed = RunDir.resume(tmp_path / "run")
    assert loop.run(resumed.config, resumed, progress=False)["stopped"] is None
    events = resumed.events()
    assert [(e["stage"], e["round"]) for e in events if e["event"] == "eval"] == [
        ("base", -1),
        ("prompted", -1),
        ("prompted_2", -1),
        ("prompted_neg", -1),
        ("steered", 0),
        ("healed", 0),
    ]
    assert [e["round"] for e in events if e["event"] == "checkpoint"] == [-1, 0]


@pytest.mark.slow
def test_resume_extends_rounds_and_keeps_a_stopped_run_stopped(tmp_path):
    """On tiny, round 0 ends just below the base coherence, so floor 1.0 stops it. Resuming
    as is stays stopped; a lower floor and more rounds continue; other keys are refused."""
    from click.testing import CliRunner

    from runners.cli import main

    config = cfg.resolve("tiny", overrides={"eval": {"coherence_floor": 1.0}})
    run = RunDir.create(tmp_path / "run", config)
    assert "after round 0" in loop.run(config, run, progress=False)["stopped"]

    again = RunDir.resume(tmp_path / "run", overrides={"run": {"rounds": 2}})
    assert "after round 0" in loop.run(again.config, again, progress=False)["stopped"]  # still stopped
    assert [e["round"] for e in again.events() if e["event"] == "round"] == [0]

    result = CliRunner().invoke(main, ["run", "--resume", str(tmp_path / "run"), "--coherence-floor", "0"])
    assert result.exit_code == 0, result.output
    resumed = RunDir.resume(tmp_path / "run")
    assert resumed.config.run.rounds == 2 and resumed.config.eval.coherence_floor == 0.0  # config.toml rewritten
    assert [e["round"] for e in resumed.events() if e["event"] == "round"] == [0, 1]

    refused = CliRunner().invoke(main, ["run", "--resume", str(tmp_path / "run"), "--lam", "2"])
    assert refused.exit_code == 1 and "heal.lam: 1.0 -> 2.0" in refused.output and "run.rounds" in refused.output


@pytest.mark.slow
def test_a_later_round_without_a_passing_dose_stops_the_loop_with_the_reason(tmp_path, monkeypatch):
    from steer_heal.errors import DoseError

    config = cfg.resolve("tiny", overrides={"run": {"rounds": 3}, "dose": {"confirm": 2}})
    real, calls = loop.walk_dose, []

    def fails_from_round_1(*args, **kwargs):
        assert kwargs["confirm"] == 2  # dose.confirm reaches the walk
        calls.append(1)
        if len(calls) > 1:
            raise DoseError("no dose passes: at c_min=0.25 only 0/4 completions were kept")
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "walk_dose", fails_from_round_1)
    with RunDir.create(tmp_path / "run", config) as run:
        result = loop.run(config, run, progress=False)
        events = run.events()
    assert result["stopped"] == "filter: round 1: no dose passes: at c_min=0.25 only 0/4 completions were kept"
    assert [e["round"] for e in events if e["event"] == "checkpoint"] == [-1, 0]
    assert [e["reason"] for e in events if e["event"] == "stop"] == [result["stopped"]]
    # round 0 failing is a configuration error, not a result: it still raises
    calls.clear()
    calls.append(1)
    with RunDir.create(tmp_path / "again", config) as run, pytest.raises(DoseError):
        loop.run(config, run, progress=False)


def test_heal_settings_reach_the_heal(tmp_path, monkeypatch):
    """`heal.joint_anchor` and `heal.frozen_cache_gib` arrive in the heal's TrainSettings."""
    from steer_heal.healing import TrainSettings

    config = cfg.resolve("tiny", overrides={"heal": {"joint_anchor": "true", "frozen_cache_gib": 0.5}})
    seen = {}

    class Reached(Exception):
        pass

    def capture(*args, **kwargs):
        seen.update(kwargs)
        raise Reached

    monkeypatch.setattr(loop, "heal", capture)
    with RunDir.create(tmp_path / "run", config) as run, pytest.raises(Reached):
        loop.run(config, run, progress=False)
    assert seen["train"].joint_anchor is True and seen["train"].frozen_cache_gib == 0.5
    assert cfg.resolve("tiny").heal.joint_anchor == "auto" and TrainSettings().joint_anchor is None


def test_the_filter_calibrates_on_the_student_when_asked():
    """`filter.calibrate_on = "student"`: the thresholds come from the folded student's own
    unsteered completions, scored under the base model; "base" keeps the base's. Both are
    checked against the calibration computed by hand."""
    from test_history import random_round

    from steer_heal.filters import calibrate
    from steer_heal.steering.generation import generate

    config = cfg.resolve("tiny", overrides={"filter": {"calibrate": True, "calibration_n": 8}})
    s = loop.setup(config)
    try:
        s.history.fold(random_round(s.history, seed=0))
        pool = [s.axis.prompts[i % len(s.axis.prompts)] for i in range(8)]
        seed = 7
        for who in ("base", "student"):
            chosen = cfg.resolve(
                "tiny", overrides={"filter": {"calibrate": True, "calibration_n": 8, "calibrate_on": who}}
            )
            _, got = loop.round_filter(chosen, s, seed)
            if who == "student":
                written = generate(s.model, s.tok, pool, sampling=chosen.generate, seed=seed + 30, progress=False)
            else:
                with s.history.base() as base:
                    written = generate(base, s.tok, pool, sampling=chosen.generate, seed=seed + 30, progress=False)
            expected = calibrate(s.history.base, s.tok, written, k=3.0, tail=chosen.filter.tail)
            assert got.to_dict() == expected.to_dict(), who
        _, base_cal = loop.round_filter(config, s, seed)
        assert base_cal.median_ppl != got.median_ppl  # the student writes other text than the base
    finally:
        s.history.close()
    with pytest.raises(cfg.ConfigError, match=re.escape("filter.calibrate_on must be base|student, got 'prev'")):
        cfg.resolve("tiny", overrides={"filter": {"calibrate_on": "prev"}})
