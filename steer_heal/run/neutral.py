"""A run's neutral text: the base model's own completions of held-out neutral prompts (read by
the drift instruments every round) and of the anchor prompts (read by the heal's `Anchor`).

Both sets are sampled once per run from the base (every adapter off, no steering), seeded from
`run.seed`, and logged as one `neutral` event with the register shift's controls; a resumed run
reads them back from it, and a run that has none yet (made before these existed) gets them made
the same way, from the same seeds, the first time it is resumed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

from ..data import check_disjoint, load_anchor_prompts, load_contexts, load_neutral_prompts
from ..evaluate import DriftControls, NeutralDrift
from ..evaluate.judge import Embedder
from ..steering.generation import Completion, generate
from .config import RunConfig
from .runlog import RunDir

EVENT = "neutral"


def seeds(config: RunConfig) -> dict[str, int]:
    """Seeds of the neutral samples, apart from every round's (round r uses seed*1000 + r*100 + 0..99)."""
    base = config.run.seed * 1000 + 990
    return {"drift_base": base, "drift_student": base + 1, "anchor": base + 2}


def prompt_sets(config: RunConfig, axis: Any) -> tuple[list[str], list[str]]:
    """The neutral and anchor prompts, refused in one line if they share a message with each
    other or with what the model is steered, extracted or probed on."""
    neutral = load_neutral_prompts()
    if config.drift.n_prompts:
        neutral = neutral[: config.drift.n_prompts]
    anchor = load_anchor_prompts()[: config.heal.anchor_n]
    others = {
        f"{axis.name} axis prompts": list(axis.prompts) + list(axis.sample_prompts),
        f"{axis.name} axis eval prompts": list(axis.eval_prompts),
        "extraction contexts": load_contexts(),
    }
    check_disjoint("neutral", neutral, {**others, "anchor prompts": anchor})
    check_disjoint("anchor", anchor, others)
    return neutral, anchor


@dataclass
class Neutral:
    """What the loop reads of the run's neutral text."""

    drift: NeutralDrift | None  # the instruments (None with drift.enabled = false)
    anchor: list[Completion]  # empty unless heal.anchor is on
    controls: DriftControls | None


def neutral_stage(config: RunConfig, s: Any, run: RunDir) -> Neutral:
    """The run's neutral sets and the drift controls: read from the run, else made and logged."""
    neutral_prompts, anchor_prompts = prompt_sets(config, s.axis)
    sampling = replace(config.generate, max_new_tokens=config.drift.max_new_tokens)
    seed = seeds(config)
    logged = next((e for e in run.events() if e["event"] == EVENT), None)
    if logged is not None:
        base = [Completion.from_dict(c) for c in logged["drift_base"]]
        anchor = [Completion.from_dict(c) for c in logged["anchor"]]
        controls = (
            DriftControls(**{k: logged["controls"][k] for k in ("positive_auc", "negative_auc")})
            if logged["controls"]
            else None
        )
    else:
        logging.getLogger("steer_heal").info(
            "neutral text: the base completes %d held-out neutral and %d anchor prompts (once per run)",
            len(neutral_prompts) if config.drift.enabled else 0,
            len(anchor_prompts) if config.heal.anchor != "none" else 0,
        )
        with s.history.base():
            base = _sample(s, neutral_prompts, sampling, seed["drift_base"]) if config.drift.enabled else []
            anchor = _sample(s, anchor_prompts, sampling, seed["anchor"]) if config.heal.anchor != "none" else []
        controls = None
    drift = None
    if config.drift.enabled:
        drift = NeutralDrift(
            neutral_prompts, base, s.history.base, Embedder(), sampling, seed["drift_student"], config.eval.batch_size
        )
        if logged is None and config.drift.controls:
            controls = drift.controls(s.model, s.tok)
    if logged is None:
        run.log(
            EVENT,
            -1,
            drift_base=[c.to_dict() for c in base],
            anchor=[c.to_dict() for c in anchor],
            controls=controls.to_dict() if controls is not None else None,
            verdict=controls.verdict() if controls is not None else "",
        )
    return Neutral(drift, anchor, controls)


def _sample(s: Any, prompts: list[str], sampling: Any, seed: int) -> list[Completion]:
    return generate(s.model, s.tok, prompts, sampling=sampling, seed=seed, progress=False)
