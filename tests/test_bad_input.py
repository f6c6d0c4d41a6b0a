"""Bad input, API and command line: every case gets one clear line (asserted here), before
any slow work, and nothing a user types deletes data that is not ours.

`CASES` is also the table of the reliability notes: `python tests/test_bad_input.py` prints
each case with the message it gets.
"""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from runners.cli import main, one_line
from steer_heal.data import load_axis
from steer_heal.errors import DoseError, SteerHealError
from steer_heal.evaluate import AnswerLogOdds, AnswerPair
from steer_heal.filters import Perplexity, calibrate
from steer_heal.filters.dose import collect, walk_dose
from steer_heal.healing.history import Adapter, History
from steer_heal.healing.lora import LoraSettings
from steer_heal.healing.regularizers import NLL
from steer_heal.healing.train import HealDiverged, TrainSettings, heal
from steer_heal.models.loading import load_model
from steer_heal.models.tiny import tiny_model
from steer_heal.run import config as cfg
from steer_heal.run.runlog import RunDir
from steer_heal.sampling import Sampling
from steer_heal.steering.generation import Completion, generate
from steer_heal.steering.vector import SteeringVector

ROOT = Path(__file__).resolve().parents[1]
AXIS = load_axis("authority")


def vector(model_id: str = "tiny-llama", value: float = 1.0) -> SteeringVector:
    return SteeringVector({1: torch.full((64,), value)}, hidden_size=64, n_layers=4, model_id=model_id)


def completions(model, tok, n: int = 8):
    return generate(
        model,
        tok,
        ["hi", "hello there", "tell me a story", "what now?"] * (n // 4),
        sampling=Sampling(max_new_tokens=8),
    )


def axis_file(tmp: Path, **changes) -> Path:
    """The bundled authority axis with some keys changed (None removes a key)."""
    import tomllib

    raw = tomllib.loads((ROOT / "steer_heal" / "data" / "axes" / "authority.toml").read_text())
    raw.update(changes)
    raw = {k: v for k, v in raw.items() if v is not None}

    def toml(value):  # JSON is TOML for strings, numbers and lists; tables need `key = value`
        if isinstance(value, dict):
            return "{" + ", ".join(f"{k} = {toml(v)}" for k, v in value.items()) + "}"
        if isinstance(value, list):
            return "[" + ", ".join(toml(v) for v in value) + "]"
        return json.dumps(value)

    lines = [f"{k} = {toml(v)}" for k, v in raw.items()]
    path = tmp / "axis.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def saved_adapter(tmp: Path) -> Path:
    model, tok = tiny_model("llama")
    result = heal(
        model,
        tok,
        completions(model, tok),
        [NLL()],
        lora=LoraSettings(r=2, alpha=4),
        train=TrainSettings(epochs=1, max_steps=1, val_frac=0.0),
    )
    return result.adapter.save(tmp / "adapter")


def tamper_alpha(tmp: Path) -> Path:
    path = saved_adapter(tmp)
    config = json.loads((path / "adapter_config.json").read_text())
    config["lora_alpha"] = 800
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def truncate(path: Path, keep: int = 40) -> Path:
    path.write_bytes(path.read_bytes()[:keep])
    return path


def nan_vector_file(tmp: Path) -> Path:
    from safetensors.torch import save_file

    good = vector().save(tmp / "v.safetensors")
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as f:
        meta = f.metadata()
    save_file({"layer.1": torch.full((64,), math.nan)}, str(tmp / "nan.safetensors"), metadata=meta)
    return tmp / "nan.safetensors"


def other_safetensors(tmp: Path) -> Path:
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3)}, str(tmp / "w.safetensors"))
    return tmp / "w.safetensors"


def resolve(**sections):
    return lambda tmp: cfg.resolve("tiny", overrides=sections)


def toml_file(tmp: Path, text: str) -> Path:
    path = tmp / "run.toml"
    path.write_text(text)
    return path


def heal_at(lr: float, max_steps: int | None):
    def run(tmp):
        model, tok = tiny_model("llama")
        train = TrainSettings(epochs=3, lr=lr, max_steps=max_steps, val_frac=0.25, batch_size=2)
        heal(model, tok, completions(model, tok), [NLL()], lora=LoraSettings(r=2, alpha=4), train=train)

    return run


def fold_nan(tmp):
    model, tok = tiny_model("llama")
    adapter = Adapter.load(saved_adapter(tmp))
    bad = Adapter(adapter.config, {k: torch.full_like(v, math.nan) for k, v in adapter.state.items()}, adapter.meta)
    History(model).fold(bad)


