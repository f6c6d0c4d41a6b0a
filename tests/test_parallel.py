"""Data-parallel runs (`steer_heal.run.parallel`, `steer_heal.shards`): 2 ranks == 1 process.

Three layers. In this process: a `Wide` sharder computes every batch here but asks the loops
for waves of several, so the walk's look-ahead and the collection's waves are checked against
the plain loops. Under `torchrun --standalone --nproc-per-node 2` with the gloo backend on CPU
(tests/helpers/ranks.py): the split of the batches, an error on one rank, and the heal. And
the command line itself: the tiny preset under torchrun against one process, `kill -9` of rank
1 mid-heal, resume under two ranks and in one process.

Equality is bitwise throughout. Every batch is formed, seeded and computed as in one process;
the heal adds the micro-batches' gradients in micro-batch order on every rank; so nothing is
reordered and there is no rounding to allow for. The subprocesses run on one thread each
(OMP_NUM_THREADS=1, what torchrun gives each rank), one process included, so that the rank
count is the only difference between the runs compared: another thread count may split a
matmul's sums differently (tests/tolerance.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_dose import FAST, POOL, KeepBelow

from steer_heal.errors import ConfigError
from steer_heal.filters.dose import _upcoming, collect, walk_dose
from steer_heal.run import config as cfg
from steer_heal.run.parallel import Follower, Launch, local_config
from steer_heal.shards import map_batches, sharded, width
from steer_heal.steering.generation import generate
from steer_heal.steering.vector import SteeringVector

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


class Wide:
    """A sharder of `width` processes that are all this one: every batch computed here, in
    order, but the loops plan for waves of `width` (what they do under a launch)."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.batches = 0

    def map(self, fn, n):
        self.batches += n
        return [fn(b) for b in range(n)]

    def send(self, b, tensors) -> None:
        pass


# ---------------------------------------------------------------- in this process


@pytest.fixture
def steered(llama):
    model, tok = llama
    vec = SteeringVector({1: torch.randn(64, generator=torch.Generator().manual_seed(0))}, hidden_size=64, n_layers=4)
    return model, tok, vec


def test_map_batches_in_one_process_and_nested_batches_stay_local():
    assert map_batches(lambda b: b * 10, 3) == [0, 10, 20] and width() == 1
    wide = Wide(3)
    with sharded(wide):
        assert width() == 3
        inner = map_batches(lambda b: (width(), map_batches(lambda c: c, 2)), 2)
    assert inner == [(1, [0, 1]), (1, [0, 1])]  # inside a batch: one process, nothing spread further
    assert wide.batches == 2 and width() == 1


def test_the_walks_look_ahead_covers_both_outcomes_in_walk_order():
    lo, hi = 0.25, 4.0
    assert _upcoming((0, lo), lo, hi, lo, hi, 3, 1) == [(0, lo)]
    assert _upcoming((0, lo), lo, hi, lo, hi, 3, 3) == [(0, lo), (1, hi), (2, 1.0)]
    # after c_max fails, at step 0 (coefficient 1): both next midpoints, then all four after them
    ahead = _upcoming((2, 1.0), lo, hi, lo, hi, 3, 7)
    assert [k for k, _ in ahead] == [2, 3, 3, 4, 4, 4, 4]
    assert [c for _, c in ahead[1:3]] == pytest.approx([2.0, 0.5])
    assert [c for _, c in ahead[3:]] == pytest.approx([2**1.5, 2**0.5, 2**-0.5, 2**-1.5])
    assert _upcoming((4, 2**1.5), 2.0, hi, lo, hi, 3, 8) == [(4, 2**1.5)]  # the last step: nothing follows
    assert _upcoming((1, hi), lo, hi, lo, hi, 0, 4) == [(1, hi)]  # no bisection steps


