import json

import pytest

from steer_heal.run import config as cfg
from steer_heal.run.runlog import RunDir, atomic_write_text, read_events


def test_defaults_and_presets_validate():
    for preset in cfg.PRESETS:
        c = cfg.resolve(preset)
        assert c.run.rounds >= 1
    assert cfg.resolve("quick").run.model == "smollm2-135m"
    assert cfg.resolve("tiny").run.model == "tiny-llama"


def test_toml_round_trip(tmp_path):
    c = cfg.resolve("quick", overrides={"heal": {"lam": 2, "reference": "base"}, "run": {"seed": 3}})
    assert c.heal.lam == 2.0 and isinstance(c.heal.lam, float)
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml(c))
    assert cfg.load(path) == c
    assert cfg.resolve(file=path) == c


def test_unknown_key_lists_valid_keys(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[heal]\nlamda = 1.0\n")
    with pytest.raises(ValueError, match=r"unknown key heal\.lamda; valid keys: reg, lam, tau"):
        cfg.resolve(file=path)
    path.write_text("[healing]\nlam = 1.0\n")
    with pytest.raises(ValueError, match=r"unknown section \[healing\]; valid sections: run, extract"):
        cfg.resolve(file=path)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"heal": {"reference": "last_good"}}, "needs heal.last_good_threshold"),
        ({"heal": {"reference": "teacher"}}, "heal.reference must be prev|base|last_good"),
        ({"heal": {"lam": -1.0}}, "must be >= 0"),
        ({"dose": {"c_min": 2.0, "c_max": 1.0}}, "0 < c_min < c_max"),
        ({"dose": {"target": 1.5}}, r"dose.target must be in \(0, 1\]"),
        ({"heal": {"frozen_cache_gib": -0.5}}, r"heal.frozen_cache_gib must be >= 0 \(0: off\), got -0.5"),
        ({"heal": {"joint_anchor": "yes"}}, "heal.joint_anchor must be auto, true or false, got 'yes'"),
        ({"dose": {"confirm": -1}}, r"dose.confirm is a number of extra probes at c_min \(>= 0\), got -1"),
        ({"run": {"rounds": "three"}}, "run.rounds must be int"),
        ({"generate": {"cuda_graphs": "yes"}}, "generate.cuda_graphs must be bool, got 'yes'"),
        ({"heal": {"lam": float("nan")}}, "must be finite"),
        ({"dose": {"speculative": "yes"}}, "dose.speculative must be auto, true or false, got 'yes'"),
        (
            {"dose": {"speculative": "true"}, "run": {"compiled": "true"}},
            "dose.speculative = true decodes eager .*set run.compiled = false",
        ),
    ],
)
def test_incompatible_options(overrides, message):
    with pytest.raises(ValueError, match=message):
        cfg.resolve("tiny", overrides=overrides)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'huge'; choose from tiny, quick, full"):
        cfg.resolve("huge")


def test_run_dir_refuses_existing_and_resume_checks_config(tmp_path):
    c = cfg.resolve("tiny")
    run = RunDir.create(tmp_path / "run", c)
    run.log("base", -1, scores={"coherence": 0.9})
    with pytest.raises(ValueError, match="exists; pass --resume .* or --overwrite"):
        RunDir.create(tmp_path / "run", c)
    other = cfg.resolve("tiny", overrides={"run": {"seed": 5}})
    with pytest.raises(ValueError, match=r"different config \(run.seed: 0 -> 5\)"):
        RunDir.resume(tmp_path / "run", other)
    assert RunDir.create(tmp_path / "run", c, overwrite=True).events() == []


def test_resume_drops_events_after_last_checkpoint_and_torn_lines(tmp_path):
    run = RunDir.create(tmp_path / "run", cfg.resolve("tiny"))
    run.log("base", -1, scores={"x": float("nan")})
    run.checkpoint(-1)
    run.log("gen", 0, n=3)
    with open(run.events_path, "a") as f:
        f.write('{"event": "heal", "rou')  # killed mid-write
    assert [e["event"] for e in read_events(run.events_path)] == ["base", "checkpoint", "gen"]
    resumed = RunDir.resume(tmp_path / "run")
    assert [e["event"] for e in resumed.events()] == ["base", "checkpoint"]
    assert resumed.last_checkpoint() == -1
    assert resumed.events()[0]["scores"]["x"] == "nan"  # valid JSON, value kept
    json.loads(resumed.events_path.read_text().splitlines()[0])


def test_damaged_middle_line_is_an_error(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text('{"event": "a", "round": 0}\nnot json\n{"event": "b", "round": 0}\n')
    with pytest.raises(ValueError, match="events.jsonl:2 is not valid JSON"):
        read_events(path)


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "hello")
    atomic_write_text(tmp_path / "a.txt", "world")
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]
    assert (tmp_path / "a.txt").read_text() == "world"