def perplexity_under_bake(tmp):
    model, tok = tiny_model("llama")
    c = Completion("hi", "hello", (), 0.0, "length", None, "")
    with vector().bake(model, 1.0):
        Perplexity(model, tok)([c])


def overwrite_foreign(tmp):
    folder = tmp / "thesis"
    folder.mkdir()
    (folder / "thesis.txt").write_text("four years of work")
    try:
        RunDir.create(folder, cfg.resolve("tiny"), overwrite=True)
    finally:
        assert (folder / "thesis.txt").read_text() == "four years of work"


def overwrite_cwd(tmp):
    run = RunDir.create(tmp / "run", cfg.resolve("tiny"))
    run.close()
    cwd = os.getcwd()
    os.chdir(tmp / "run")
    try:
        RunDir.create(".", cfg.resolve("tiny"), overwrite=True)
    finally:
        os.chdir(cwd)


def no_config_model(tmp):
    (tmp / "empty").mkdir()
    load_model(str(tmp / "empty"))


def offline_hub_id(tmp):
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        load_model("no-such-org/no-such-model")
    finally:
        del os.environ["HF_HUB_OFFLINE"]


# (case, what to run given a tmp folder, error type, message pattern)
CASES = [
    ("generate: a bare string", lambda t: generate(*tiny_model("llama"), "hello"), ValueError, "not one string"),
    ("Sampling: batch_size 0", lambda t: Sampling(batch_size=0), ValueError, "must be >= 1, got batch_size=0"),
    (
        "Sampling: temperature 0",
        lambda t: Sampling(do_sample=True, temperature=0.0),
        ValueError,
        "temperature must be > 0",
    ),
    ("Sampling: top_p 1.5", lambda t: Sampling(top_p=1.5), ValueError, r"top_p must be in \(0, 1\]"),
    (
        "vector of another model, same shape",
        lambda t: vector().apply(tiny_model("qwen2")[0]).__enter__(),
        SteerHealError,
        "made on model 'tiny-llama' but this model is 'tiny-qwen2'.*--allow-other-model",
    ),
    (
        "vector of another width",
        lambda t: (
            replace(vector(), hidden_size=32, directions={1: torch.ones(32)}).apply(tiny_model("llama")[0]).__enter__()
        ),
        ValueError,
        "hidden size 32",
    ),
    (
        "vector file truncated",
        lambda t: SteeringVector.load(truncate(vector().save(t / "v.safetensors"))),
        SteerHealError,
        "not readable \\(corrupt or truncated.*re-save the vector",
    ),
    (
        "vector file of something else",
        lambda t: SteeringVector.load(other_safetensors(t)),
        SteerHealError,
        "is not a steer_heal vector",
    ),
    ("vector file with NaN", lambda t: SteeringVector.load(nan_vector_file(t)), SteerHealError, "non-finite"),
    (
        "adapter config tampered (lora_alpha 4 -> 800)",
        lambda t: Adapter.load(tamper_alpha(t)),
        SteerHealError,
        "does not match the weights",
    ),
    (
        "adapter config not JSON",
        lambda t: Adapter.load(truncate(saved_adapter(t) / "adapter_config.json", 9).parent),
        SteerHealError,
        "not a readable adapter config",
    ),
    (
        "adapter weights truncated",
        lambda t: Adapter.load(truncate(saved_adapter(t) / "adapter_model.safetensors").parent),
        SteerHealError,
        "corrupt or truncated",
    ),
    (
        "adapter weights missing",
        lambda t: Adapter.load((saved_adapter(t) / "adapter_model.safetensors").unlink() or t / "adapter"),
        FileNotFoundError,
        "not a peft adapter directory",
    ),
    ("fold an adapter with NaN weights", fold_nan, SteerHealError, "non-finite weights"),
    ("heal at lr 1e6 (uniform output)", heal_at(1e6, None), HealDiverged, "heal diverged.*nothing was folded"),
    ("heal at lr 1e30, one step (NaN)", heal_at(1e30, 1), HealDiverged, "heal diverged.*(nan|not finite)"),
    (
        "heal: a float16 model",
        lambda t: heal(
            tiny_model("llama")[0].half(), tiny_model("llama")[1], [Completion("hi", "hello", (5,), 0.0, "length")]
        ),
        ValueError,
        "heal refuses a float16 model",
    ),
    (
        "device: --device cuda without CUDA",
        lambda t: load_model("tiny-llama", device="cuda"),
        ValueError,
        "no CUDA device is visible",
    ),
    (
        "device: an unknown name",
        lambda t: load_model("tiny-llama", device="gpu"),
        ValueError,
        "unknown device 'gpu'; valid: auto, cpu, cuda, cuda:N, mps",
    ),
    (
        "dtype: an unknown name",
        lambda t: load_model("tiny-llama", dtype="float8"),
        ValueError,
        "unknown dtype 'float8'; valid: auto, float32, bfloat16, float16",
    ),
    ("heal: max_nll_rise 0.5", lambda t: TrainSettings(max_nll_rise=0.5), ValueError, "max_nll_rise must be"),
    ("perplexity filter under a baked vector", perplexity_under_bake, ValueError, "baked vector active \\(bias\\)"),
    (
        "walk_dose: c_min >= c_max",
        lambda t: walk_dose(*tiny_model("llama"), vector(), ["a"], lambda cs: [], c_min=2.0, c_max=1.0),
        ValueError,
        "0 < c_min < c_max",
    ),
    (
        "collect: no multiples",
        lambda t: collect(*tiny_model("llama"), vector(), ["a"], lambda cs: [], 1.0, multiples=()),
        ValueError,
        "multiples must be a non-empty list",
    ),
    (
        "axis: prompts is one string",
        lambda t: load_axis(axis_file(t, prompts="one string")),
        ValueError,
        "prompts must be a list of non-empty strings",
    ),
    (
        "axis: direction 'up'",
        lambda t: load_axis(axis_file(t, direction="up")),
        ValueError,
        "direction must be 1 or -1",
    ),
    ("axis: no pos", lambda t: load_axis(axis_file(t, pos=None)), ValueError, "lacks pos"),
    ("axis: one prompt", lambda t: load_axis(axis_file(t, prompts=["only one"])), ValueError, "at least 2"),
    (
        "axis: bad narration regex",
        lambda t: load_axis(axis_file(t, narration_patterns=["(unclosed"])),
        ValueError,
        "not a regular expression",
    ),
    ("axis: unknown key", lambda t: load_axis(axis_file(t, colour="blue")), ValueError, "unknown keys \\['colour'\\]"),
    (
        "axis: answers not crossed",
        lambda t: load_axis(axis_file(t, answers=[{"pos": "a", "neg": "b"}] * 5)),
        ValueError,
        r"axis.toml: \[\[answers\]\] pair 1 must be crossed",
    ),
    (
        "axis: three answer pairs",
        lambda t: load_axis(axis_file(t, answers=AXIS.answers[:3])),
        ValueError,
        r"axis.toml: needs at least 4 \[\[answers\]\] pairs, got 3",
    ),
    (
        "axis: eval_prompts overlap prompts",
        lambda t: load_axis(axis_file(t, eval_prompts=AXIS.eval_prompts[:5] + AXIS.prompts[:1])),
        ValueError,
        "axis.toml: eval_prompts must be held out, but 1 are also in prompts",
    ),
    (
        "logodds: an answer of 0 tokens",
        lambda t: AnswerLogOdds(["a", "b"], [AnswerPair("x", "y", "z", "")] * 4).score(*tiny_model("llama")),
        ValueError,
        "answer '' tokenises to 0 tokens",
    ),
    (
        "filter calibration on 5 completions",
        lambda t: calibrate(tiny_model("llama")[0], None, [Completion("hi", "hello", (), 0.0, "length")] * 5),
        ValueError,
        "needs at least 8 unsteered completions, got 5",
    ),
    ("model: missing local path", lambda t: load_model(str(t / "no" / "model")), SteerHealError, "no model folder at"),
    ("model: folder without config.json", no_config_model, SteerHealError, "has no config.json"),
    ("model: hub id, offline", offline_hub_id, SteerHealError, "HF_HUB_OFFLINE is set"),
    ("config: generate.batch_size -1", resolve(generate={"batch_size": -1}), ValueError, "batch_size=-1"),
    ("config: generate.max_new_tokens 0", resolve(generate={"max_new_tokens": 0}), ValueError, "max_new_tokens=0"),
    ("config: heal.lr -1", resolve(heal={"lr": -1.0}), ValueError, "heal.lr must be > 0"),
    ("config: heal.epochs 0", resolve(heal={"epochs": 0}), ValueError, "heal.epochs must be >= 1"),
    ("config: eval.n_items -1", resolve(eval={"n_items": -1}), ValueError, "eval.n_items must be >= 0"),
    ("config: run.dtype float8", resolve(run={"dtype": "float8"}), ValueError, "run.dtype must be one of"),
    ("config: heal.rank true", resolve(heal={"rank": True}), ValueError, "heal.rank must be int, got True"),
    ("config: extract.layers [0.4, 'a']", resolve(extract={"layers": [0.4, "a"]}), ValueError, "extract.layers"),
    ("config: dose.multiples []", resolve(dose={"multiples": []}), ValueError, "dose.multiples must be a non-empty"),
    (
        "config: last_good_threshold 'x'",
        resolve(heal={"last_good_threshold": "x"}),
        ValueError,
        "last_good_threshold must be float",
    ),
    (
        "config: TOML syntax error",
        lambda t: cfg.resolve("tiny", toml_file(t, "[heal\nlr = 1")),
        ValueError,
        "run.toml is not valid TOML",
    ),
    (
        "config: unknown key",
        lambda t: cfg.resolve("tiny", toml_file(t, "[heal]\nlearning_rate = 1.0\n")),
        ValueError,
        "unknown key heal.learning_rate",
    ),
    (
        "run dir: --overwrite on a folder of something else",
        overwrite_foreign,
        SteerHealError,
        "refusing to delete .*not a steer-heal run directory",
    ),
    ("run dir: --overwrite on the current folder", overwrite_cwd, SteerHealError, "holds the current folder"),
    (
        "run dir: exists, no --overwrite",
        lambda t: (t / "x").mkdir() or (t / "x" / "f").touch() or RunDir.create(t / "x", cfg.resolve("tiny")),
        ValueError,
        "exists; pass --resume",
    ),
    ("run dir: resume a folder that is not a run", lambda t: RunDir.resume(t), ValueError, "not a run directory"),
]


