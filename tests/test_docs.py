"""The snippets of README.md and docs/usage.md run as written (on tiny-llama, in seconds).

A random model's text is word salad that the text filters drop, so `default_filter` is
swapped for a refusal-only filter and `calibrate_on_pool` keeps only its model-based part
here; every other call runs as documented.
"""

import re
from pathlib import Path

import pytest

import steer_heal.filters
from steer_heal.filters import AllOf, Calibrated, Refusal

ROOT = Path(__file__).resolve().parent.parent


def snippets(path: Path) -> str:
    """Every ```python block of a page, in order, as one script on the tiny model."""
    blocks = re.findall(r"^```python\n(.*?)^```", path.read_text(encoding="utf-8"), flags=re.S | re.M)
    return "\n".join(blocks).replace('"smollm2-135m"', '"tiny-llama"')


@pytest.mark.parametrize("page", ["README.md", "docs/usage.md"])
def test_documented_snippets_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # they write care.safetensors and round_0/
    monkeypatch.setattr(steer_heal.filters, "default_filter", lambda *args, **kwargs: AllOf(Refusal()))
    real = steer_heal.filters.calibrate_on_pool

    def model_based_only(model, tok, *args, **kwargs):
        _, calibration = real(model, tok, *args, **kwargs)
        return AllOf(Calibrated(model, tok, calibration), Refusal()), calibration

    monkeypatch.setattr(steer_heal.filters, "calibrate_on_pool", model_based_only)
    code = snippets(ROOT / page)
    assert "tiny-llama" in code
    exec(compile(code, page, "exec"), {"__name__": "__docs__"})


def test_usage_reference_sections_are_up_to_date():
    """docs/usage.md's CLI and config tables are generated; regenerate with docs/gen_cli_reference.py."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "gen_cli_reference.py"), "--check"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