@pytest.mark.parametrize("threshold", [0.3, 1.3, 5.0])
def test_walk_and_collect_make_the_same_decisions_at_any_width(steered, threshold):
    model, tok, vec = steered
    kw = dict(c_min=0.25, c_max=4.0, steps=3, probe_size=3, **FAST)
    alone = walk_dose(model, tok, vec, POOL, KeepBelow(threshold), **kw)
    kept = collect(
        model, tok, vec, POOL, KeepBelow(1.5), coeff=1.0, multiples=(1.0, 2.0), n_keep=6, max_batches=5, **FAST
    )
    for n in (2, 3, 5):
        wide = Wide(n)
        with sharded(wide):
            walked = walk_dose(model, tok, vec, POOL, KeepBelow(threshold), **kw)
            assert walked == alone  # probes (coefficients, kept, reports) and the dose
            spread = collect(
                model, tok, vec, POOL, KeepBelow(1.5), coeff=1.0, multiples=(1.0, 2.0), n_keep=6, max_batches=5, **FAST
            )
        assert spread.kept == kept.kept and spread.completions == kept.completions
        assert spread.verdicts == kept.verdicts and spread.report == kept.report
        assert wide.batches >= 2  # the collection computed a whole wave, and kept the batches one process makes


def test_generation_spread_over_batches_equals_one_call(llama):
    model, tok = llama
    from steer_heal.sampling import Sampling

    sampling = Sampling(max_new_tokens=5, do_sample=True, batch_size=2)
    prompts = [f"Tell me about {x}." for x in ("rain", "snow", "wind", "the sea", "a hill")]
    alone = generate(model, tok, prompts, sampling=sampling, seed=4)
    wide = Wide(2)
    with sharded(wide):
        spread = generate(model, tok, prompts, sampling=sampling, seed=4)
    assert spread == alone and wide.batches == 3


def test_a_launch_refuses_what_it_cannot_split():
    where = Launch(rank=0, world=2, local_rank=0, objects=None, peers=[("h", 1), ("h", 2)])
    config = cfg.resolve("tiny")
    assert local_config(config, None) is config
    with pytest.raises(ConfigError, match="device_map splits one model over several GPUs"):
        local_config(cfg.override(config, {"run": {"device_map": "auto"}}), where)
    with pytest.raises(ConfigError, match="spectral keeps its power iteration per process"):
        local_config(cfg.override(config, {"heal": {"reg": "spectral"}}), where)
    assert local_config(config, where).run.device == config.run.device  # no CUDA here: as configured


def test_a_follower_keeps_the_events_rank_0_writes_and_writes_nothing(tmp_path):
    config = cfg.resolve("tiny")
    follower = Follower(tmp_path / "run", config, [{"event": "checkpoint", "round": -1}])
    record = follower.log("round", 0, coherence=torch.tensor(0.5).item(), pair=(1, 2))
    assert record == {"event": "round", "round": 0, "coherence": 0.5, "pair": [1, 2]}  # as JSON has it
    follower.checkpoint(0)
    follower.save_round(0, None, None)
    assert follower.last_checkpoint() == 0 and len(follower.events()) == 3
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- under torchrun (gloo, 2 CPU processes)

slow = pytest.mark.slow  # each starts two Python processes with torch (seconds)