@pytest.mark.parametrize("case, run, error, pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_clear_line(case, run, error, pattern, tmp_path):
    with pytest.raises(error, match=pattern) as info:
        run(tmp_path)
    assert "\n" not in str(info.value).strip(), f"{case}: the message is more than one line"


# ---------------------------------------------------------------- the command line


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def one_line_error(result, pattern: str) -> None:
    import re

    assert result.exit_code != 0, result.output
    # besides the error, only the "steer-heal: <device> in <dtype>" notice may be printed
    lines = [
        line for line in result.output.strip().splitlines() if line.strip() and not line.startswith("steer-heal: ")
    ]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in result.output


def test_cli_steer_refuses_nan_coeff_before_loading(tmp_path):
    path = vector().save(tmp_path / "v.safetensors")
    started = time.perf_counter()
    one_line_error(cli("steer", "--vector", str(path), "--prompt", "hi", "--coeff", "nan"), "coeff must be a finite")
    assert time.perf_counter() - started < 5


def test_cli_steer_refuses_other_model_unless_allowed(tmp_path):
    path = vector().save(tmp_path / "v.safetensors")
    one_line_error(
        cli("steer", "--vector", str(path), "--model", "tiny-qwen2", "--prompt", "hi"), "--allow-other-model"
    )
    ok = cli(
        "steer",
        "--vector",
        str(path),
        "--model",
        "tiny-qwen2",
        "--prompt",
        "hi",
        "--max-new-tokens",
        "2",
        "--allow-other-model",
    )
    assert ok.exit_code == 0, ok.output


def test_cli_steer_refuses_a_vector_wider_than_the_model_before_loading(tmp_path):
    vec = SteeringVector({1: torch.ones(32)}, hidden_size=32, n_layers=4, model_id="tiny-llama")
    one_line_error(
        cli("steer", "--vector", str(vec.save(tmp_path / "v.safetensors")), "--prompt", "hi"), "hidden size 32"
    )


def test_cli_run_toml_syntax_error_names_the_file(tmp_path):
    path = toml_file(tmp_path, "[heal\n")
    one_line_error(cli("run", "--config", str(path), "--dry-run"), "run.toml is not valid TOML")


def test_cli_run_overwrite_never_deletes_a_foreign_folder(tmp_path):
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "thesis.txt").write_text("four years of work")
    one_line_error(cli("run", "--preset", "tiny", "--out", str(folder), "--overwrite"), "refusing to delete")
    one_line_error(
        cli("run", "--preset", "tiny", "--out", str(folder), "--overwrite", "--dry-run"), "refusing to delete"
    )
    assert (folder / "thesis.txt").read_text() == "four years of work"


