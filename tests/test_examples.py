"""Every script in examples/ runs on the tiny random model with tiny settings.

The scripts default to the embedded SmolLM2-135M; here `--model tiny-llama` and small
counts make each one a smoke test of the public API it shows (seconds each).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

TINY = ["--model", "tiny-llama", "--n-contexts", "8"]
CASES = {
    "steer_side_by_side.py": (TINY + ["--max-new-tokens", "8"], ["unsteered:", "steered (coeff 2)"]),
    "bake_save_load.py": (TINY, ["max |apply - bake|", "restored bit for bit", "saved and reloaded"]),
    "one_round_by_hand.py": (
        TINY
        + [
            "--max-new-tokens",
            "8",
            "--n-keep",
            "4",
            "--epochs",
            "1",
            "--n-items",
            "7",
            "--ppl-tau",
            "1e9",
            "--target",
            "0.01",
        ],
        ["dose:", "heal epoch 1", "| healed |", "| steered |"],
    ),
    "custom_filter_and_regularizer.py": (
        TINY + ["--max-new-tokens", "8", "--min-words", "2", "--n-keep", "4", "--epochs", "1", "--ppl-tau", "1e9"],
        ["adapter_l2.sq_norm", "folded rounds: ['round_000']"],
    ),
    "evaluate_with_and_without.py": (TINY + ["--n-items", "7"], ["steered vs base", "| prompted |", "| steered |"]),
}


def test_every_example_is_tested():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(CASES)


@pytest.mark.parametrize("script", sorted(CASES))
def test_example_runs_on_tiny_model(script, tmp_path):
    args, expected = CASES[script]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    for text in expected:
        assert text in proc.stdout, f"{script}: {text!r} missing from output:\n{proc.stdout[-2000:]}"
    assert "Traceback" not in proc.stderr