def ranks(case: str, out: Path) -> list[dict]:
    done = subprocess.run(
        [*TORCHRUN, str(ROOT / "tests" / "helpers" / "ranks.py"), case, str(out)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((out / f"rank{k}.json").read_text()) for k in range(2)]


@slow
def test_each_rank_computes_its_share_and_every_rank_gets_every_result(tmp_path):
    zero, one = ranks("map", tmp_path)
    assert zero["ran"] == [0, 2, 4] and one["ran"] == [1, 3]
    assert zero["results"] == one["results"] == [0, 1, 4, 9, 16]
    assert zero["sent"] == one["sent"] == [[2.0, 2.0, 2.0], [11, 11]]  # batch 1's tensors, from rank 1


@slow
def test_an_error_on_one_rank_is_raised_on_every_rank(tmp_path):
    zero, one = ranks("error", tmp_path)
    assert zero == one == {"type": "InputError", "message": "batch 3 cannot be computed"}


@slow
@pytest.mark.parametrize("case", ["heal2", "heal4-joint"])  # -joint: one student forward for trait and anchor
def test_the_heal_spread_over_two_ranks_equals_one_process_bitwise(tmp_path, case):
    zero, one = ranks(case, tmp_path)
    assert zero["spread"] == zero["alone"] == one["spread"]  # every step's NLL, gradient norms, logs
    alone = load_file(tmp_path / "alone.safetensors")
    for rank in (0, 1):
        spread = load_file(tmp_path / f"spread{rank}.safetensors")
        assert spread.keys() == alone.keys()
        assert all(torch.equal(spread[k], alone[k]) for k in alone)
    assert any(s["grad_norm"] > 0 for s in zero["spread"])


# ---------------------------------------------------------------- the command line under torchrun


def steer_heal(*args: str, launch: list[str] | None = None, cwd: Path) -> subprocess.CompletedProcess:
    command = [*launch, "-m", "runners", *args] if launch else [sys.executable, "-m", "runners", *args]
    return subprocess.run(command, env=ENV, capture_output=True, text=True, cwd=cwd, timeout=900)


def outputs(run: Path) -> tuple[list[dict], dict[str, bytes]]:
    """Events without wall-clock fields, and the bytes of every file a round writes."""

    def timeless(x):
        if isinstance(x, dict):
            return {k: timeless(v) for k, v in x.items() if k not in ("time", "seconds", "timings")}
        if isinstance(x, list):
            return [timeless(v) for v in x]
        return x

    events = [timeless(json.loads(line)) for line in (run / "events.jsonl").read_text().splitlines()]
    files = {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.glob("round_*/**/*")) if p.is_file()}
    return events, files


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny preset for two rounds, its heal in 2 micro-batches a step: in one process,
    under torchrun, and under torchrun with rank 1 killed (SIGKILL) at step 2 of round 1's heal."""
    where = tmp_path_factory.mktemp("parallel")
    (where / "c.toml").write_text("[heal]\nbatch_size = 2\ngrad_accum = 2\n")
    args = ["run", "--preset", "tiny", "--config", "c.toml", "--rounds", "2", "--device", "cpu", "--out"]
    one = steer_heal(*args, "one", cwd=where)
    assert one.returncode == 0, one.stderr[-3000:]
    two = steer_heal(*args, "two", launch=TORCHRUN, cwd=where)
    assert two.returncode == 0, two.stderr[-3000:]
    helper = [*TORCHRUN, str(ROOT / "tests" / "helpers" / "die_mid_heal.py"), "1", "1", "2", "--"]
    killed = subprocess.run([*helper, *args, "killed"], env=ENV, capture_output=True, text=True, cwd=where, timeout=900)
    return where, two, killed


@slow
def test_two_ranks_write_what_one_process_writes(runs):
    where, two, _ = runs
    one_events, one_files = outputs(where / "one")
    two_events, two_files = outputs(where / "two")
    assert [e["event"] for e in two_events].count("heal") == 2
    assert two_events == one_events  # metrics, kept completions, dose decisions, heal steps
    assert two_files.keys() == one_files.keys() and len(one_files) >= 4
    assert two_files == one_files  # vectors and adapters, byte for byte
    assert "(2 processes)" in two.stdout and two.stdout.count("run directory:") == 1  # rank 0 speaks


@slow
def test_a_killed_rank_ends_the_run_in_one_line_and_resume_finishes_it(runs):
    where, _, killed = runs
    assert killed.returncode != 0
    lines = [line for line in killed.stderr.splitlines() if "rank 1 (pid" in line]
    assert lines, killed.stderr[-3000:]
    assert "died mid-stage" in lines[0] and "--resume killed" in lines[0]  # the folder as given
    checkpoints = [e["round"] for e in outputs(where / "killed")[0] if e["event"] == "checkpoint"]
    assert checkpoints == [-1, 0]  # round 1 died in its heal: the run keeps round 0
    shutil.copytree(where / "killed", where / "killed_alone")
    again = steer_heal("run", "--resume", "killed", launch=TORCHRUN, cwd=where)
    assert again.returncode == 0, again.stderr[-3000:]
    alone = steer_heal("run", "--resume", "killed_alone", cwd=where)
    assert alone.returncode == 0, alone.stderr[-3000:]
    want = outputs(where / "two")
    assert outputs(where / "killed") == want  # resumed under two ranks
    assert outputs(where / "killed_alone") == want  # resumed in one process


@slow
def test_a_dry_run_under_the_launcher_prints_the_plan_once(tmp_path):
    done = steer_heal("run", "--preset", "tiny", "--dry-run", launch=TORCHRUN, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("# plan:") == 1 and not list(tmp_path.iterdir())


def test_other_commands_refuse_a_launch(tmp_path):
    env = {**ENV, "WORLD_SIZE": "2", "RANK": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "runners", "eval", "--help"], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 2 and "only `steer-heal run` spreads over a launch (2 processes here)" in done.stderr
