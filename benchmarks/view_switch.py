"""Seconds a `History` view switch costs on the host (issue 26).

    PYTHONPATH=. python benchmarks/view_switch.py LABEL

A random 30-layer, 64-wide Llama (LoRA rank 8 on every linear of every layer: 210 LoRA
layers; the full preset wraps the middle 60 % of SmolLM2's 30), one thread, with 1 and then 4 folded rounds and an
adapter in training (as inside a heal): 20 times `reference("prev")` and `base()` entered and
left (4 switches each), best of 5. Prints one JSON line. Run it against another tree with
PYTHONPATH pointing at that tree's folder to compare.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from steer_heal.healing.history import History
from steer_heal.healing.lora import LoraSettings
from steer_heal.models.tiny import tiny_model


def main() -> None:
    torch.set_num_threads(1)
    model, _ = tiny_model("llama", layers=30, hidden=64)
    hist = History(model)
    config = LoraSettings(r=8, alpha=16, layers=(0.0, 1.0)).config(model)

    def round_of_zeros():
        with hist.train_adapter(config) as slot:
            return hist.adapter(slot.name)

    out = {"label": sys.argv[1] if len(sys.argv) > 1 else ""}
    for k in (1, 4):
        while len(hist) < k:
            hist.fold(round_of_zeros())
        with hist.train_adapter(config):
            best = float("inf")
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(20):
                    with hist.reference("prev"):
                        pass
                    with hist.base():
                        pass
                best = min(best, (time.perf_counter() - t0) / 80)
        out[f"ms_per_switch_{k}_folded"] = best * 1e3
    hist.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