def test_cli_bad_config_value_creates_nothing(tmp_path):
    one_line_error(cli("run", "--preset", "tiny", "--lam", "-1", "--out", str(tmp_path / "run")), "heal.lam")
    assert not (tmp_path / "run").exists()


def test_cli_eval_tampered_adapter(tmp_path):
    one_line_error(cli("eval", "--model", "tiny-llama", "--adapter", str(tamper_alpha(tmp_path))), "does not match")


@pytest.mark.parametrize(
    "exc, pattern",
    [
        (
            OSError(errno.ENOSPC, "No space left on device", "out/run/events.jsonl"),
            "events.jsonl: No space left.*free some space",
        ),
        (OSError(errno.EROFS, "Read-only file system", "out/run"), "read-only; write elsewhere"),
        (PermissionError(errno.EACCES, "Permission denied", "out/run"), "no permission"),
        (DoseError("no dose passes: at c_min=0.25 only 0/8 kept"), "^no dose passes"),
        (SteerHealError("heal diverged after epoch 1: ..."), "^heal diverged"),
    ],
)
def test_cli_maps_errors_to_one_line(exc, pattern):
    import re

    text = one_line(exc)
    assert "\n" not in text and re.search(pattern, text), text


# ---------------------------------------------------------------- dry runs and locks


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_dry_run_writes_nothing(tmp_path):
    run = RunDir.create(tmp_path / "run", cfg.resolve("tiny"))
    run.log("eval", -1, stage="base", results={})
    run.log("gen", 0)  # after the last checkpoint: a real resume would drop it
    run.close()
    before = snapshot(tmp_path / "run")
    result = cli("run", "--resume", str(tmp_path / "run"), "--rounds", "3", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "rounds = 3" in result.output
    assert snapshot(tmp_path / "run") == before


HOLDER = """
import sys, time
from steer_heal.run import config as cfg
from steer_heal.run.runlog import RunDir
run = RunDir.create(sys.argv[1], cfg.resolve("tiny"))
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_writer_is_refused_with_the_pid_and_a_killed_holder_frees_the_lock(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SteerHealError, match=f"in use by process {holder.pid}"):
            RunDir.resume(tmp_path / "run")
        one_line_error(cli("run", "--resume", str(tmp_path / "run")), f"in use by process {holder.pid}")
        one_line_error(
            cli("run", "--preset", "tiny", "--out", str(tmp_path / "run"), "--overwrite"), "in use by process"
        )
        dry = cli("run", "--resume", str(tmp_path / "run"), "--dry-run")  # read-only: allowed beside a live run
        assert dry.exit_code == 0, dry.output
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / "run" / ".lock").read_text().strip() == str(holder.pid)  # stale file left behind
    resumed = RunDir.resume(tmp_path / "run")  # the kernel dropped the dead process's lock
    assert resumed.writable
    resumed.close()


def test_resume_removes_temp_files_a_killed_writer_left(tmp_path):
    run = RunDir.create(tmp_path / "run", cfg.resolve("tiny"))
    run.close()
    (tmp_path / "run" / "round_0" / "adapter").mkdir(parents=True)
    stale = tmp_path / "run" / "round_0" / "adapter" / ".adapter_model.safetensors.steer-heal-tmp-ab12cd_9"
    stale.write_bytes(b"half")
    keep = tmp_path / "run" / "notes.txt"
    keep.write_text("mine")
    RunDir.resume(tmp_path / "run").close()
    assert not stale.exists() and keep.exists()


def test_saved_files_share_one_mode(tmp_path):
    vec_path = vector().save(tmp_path / "v.safetensors")
    adapter = saved_adapter(tmp_path)
    run = RunDir.create(tmp_path / "run", cfg.resolve("tiny"))
    modes = {
        oct(p.stat().st_mode & 0o777)
        for p in [vec_path, *adapter.iterdir(), run.path / "config.toml", run.path / "events.jsonl"]
    }
    assert len(modes) == 1, modes


if __name__ == "__main__":  # the table for the notes: case | message
    import tempfile

    print("| case | message |\n|---|---|")
    for case, run, _error, _pattern in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                run(Path(tmp))
                message = "(no error)"
            except Exception as exc:  # noqa: BLE001 - printing whatever came
                message = one_line(exc)
        print(f"| {case} | {message.replace('|', '/')} |")
