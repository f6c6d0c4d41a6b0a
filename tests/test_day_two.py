"""Issue 27, by class: nothing of the user's is deleted or overwritten, a resume never silently
computes something else than the finished rounds did, every number is checked in the dtype it
is used in, and dead ends end in one line. Each class is tested with more than the example
the issue gave."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from runners.cli import main
from steer_heal.errors import ConfigError, InputError, RunDirError
from steer_heal.io import atomic_write_text, check_output, temp_dir
from steer_heal.models.tiny import tiny_model
from steer_heal.run import config as cfg
from steer_heal.run.export import export_merged
from steer_heal.run.runlog import RunDir
from steer_heal.steering.hooks import check_coeff
from steer_heal.steering.vector import SteeringVector

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def refused(result, *needles: str) -> None:
    """Exit non-zero with one error line holding every needle (the device notice aside)."""
    assert result.exit_code != 0, result.output
    lines = [  # click's usage errors add a "Usage:" and a "Try ... --help" line around their one line
        x
        for x in result.output.strip().splitlines()
        if x.strip() and not x.startswith(("steer-heal: ", "Usage: ", "Try '"))
    ]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert all(n in lines[0] for n in needles), lines[0]


def vector(tmp_path: Path) -> Path:
    return SteeringVector({1: torch.ones(64)}, 64, 4, "tiny-llama").save(tmp_path / "v.safetensors")


# ---------------------------------------------------------------- data loss


def test_resume_removes_only_temp_files_it_can_prove_are_its_own(tmp_path):
    run = RunDir.create(tmp_path / "run", cfg.resolve("tiny"))
    run.close()
    root = tmp_path / "run"
    (root / "round_0" / "adapter").mkdir(parents=True)
    (root / "notes").mkdir()
    users = [
        root / ".report.md.previous",  # 8 characters after the dot, as tempfile's suffix
        root / "notes" / ".draft.md.original",
        root / "notes" / ".events.jsonl.steer-heal-tmp-abcd1234",  # our mark, but not a folder we write
        root / "round_0" / ".vector.safetensors.abcd_123",  # the old unmarked pattern: not provably ours
    ]
    for path in users:
        path.write_text("mine")
    ours = [
        root / ".events.jsonl.steer-heal-tmp-abcd1234",
        root / "round_0" / ".vector.safetensors.steer-heal-tmp-x1y2z3_4",
        root / "round_0" / "adapter" / ".adapter_model.safetensors.steer-heal-tmp-aaaaaaaa",
    ]
    for path in ours:
        path.write_bytes(b"half")
    staging = root / "round_0" / "adapter" / ".steer-heal-config-abcdefgh"
    staging.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / ".x.steer-heal-tmp-abcd1234").write_text("not under the run")
    (root / "round_1").symlink_to(outside, target_is_directory=True)  # a link is never followed
    RunDir.resume(root).close()
    assert all(p.exists() for p in users) and (outside / ".x.steer-heal-tmp-abcd1234").exists()
    assert not any(p.exists() for p in ours) and not staging.exists()


def test_atomic_writes_and_staging_folders_carry_the_mark(tmp_path, monkeypatch):
    seen = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (seen.append(Path(a).name), real(a, b))[1])
    atomic_write_text(tmp_path / "x.txt", "hi")
    assert seen and seen[0].startswith(".x.txt.steer-heal-tmp-")
    folder = temp_dir(tmp_path, "export", "out")
    assert folder.name.startswith(".out.steer-heal-export-")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("where", ["itself", "hard link"])
def test_export_gguf_never_overwrites_its_input(tmp_path, where):
    vec = vector(tmp_path)
    data = vec.read_bytes()
    out = {"itself": vec, "hard link": tmp_path / "link.gguf"}[where]
    if where == "hard link":
        os.link(vec, out)
    refused(cli("export", "gguf", "--vector", vec, "--out", out, "--overwrite"), "refusing to write")
    assert vec.read_bytes() == data
    with pytest.raises(InputError, match="would replace the input"):
        check_output(tmp_path, inputs=(vec,))  # a folder holding the input (export merged --out <its parent>)


def test_no_export_writes_inside_a_run_directory(tiny_run, tmp_path):
    round_vector = tiny_run / "round_0" / "vector.safetensors"
    data = round_vector.read_bytes()
    refused(
        cli("export", "gguf", "--vector", round_vector, "--out", round_vector, "--overwrite"),
        "refusing to write",
    )
    refused(
        cli("export", "gguf", "--vector", vector(tmp_path), "--out", tiny_run / "round_0" / "v.gguf"),
        "inside the run directory",
    )
    refused(cli("export", "merged", tiny_run, "--out", tiny_run / "merged"), "inside the run directory")
    refused(cli("export", "adapters", tiny_run, "--out", tiny_run / "round_0" / "x"), "inside the run directory")
    refused(cli("extract", "--model", "tiny-llama", "--out", round_vector), "inside the run directory")
    assert round_vector.read_bytes() == data


def test_outputs_through_a_link_are_refused(tiny_run, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    with pytest.raises(InputError, match="refusing to write through the link"):
        check_output(link)
    refused(cli("export", "merged", tiny_run, "--out", link, "--overwrite"), "link", str(link))
    refused(cli("run", "--preset", "tiny", "--out", link, "--overwrite"), "is a link", str(link))
    assert real.exists() and not any(real.iterdir())


def test_exports_get_the_mode_of_every_other_write(tiny_run, tmp_path):
    out = export_merged(tiny_run, tmp_path / "merged")
    folder_mode, file_mode = 0o755 & ~_umask(), 0o644 & ~_umask()
    assert stat.S_IMODE(out.stat().st_mode) == folder_mode
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {file_mode}


# ---------------------------------------------------------------- silently wrong


def test_resume_refuses_a_hand_edited_config(tiny_run, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_run, copy)
    text = (copy / "config.toml").read_text()
    for old, new in (("lam = 1.0", "lam = 2.0"), ('model = "tiny-llama"', 'model = "tiny-qwen2"')):
        assert old in text
        (copy / "config.toml").write_text(text.replace(old, new, 1))
        with pytest.raises(ConfigError, match="was edited since the run wrote it"):
            RunDir.resume(copy)
        refused(cli("run", "--resume", copy, "--rounds", "3"), "was edited since the run wrote it")
        refused(cli("export", "merged", copy, "--out", tmp_path / "m"), "was edited since the run wrote it")
    (copy / "config.toml").write_text(text)
    RunDir.resume(copy, write=False)  # put back: accepted


def test_resume_refuses_an_axis_file_edited_since_the_run_started(tmp_path):
    axis = tmp_path / "axis.toml"
    axis.write_text((ROOT / "steer_heal" / "data" / "axes" / "authority.toml").read_text())
    config = cfg.resolve("tiny", overrides={"run": {"axis": str(axis)}})
    RunDir.create(tmp_path / "run", config).close()
    RunDir.resume(tmp_path / "run", write=False)
    axis.write_text(axis.read_text().replace("What should I do?", "What would you do?", 1))
    with pytest.raises(ConfigError, match="changed since .* started"):
        RunDir.resume(tmp_path / "run")


def test_resume_options_that_would_be_ignored_are_refused(tiny_run, tmp_path):
    refused(cli("run", "--resume", tiny_run, "--out", tmp_path / "other"), "continues that folder in place")
    refused(cli("run", "--resume", tiny_run, "--overwrite"), "pass one of them")
    import json
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_run, copy)
    with open(copy / "events.jsonl", "a") as f:  # as if a second round had finished
        f.write(json.dumps({"event": "checkpoint", "round": 1, "time": 0.0}) + "\n")
    before = (copy / "config.toml").read_bytes()
    with pytest.raises(ConfigError, match="has finished 2 round.*would run nothing"):
        RunDir.resume(copy, overrides={"run": {"rounds": 1}})
    refused(cli("run", "--resume", copy, "--rounds", "1"), "has finished 2 round")
    assert (copy / "config.toml").read_bytes() == before


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_coefficient_is_checked_in_the_dtype_it_is_added_in(dtype):
    model, _ = tiny_model("llama")
    model = model.to(dtype)
    vec = SteeringVector({1: torch.ones(64)}, 64, 4, "tiny-llama")
    big = {torch.float32: 1e39, torch.bfloat16: 1e39, torch.float16: 1e5}[dtype]
    for manager in (vec.apply, vec.bake):
        if manager == vec.bake and dtype != torch.float32:
            continue  # bake needs a bias flag; the float32 case covers its check
        with pytest.raises(ValueError, match="not finite in"):
            with manager(model, big):
                pass
    assert not any(m._forward_hooks for m in model.modules())


def test_numbers_beyond_their_type_fail_at_validation(tmp_path):
    with pytest.raises(ValueError, match="not finite in float32"):
        check_coeff(1e39)
    for overrides, message in (
        ({"run": {"seed": 2**64}}, "does not fit a 64-bit integer"),
        ({"run": {"seed": 10**17}}, "derives its seeds"),
        ({"heal": {"lam": 1e39}}, "not finite in float32"),
        ({"dose": {"c_max": 5e38}}, "not finite in float32"),
    ):
        with pytest.raises(ConfigError, match=message):
            cfg.resolve("tiny", overrides=overrides)
    refused(cli("run", "--preset", "tiny", "--seed", str(2**70), "--out", tmp_path / "r"), "seed")
    assert not (tmp_path / "r").exists()
    refused(
        cli("export", "gguf", "--vector", vector(tmp_path), "--out", tmp_path / "v.gguf", "--coeff", "1e39"), "1e+39"
    )
    refused(cli("steer", "--vector", vector(tmp_path), "--seed", str(2**64), "--prompt", "hi"), "seed")


@pytest.mark.parametrize("flag", ["--pos", "--neg"])
def test_an_empty_persona_is_refused_not_replaced(tmp_path, flag):
    refused(cli("extract", "--model", "tiny-llama", flag, "", "--out", tmp_path / "v.safetensors"), "persona is empty")
    assert not (tmp_path / "v.safetensors").exists()


# ---------------------------------------------------------------- dead ends


def test_creation_is_all_or_nothing_and_a_lock_only_folder_is_reused(tmp_path, monkeypatch):
    import steer_heal.run.runlog as runlog

    calls = {"n": 0}
    real = runlog.atomic_write_text

    def full_disk(path, text):
        calls["n"] += 1
        if calls["n"] == 2:  # config.toml: the disk fills after the inputs record
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, text)

    monkeypatch.setattr(runlog, "atomic_write_text", full_disk)
    with pytest.raises(OSError):
        RunDir.create(tmp_path / "run", cfg.resolve("tiny"))
    assert not (tmp_path / "run").exists()  # a folder it made goes again
    monkeypatch.setattr(runlog, "atomic_write_text", real)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").write_text("12345\n")  # what an older version left behind
    (tmp_path / "run" / ".config.toml.steer-heal-tmp-abcdefgh").write_text("half")
    RunDir.create(tmp_path / "run", cfg.resolve("tiny")).close()  # ours to reuse, no --overwrite needed
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        ".lock",
        "config.toml",
        "events.jsonl",
        "inputs.json",
    ]


def test_a_folder_with_a_file_of_the_users_is_not_reused(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").write_text("1\n")
    (tmp_path / "run" / "mine.txt").write_text("mine")
    with pytest.raises(RunDirError, match="exists; pass --resume"):
        RunDir.create(tmp_path / "run", cfg.resolve("tiny"))
    assert (tmp_path / "run" / "mine.txt").read_text() == "mine"


def test_python_m_runners_cli_reaches_every_group():
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "runners.cli", "export", "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0 and "gguf" in done.stdout, done.stderr


def test_prompt_plus_new_tokens_beyond_the_context_window_is_refused_with_both_numbers():
    from steer_heal.sampling import Sampling
    from steer_heal.steering.generation import generate

    model, tok = tiny_model("llama")
    with pytest.raises(ValueError, match=r"max_new_tokens is 600: \d+ > the model's context window of 512 tokens"):
        generate(model, tok, ["hi"], sampling=Sampling(max_new_tokens=600))
    refused(
        cli(
            "steer",
            "--vector",
            vector(Path(__import__("tempfile").mkdtemp())),
            "--prompt",
            "hi",
            "--max-new-tokens",
            "600",
        ),
        "context window of 512",
    )


@pytest.mark.parametrize("where", ["generate", "heal"])
def test_out_of_memory_is_one_line_naming_the_setting(monkeypatch, where):
    from steer_heal.errors import OutOfMemory
    from steer_heal.healing.history import History
    from steer_heal.healing.regularizers import NLL
    from steer_heal.healing.train import TrainSettings, heal
    from steer_heal.sampling import Sampling
    from steer_heal.steering.generation import generate

    model, tok = tiny_model("llama")
    made = generate(model, tok, ["hi", "hello there"] * 4, sampling=Sampling(max_new_tokens=6))
    if where == "generate":

        def boom(*args, **kwargs):
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:116] DefaultCPUAllocator: can't allocate memory")

        monkeypatch.setattr(model, "generate", boom)
        with pytest.raises(OutOfMemory, match="lower the batch size .*or max_new_tokens"):
            generate(model, tok, ["hi"], sampling=Sampling(max_new_tokens=4))
        return
    import steer_heal.healing.train as train_module

    def boom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_module, "_step", boom)
    with History(model) as hist, pytest.raises(OutOfMemory, match="heal.batch_size in a run config"):
        heal(hist, tok, made, [NLL()], train=TrainSettings(epochs=1, batch_size=2))
    assert not any(m._forward_hooks for m in model.modules())


def test_sweep_settings_fail_before_the_model_loads(tmp_path, monkeypatch):
    import steer_heal.models.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model loaded before the check"))
    vec = vector(tmp_path)
    refused(cli("sweep", "--vector", vec, "--floor", "0", "--out", tmp_path / "s"), "coherence floor", "(--floor)")
    refused(cli("sweep", "--vector", vec, "--coeffs", "1,2", "--out", tmp_path / "s"), "must include 0")
    refused(cli("sweep", "--vector", vec, "--coeffs", "0,1e39", "--out", tmp_path / "s"), "not finite in float32")
    assert not (tmp_path / "s").exists()


def test_the_report_of_a_random_model_claims_no_effect(tiny_run):
    from steer_heal.run.plot import summary
    from steer_heal.run.runlog import read_events

    text = summary(read_events(tiny_run / "events.jsonl"))
    assert "cannot be judged by these probes" in text
    assert not any(w in text for w in ("sees a stance effect", "beats", "moved the stance"))
    report = (tiny_run / "report.md").read_text() if (tiny_run / "report.md").exists() else text
    assert "sees a stance effect" not in report


def test_messages_suggest_only_options_the_command_has(tiny_run, tmp_path):
    from runners.cli import one_line

    exc = OSError(errno.ENOSPC, "No space left on device", "/x")
    assert "(--out)" in one_line(exc, {"--out"}) and "(--out)" not in one_line(exc, {"--vector"})
    # export merged has no --allow-other-model: the library's hint is dropped there
    result = cli("export", "merged", tiny_run, "--out", tmp_path / "m", "--overwrite")
    assert result.exit_code == 0, result.output


def test_ctrl_c_during_imports_and_sigterm_end_in_one_line(tmp_path):
    import signal
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = (
        "import signal, sys, threading, runners.entry as e\n"
        # as at a terminal: a background or nohup parent leaves SIGINT ignored, and children inherit that
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "import builtins; real = builtins.__import__\n"
        "def slow(name, *a, **k):\n"
        "    if name == 'runners.cli':\n"
        "        print('importing', flush=True); threading.Event().wait()\n"  # until the signal comes
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = slow\n"
        "sys.exit(e.main(['--help']))"
    )
    for sig, word, rc in ((signal.SIGINT, "Aborted", 130), (signal.SIGTERM, "Terminated", 143)):
        proc = subprocess.Popen(
            [sys.executable, "-c", code],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        assert proc.stdout.readline().strip() == "importing"  # the command line's import is under way
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == rc and err.strip() == word, (proc.returncode, err)


def test_a_closed_pipe_is_quiet(tmp_path):
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line (as `| head` after its lines)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "runners", "run", "--preset", "tiny", "--dry-run"],
        stdout=write,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    os.close(write)
    errors = [x for x in done.stderr.splitlines() if not x.startswith("steer-heal: ")]  # the device notice aside
    assert done.returncode == 141 and errors == [], (done.returncode, done.stderr)


def test_every_error_the_library_raises_on_purpose_is_typed():
    """What docs/usage.md promises: every `raise SomeError(...)` in steer_heal/ raises a
    `SteerHealError` (a bare `raise` re-raising what it caught is not one of ours)."""
    import ast
    import importlib
    import typing

    import steer_heal.errors as errors
    from steer_heal.errors import SteerHealError

    untyped = []
    for path in sorted((ROOT / "steer_heal").rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        module = importlib.import_module(name)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name):
                name_ = node.exc.func.id
                cls = getattr(module, name_, None) or getattr(errors, name_, None)  # lazy imports: errors'
                internal = name_.startswith("_") and f"except {name_}" in path.read_text()  # caught where raised
                if callable(cls) and not isinstance(cls, type):  # a factory: typed by what it returns
                    cls = typing.get_type_hints(cls).get("return")
                if not internal and not (isinstance(cls, type) and issubclass(cls, SteerHealError)):
                    untyped.append(f"{path.relative_to(ROOT)}:{node.lineno} {name_}")
    assert untyped == [], untyped


def test_a_run_says_what_it_does_per_stage_and_quiet_silences_it(tmp_path):
    import logging

    loud = cli("run", "--preset", "tiny", "--out", tmp_path / "a")
    assert loud.exit_code == 0, loud.output
    for stage in ("loading tiny-llama", "base: evaluate", "round 0 (of 1): extract", "dose walk", "heal (", "drift"):
        assert "steer-heal: " in loud.output and stage in loud.output, stage
    quiet = cli("--quiet", "run", "--preset", "tiny", "--out", tmp_path / "b")
    assert quiet.exit_code == 0 and "round 0 (of 1)" not in quiet.output, quiet.output
    logging.getLogger("steer_heal").setLevel(logging.INFO)  # the next CliRunner test starts as the CLI does


def test_eval_compares_against_the_plain_model_with_the_log_odds_probe(tmp_path):
    import json

    vec = SteeringVector({1: torch.ones(64)}, 64, 4, "tiny-llama").save(tmp_path / "v.safetensors")
    args = ["eval", "--model", "tiny-llama", "--axis", "authority", "--n-items", "7"]
    text = cli(*args, "--vector", vec, "--coeff", "2")
    assert text.exit_code == 0, text.output
    assert "Against the plain model on 32 held-out authority scenarios: stance" in text.output
    assert "7-way coherence" in text.output and "logodds:" in text.output
    record = json.loads(cli(*args, "--vector", vec, "--coeff", "2", "--json").output.strip().splitlines()[-1])
    assert {"stance", "wording", "off_axis"} == set(record["shifts"]) and record["coeff"] == 2.0
    assert (
        record["shifts"]["stance"]["ci"][0] <= record["shifts"]["stance"]["mean"] <= record["shifts"]["stance"]["ci"][1]
    )
    zero = json.loads(cli(*args, "--vector", vec, "--coeff", "0", "--json").output.strip().splitlines()[-1])
    assert all(x["mean"] == 0.0 for x in zero["shifts"].values())  # coeff 0 == the plain model


def test_steer_and_extract_print_json(tmp_path):
    import json

    out = tmp_path / "v.safetensors"
    done = cli("extract", "--model", "tiny-llama", "--n-contexts", "4", "--out", out, "--json")
    assert done.exit_code == 0, done.output
    record = json.loads(done.output.strip().splitlines()[-1])
    assert record["out"] == str(out) and record["contexts"] == 4 and record["norms"]
    done = cli("steer", "--vector", out, "--prompt", "hi", "--prompt", "yo", "--max-new-tokens", "4", "--json")
    assert done.exit_code == 0, done.output
    rows = json.loads(done.output.strip().splitlines()[-1])["rows"]
    assert [r["prompt"] for r in rows] == ["hi", "yo"] and all({"unsteered", "steered"} <= set(r) for r in rows)


def test_the_gguf_model_hint_is_the_model_type(tmp_path):
    import gguf

    from steer_heal.data import load_contexts

    model, tok = tiny_model("qwen2")
    vec = SteeringVector.from_persona_pair(
        model, tok, "You are warm.", "You are cold.", load_contexts()[:4], layers=[1]
    )
    path = vec.to_gguf(tmp_path / "v.gguf")
    field = gguf.GGUFReader(path).fields["controlvector.model_hint"]
    assert bytes(field.parts[field.data[0]]).decode() == "qwen2" != vec.model_id


def test_sigterm_during_an_export_leaves_no_staging_folder(tiny_run, tmp_path):
    import signal
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = (
        "import sys, threading, runners.entry as e, steer_heal.run.export as x\n"
        "def stuck(*a, **k):\n"
        "    print('saving', flush=True); threading.Event().wait()\n"  # inside the staging folder, until SIGTERM
        "x.History.export_merged = stuck\n"
        f"sys.exit(e.main(['export', 'merged', {str(tiny_run)!r}, '--out', {str(tmp_path / 'merged')!r}]))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path
    )
    assert proc.stdout.readline().strip() == "saving"
    assert [p.name for p in tmp_path.iterdir() if "steer-heal-export" in p.name]  # the staging folder exists now
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == "Terminated", err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither the export nor its staging folder


def test_model_kwargs_reach_from_pretrained(tiny_run, tmp_path):
    from steer_heal.models.loading import load_model

    checkpoint = export_merged(tiny_run, tmp_path / "merged")
    model, _ = load_model(str(checkpoint), attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    with pytest.raises(InputError, match="pass torch_dtype as load_model's own argument"):
        load_model(str(checkpoint), torch_dtype="float32")
    refused(cli("steer", "--vector", vector(tmp_path), "--prompt", "hi", "--model-kwargs", "{nope"), "not JSON")
    done = cli(
        "steer",
        "--vector",
        vector(tmp_path),
        "--model",
        str(checkpoint),
        "--allow-other-model",
        "--prompt",
        "hi",
        "--max-new-tokens",
        "2",
        "--model-kwargs",
        '{"attn_implementation": "eager"}',
        "--json",
    )
    assert done.exit_code == 0, done.output
