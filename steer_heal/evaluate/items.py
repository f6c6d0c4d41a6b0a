"""Vignette items: the bundled set, the public Moral Foundations Vignettes format, subsets.

An item is one short scenario labelled with the moral foundation it violates (one of
`FOUNDATIONS`). Two sources:

- `load_vignettes()`: the project's own set (`steer_heal/data/vignettes.jsonl`, fields
  `id`, `foundation`, `text`), or any JSONL file with those fields;
- `load_mfv(folder)`: the public MFV JSONL layout, two framing files
  (`vignettes_<set>_other_violate.jsonl`, "You see someone ...", and
  `..._self_violate.jsonl`, "You ...") joined by `id`; the label is `foundation_coarse`
  and the `human_<Foundation>` percentages are kept as the human label distribution.

`stratified_subset` draws a seeded subset with every foundation represented in
proportion (largest-remainder allocation), never "the first N": the MFV files are sorted
by foundation. `fingerprint` hashes the items (ids, labels and texts, in order), so two
evaluations can prove they ran on the same set.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..data import data_path
from ..errors import InputError, MissingFile

FOUNDATIONS: tuple[str, ...] = ("Care", "Fairness", "Loyalty", "Authority", "Sanctity", "Liberty", "Social Norms")


def _squash(name: str) -> str:
    return re.sub(r"[^a-z]", "", name.lower())


_BY_SQUASHED = {_squash(f): f for f in FOUNDATIONS}


def canonical_foundation(name: str) -> str:
    """'care', 'Social norms', 'SocialNorms', 'social_norms' -> the canonical spelling."""
    found = _BY_SQUASHED.get(_squash(str(name)))
    if found is None:
        raise InputError(f"unknown foundation {name!r}; use one of: {', '.join(FOUNDATIONS)}")
    return found


def foundation_key(name: str) -> str:
    """The metric key stem: 'Social Norms' -> 'social_norms' (so 'social_norms_nats')."""
    return canonical_foundation(name).lower().replace(" ", "_")


@dataclass(frozen=True)
class Vignette:
    """One scenario and the foundation it violates."""

    id: str
    foundation: str
    text: str
    human: dict[str, float] = field(default_factory=dict)  # MFV: % of raters per foundation

    def __post_init__(self) -> None:
        object.__setattr__(self, "foundation", canonical_foundation(self.foundation))
        if not self.text.strip():
            raise InputError(f"vignette {self.id!r} has empty text")


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) per non-blank line; a bad line names the file and line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{number}: malformed JSON ({exc.msg}); fix or remove that line") from None
            if not isinstance(row, dict):
                raise InputError(f"{path}:{number}: expected a JSON object per line, got {type(row).__name__}")
            rows.append((number, row))
    return rows


def _field(path: Path, number: int, row: dict, key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{path}:{number}: missing or empty string field {key!r}")
    return value


def _parse(path: Path, number: int, row: dict, label_key: str) -> Vignette:
    label = _field(path, number, row, label_key)
    try:
        foundation = canonical_foundation(label)
    except ValueError as exc:
        raise InputError(f"{path}:{number}: {exc}") from None
    human = {}
    for f in FOUNDATIONS:
        key = "human_" + f.replace(" ", "")
        if isinstance(row.get(key), (int, float)):
            human[f] = float(row[key])
    return Vignette(
        id=_field(path, number, row, "id"), foundation=foundation, text=_field(path, number, row, "text"), human=human
    )


def _check_unique(items: Sequence[Vignette], where: str) -> None:
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise InputError(f"{where}: duplicate vignette id {item.id!r}; ids must be unique")
        seen.add(item.id)


def load_vignettes(path: str | Path | None = None) -> list[Vignette]:
    """The bundled vignette set, or a JSONL file with `id`, `foundation`, `text` per line."""
    path = Path(path) if path is not None else data_path("vignettes.jsonl")
    if not path.exists():
        raise MissingFile(f"no vignette file at {path}")
    items = [_parse(path, number, row, "foundation") for number, row in _read_jsonl(path)]
    if not items:
        raise InputError(f"{path} holds no vignettes; one JSON object per line")
    _check_unique(items, str(path))
    return items


def load_mfv(folder: str | Path, framing: str = "other", name: str = "classic") -> list[Vignette]:
    """Moral Foundations Vignettes in the public JSONL layout, labelled by `foundation_coarse`.

    Both framing files are read and joined by `id` (they must hold the same ids with the
    same labels); `framing` picks whose text the items carry: "other" ("You see someone
    ...", third person, the default) or "self" ("You ...").
    """
    if framing not in ("other", "self"):
        raise InputError(f"framing must be 'other' or 'self', got {framing!r}")
    folder = Path(folder)
    paths = {f: folder / f"vignettes_{name}_{f}_violate.jsonl" for f in ("other", "self")}
    for path in paths.values():
        if not path.exists():
            raise MissingFile(f"no MFV file at {path}; expected both *_other_violate and *_self_violate files")
    tables = {}
    for which, path in paths.items():
        items = [_parse(path, number, row, "foundation_coarse") for number, row in _read_jsonl(path)]
        _check_unique(items, str(path))
        tables[which] = {item.id: item for item in items}
    other, self_ = tables["other"], tables["self"]
    if set(other) != set(self_):
        missing = sorted(set(other) ^ set(self_))[:3]
        raise InputError(
            f"MFV framing files in {folder} hold different ids (e.g. {missing}); they must join one to one"
        )
    for key, item in other.items():
        if self_[key].foundation != item.foundation:
            raise InputError(
                f"MFV item {key!r} is {item.foundation} in one framing and {self_[key].foundation} in the other"
            )
    chosen = other if framing == "other" else self_
    items = [chosen[key] for key in other]  # file order of the "other" framing
    if not items:
        raise InputError(f"MFV files in {folder} hold no items")
    return items


def stratified_subset(items: Sequence[Vignette], n: int, seed: int = 0) -> list[Vignette]:
    """A seeded subset of `n` items with each foundation's share kept (largest remainder).

    Within a foundation, items are drawn by a `random.Random(seed)` shuffle; the result
    keeps the input order, so the same (items, n, seed) always gives the same list.
    """
    if not items:
        raise InputError("cannot take a subset of an empty item set")
    if not 1 <= n <= len(items):
        raise InputError(f"subset size must be between 1 and {len(items)}, got {n}")
    groups: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault(item.foundation, []).append(index)
    quota = {f: n * len(idx) / len(items) for f, idx in groups.items()}
    take = {f: int(q) for f, q in quota.items()}
    # ties in the remainder go by foundation order, so the allocation never depends on hashing
    order = sorted(groups, key=lambda f: (-(quota[f] - take[f]), FOUNDATIONS.index(f)))
    for f in order[: n - sum(take.values())]:
        take[f] += 1
    rng = random.Random(seed)
    chosen: list[int] = []
    for f in sorted(groups, key=FOUNDATIONS.index):
        pool = list(groups[f])
        rng.shuffle(pool)
        chosen.extend(pool[: take[f]])
    return [items[i] for i in sorted(chosen)]


def fingerprint(items: Sequence[Vignette]) -> str:
    """A short hash of the item list (ids, labels, texts, in order)."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(json.dumps([item.id, item.foundation, item.text]).encode())
    return digest.hexdigest()[:16]
