"""The project's own data: extraction contexts, persona axes, vignettes, exemplars.

Axes are TOML files (`axes/<name>.toml`); a user file path works wherever a bundled name
does.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..errors import InputError

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
        raise InputError(f"{path} holds no contexts; one user message per line")
    return contexts


def load_neutral_prompts(path: str | Path | None = None) -> list[str]:
    """Held-out neutral user messages for the drift instruments (bundled set by default)."""
    prompts = read_lines(path or data_path("neutral_prompts.txt"))
    if not prompts:
        raise InputError(f"{path} holds no neutral prompts; one user message per line")
    return prompts


def load_anchor_prompts(path: str | Path | None = None) -> list[str]:
    """Neutral user messages whose base completions anchor the heal (bundled set by default)."""
    prompts = read_lines(path or data_path("anchor_prompts.txt"))
    if not prompts:
        raise InputError(f"{path} holds no anchor prompts; one user message per line")
    return prompts


def check_disjoint(name: str, prompts: list[str], others: dict[str, list[str]]) -> None:
    """Refuse, in one line naming both sets, a prompt set that shares a message with another
    (a drift reading on prompts the model trained or was steered on would not be held out)."""
    mine = {p.strip().casefold() for p in prompts}
    for other, texts in others.items():
        shared = sorted(mine & {t.strip().casefold() for t in texts})
        if shared:
            raise InputError(
                f"the {name} prompts share {len(shared)} message(s) with the {other} (e.g. {shared[0][:60]!r}); "
                "use disjoint prompt sets"
            )


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
    eval_prompts: list[str] = field(default_factory=list)  # held-out scenarios (log-odds probe)
    answers: list[dict[str, str]] = field(default_factory=list)  # crossed answer pairs
    off_axis: list[dict[str, str]] = field(default_factory=list)  # off-axis answer pairs (a, b)
    # other wordings of the pos persona: evaluation only (the loop's "beats the persona prompt"
    # must hold against each, since one wording's verdict can reverse under another)
    pos_wordings: list[str] = field(default_factory=list)


def available_axes() -> list[str]:
    return sorted(p.stem for p in data_path("axes").glob("*.toml"))


def axis_path(name_or_path: str | Path) -> Path:
    """The TOML file an axis name or path means (a bundled name: the file inside the package)."""
    path = Path(name_or_path)
    if not path.suffix:
        path = data_path("axes") / f"{name_or_path}.toml"
        if not path.exists():
            raise InputError(
                f"unknown axis {name_or_path!r}; bundled: {', '.join(available_axes())}, or pass a .toml path"
            )
    return path


def load_axis(name_or_path: str | Path) -> Axis:
    """A bundled axis by name (`authority`, `love`) or a user TOML file with the same keys."""
    path = axis_path(name_or_path)
    with open(path, "rb") as f:
        raw = tomllib.load(f)
    missing = [key for key in _REQUIRED if key not in raw]
    if missing:
        raise InputError(f"axis file {path} lacks {', '.join(missing)}")
    known = set(Axis.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise InputError(f"axis file {path}: unknown keys {unknown}; valid keys: {sorted(known)}")
    _check_axis(path, raw)
    if raw["pos"].strip() == raw["neg"].strip():
        raise InputError(f"axis file {path}: pos and neg personas are identical")
    same = [w for w in raw.get("pos_wordings", []) if w.strip() in (raw["pos"].strip(), raw["neg"].strip())]
    if same:
        raise InputError(
            f"axis file {path}: pos_wordings must be other wordings of pos, but {same[0]!r} repeats a persona"
        )
    return Axis(**raw)


_TEXTS = ("name", "pos", "neg", "description", "neutral", "target")
_LISTS = ("prompts", "sample_prompts", "narration_patterns", "eval_prompts", "pos_wordings")
CROSSED_KEYS = ("pos", "neg", "pos_in_neg_words", "neg_in_pos_words")  # one stance pair, both vocabularies
MIN_PAIRS = 4


def _check_axis(path: Path, raw: dict) -> None:
    """Types and lengths of an axis file's keys, each refused in one line naming the file."""
    import re

    for key in _TEXTS:
        if key in raw and not (isinstance(raw[key], str) and raw[key].strip()):
            raise InputError(f"axis file {path}: {key} must be a non-empty string, got {raw[key]!r}")
    for key in _LISTS:
        if key not in raw:
            continue
        value = raw[key]
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            raise InputError(f"axis file {path}: {key} must be a list of non-empty strings, got {value!r}")
    if len(raw["prompts"]) < 2:
        raise InputError(f"axis file {path}: prompts needs at least 2 user messages, got {len(raw['prompts'])}")
    if "direction" in raw and (isinstance(raw["direction"], bool) or raw["direction"] not in (1, -1)):
        raise InputError(
            f"axis file {path}: direction must be 1 or -1 (the sign of the target shift), got {raw['direction']!r}"
        )
    _check_answers(path, raw)
    if "narration_patterns" in raw:
        if not raw["narration_patterns"]:
            raise InputError(f"axis file {path}: narration_patterns is empty; omit the key for the defaults")
        for pattern in raw["narration_patterns"]:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise InputError(
                    f"axis file {path}: narration pattern {pattern!r} is not a regular expression ({exc})"
                ) from None


def _check_answers(path: Path, raw: dict) -> None:
    """The log-odds probe's keys: held-out scenarios disjoint from the pool, >= 4 answer pairs
    each written in both vocabularies, off-axis pairs (a, b)."""
    answers, off = raw.get("answers", []), raw.get("off_axis", [])
    if ("answers" in raw or "off_axis" in raw) and not raw.get("eval_prompts"):
        raise InputError(f"axis file {path}: [[answers]] need eval_prompts, held-out scenarios to score them on")
    if raw.get("eval_prompts") and "answers" not in raw:
        raise InputError(f"axis file {path}: eval_prompts need [[answers]], at least {MIN_PAIRS} crossed pairs")
    overlap = sorted(set(raw.get("eval_prompts", [])) & set(raw["prompts"]))
    if overlap:
        raise InputError(
            f"axis file {path}: eval_prompts must be held out, but {len(overlap)} are also in prompts "
            f"(e.g. {overlap[0][:60]!r})"
        )
    if "answers" in raw:
        if not isinstance(answers, list) or len(answers) < MIN_PAIRS:
            count = len(answers) if isinstance(answers, list) else 0
            raise InputError(f"axis file {path}: needs at least {MIN_PAIRS} [[answers]] pairs, got {count}")
        for i, pair in enumerate(answers):
            if not isinstance(pair, dict) or set(pair) != set(CROSSED_KEYS):
                keys = sorted(pair) if isinstance(pair, dict) else pair
                raise InputError(
                    f"axis file {path}: [[answers]] pair {i + 1} must be crossed, with exactly the keys "
                    f"{', '.join(CROSSED_KEYS)} (each stance in both vocabularies); got {keys}"
                )
            if not all(isinstance(v, str) and v.strip() for v in pair.values()) or len(set(pair.values())) < 4:
                raise InputError(f"axis file {path}: [[answers]] pair {i + 1} needs four different non-empty answers")
    for i, pair in enumerate(off if isinstance(off, list) else [off]):
        if (
            not isinstance(pair, dict)
            or set(pair) != {"a", "b"}
            or not all(isinstance(v, str) and v.strip() for v in pair.values())
        ):
            raise InputError(f"axis file {path}: [[off_axis]] pair {i + 1} needs two non-empty answers a and b")
