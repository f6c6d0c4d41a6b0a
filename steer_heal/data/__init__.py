"""The project's own data: extraction contexts, persona axes, vignettes, exemplars.

Axes are TOML files (`axes/<name>.toml`); a user file path works wherever a bundled name
does.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

_REQUIRED = ("name", "pos", "neg", "prompts")


def data_path(name: str) -> Path:
    return Path(str(resources.files(__package__).joinpath(name)))


def read_lines(path: str | Path) -> list[str]:
    """Non-empty, stripped lines of a text file ('#' starts a comment line)."""
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def load_contexts(path: str | Path | None = None) -> list[str]:
    """Extraction contexts: short, diverse user messages (bundled set by default)."""
    contexts = read_lines(path or data_path("contexts.txt"))
    if not contexts:
        raise ValueError(f"{path} holds no contexts; one user message per line")
    return contexts


@dataclass(frozen=True)
class Axis:
    """A persona pair and the prompts that let its trait show."""

    name: str
    pos: str
    neg: str
    prompts: list[str]
    description: str = ""
    neutral: str = "You are someone who answers questions helpfully."
    target: str = "Care"
    direction: int = 1
    sample_prompts: list[str] = field(default_factory=list)
    narration_patterns: list[str] | None = None  # None: `Narration` uses its defaults


def available_axes() -> list[str]:
    return sorted(p.stem for p in data_path("axes").glob("*.toml"))


def load_axis(name_or_path: str | Path) -> Axis:
    """A bundled axis by name (`authority`, `love`) or a user TOML file with the same keys."""
    path = Path(name_or_path)
    if not path.suffix:
        path = data_path("axes") / f"{name_or_path}.toml"
        if not path.exists():
            raise ValueError(
                f"unknown axis {name_or_path!r}; bundled: {', '.join(available_axes())}, or pass a .toml path"
            )
    with open(path, "rb") as f:
        raw = tomllib.load(f)
    missing = [key for key in _REQUIRED if key not in raw]
    if missing:
        raise ValueError(f"axis file {path} lacks {', '.join(missing)}")
    known = set(Axis.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"axis file {path}: unknown keys {unknown}; valid keys: {sorted(known)}")
    _check_axis(path, raw)
    if raw["pos"].strip() == raw["neg"].strip():
        raise ValueError(f"axis file {path}: pos and neg personas are identical")
    return Axis(**raw)


_TEXTS = ("name", "pos", "neg", "description", "neutral", "target")
_LISTS = ("prompts", "sample_prompts", "narration_patterns")


def _check_axis(path: Path, raw: dict) -> None:
    """Types and lengths of an axis file's keys, each refused in one line naming the file."""
    import re

    for key in _TEXTS:
        if key in raw and not (isinstance(raw[key], str) and raw[key].strip()):
            raise ValueError(f"axis file {path}: {key} must be a non-empty string, got {raw[key]!r}")
    for key in _LISTS:
        if key not in raw:
            continue
        value = raw[key]
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            raise ValueError(f"axis file {path}: {key} must be a list of non-empty strings, got {value!r}")
    if len(raw["prompts"]) < 2:
        raise ValueError(f"axis file {path}: prompts needs at least 2 user messages, got {len(raw['prompts'])}")
    if "direction" in raw and (isinstance(raw["direction"], bool) or raw["direction"] not in (1, -1)):
        raise ValueError(
            f"axis file {path}: direction must be 1 or -1 (the sign of the target shift), got {raw['direction']!r}"
        )
    if "narration_patterns" in raw:
        if not raw["narration_patterns"]:
            raise ValueError(f"axis file {path}: narration_patterns is empty; omit the key for the defaults")
        for pattern in raw["narration_patterns"]:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(
                    f"axis file {path}: narration pattern {pattern!r} is not a regular expression ({exc})"
                ) from None
