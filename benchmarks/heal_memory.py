"""Wall time and peak memory of one heal on the embedded SmolLM2-135M (CPU): KLRev vs NLL.

A script, not a test. Each configuration runs in its own process, so peak RSS is not
shared between them:

    python benchmarks/heal_memory.py compare --epochs 6 --threads 2     # both, one table
    python benchmarks/heal_memory.py run --reg klrev --epochs 1          # one, JSON line

The completions are synthetic: 48 `Completion` records whose 128 completion tokens are
windows of plain English prose (tokenised with the model's tokenizer), behind 12 rotating
user prompts in the chat template, each ending with a stop (so the end-of-turn token is
appended: 129 targets). Settings: LoraSettings() defaults (r=32, alpha=64, layers at
20%-80% of depth, every linear), TrainSettings(batch_size=4, epochs=E), i.e. 42 train +
6 validation completions, 11 optimiser steps per epoch.

Memory is reported three ways: the process's peak RSS (`ru_maxrss`, includes loading the
model), the RSS just before the heal, and the peak RSS sampled every 5 ms during the heal
(its increment over the pre-heal RSS is the heal's own cost).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time

import torch

PROSE = (
    "When the order came down to skip the safety inspection, the nurse on the night shift "
    "hesitated. She knew the schedule mattered to the manager, and she knew the rules were "
    "written by people who had thought about them longer than she had. But the patient in "
    "room twelve was struggling to breathe, and the inspection existed for exactly this kind "
    "of night. She called the doctor, logged the delay, and explained her reasons in plain "
    "words. Later the manager asked why she had not followed the instruction. She answered "
    "that instructions are there to protect people, and when an instruction stops doing that, "
    "someone has to say so out loud. The teacher down the hall had faced something similar "
    "the week before, when a parent demanded that a struggling student be moved without a "
    "conversation. He listened, asked questions, and then sat down with the student first. "
    "Most of the time the careful path and the obedient path are the same path. The hard "
    "cases are the ones where they split, and in those cases it helps to ask who gets hurt, "
    "who gets helped, and whether the people giving the orders would still give them if they "
    "could see what you can see from where you are standing right now. "
)
PROMPTS = [
    "My manager told me to skip the safety check. What should I do?",
    "The rules say one thing, but my friend needs help. How do I decide?",
    "Should I report a colleague who cut corners to meet a deadline?",
    "A parent wants me to move a student without talking to them first. Thoughts?",
    "How do I push back on an order I think is harmful?",
    "Is it ever right to break a workplace rule?",
    "My coach wants us to play through injuries. What do you think?",
    "What would you do if your boss asked you to hide a mistake?",
    "How should a nurse handle an instruction that seems unsafe?",
    "When is loyalty to a team less important than someone's wellbeing?",
    "Tell me how to raise a concern without getting fired.",
    "What matters more, following procedure or helping the person in front of you?",
]


def synthetic_completions(tok, n: int, tokens: int):
    from steer_heal.models.model import chat_prompt, encode
    from steer_heal.steering.generation import Completion

    stream = encode(tok, PROSE * 8)
    out = []
    for i in range(n):
        start = (i * 53) % (len(stream) - tokens)
        ids = tuple(stream[start : start + tokens])
        prompt = PROMPTS[i % len(PROMPTS)]
        out.append(Completion(prompt, tok.decode(ids), ids, 1.0, "stop", None, chat_prompt(tok, prompt)))
    return out


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakSampler:
    """Samples this process's RSS every few ms on a thread (torch ops release the GIL)."""

    def __init__(self, every: float = 0.005) -> None:
        self.every, self.peak, self._stop = every, _rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mb())
            self._stop.wait(self.every)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def run(args) -> dict:
    from steer_heal import load_model
    from steer_heal.healing.regularizers import NLL, KLRev
    from steer_heal.healing.train import LoraSettings, TrainSettings, heal

    torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2-135m")
    comps = synthetic_completions(tok, args.n, args.tokens)
    reg = NLL() if args.reg == "nll" else KLRev(lam=1.0, tau=args.tau, agg="rmse")
    train = TrainSettings(epochs=args.epochs, batch_size=args.batch, max_steps=args.max_steps)
    before = _rss_mb()
    started = time.perf_counter()
    with PeakSampler() as sampler:
        res = heal(model, tok, comps, [reg], reference="prev", lora=LoraSettings(), train=train, progress=False)
    wall = time.perf_counter() - started
    steps = res.steps
    return {
        "reg": reg.name,
        "tau": args.tau if args.reg != "nll" else None,
        "epochs": args.epochs,
        "steps": len(steps),
        "wall_s": round(wall, 1),
        "s_per_step": round(wall / len(steps), 2),
        "rss_before_heal_mb": round(before, 1),
        "peak_rss_during_heal_mb": round(sampler.peak, 1),
        "heal_increment_mb": round(sampler.peak - before, 1),
        "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "nll_first_last": [round(steps[0].nll, 4), round(steps[-1].nll, 4)],
        "val_nll": [res.val_nll_start] + [e.val_nll for e in res.epochs],
        "divergence_max": max((s.divergence or 0.0) for s in steps),
        "barrier_active_steps": sum(1 for s in steps if (s.barrier_grad_norm or 0.0) > 0),
        "threads": args.threads,
        "loadavg": os.getloadavg()[0],
    }


def compare(args) -> None:
    rows = []
    for reg, tau in (("nll", args.tau), ("klrev", args.tau)):
        cmd = [
            sys.executable,
            __file__,
            "run",
            "--reg",
            reg,
            "--tau",
            str(tau),
            "--epochs",
            str(args.epochs),
            "--threads",
            str(args.threads),
            "--n",
            str(args.n),
            "--tokens",
            str(args.tokens),
            "--batch",
            str(args.batch),
        ]
        if args.max_steps:
            cmd += ["--max-steps", str(args.max_steps)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
        print(out, flush=True)
    nll, kl = rows
    print(
        "| run | steps | wall s | s/step | RSS before heal MB | peak RSS in heal MB | heal increment MB | ru_maxrss MB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['reg']} | {row['steps']} | {row['wall_s']} | {row['s_per_step']} | {row['rss_before_heal_mb']} | "
            f"{row['peak_rss_during_heal_mb']} | {row['heal_increment_mb']} | {row['ru_maxrss_mb']} |"
        )
    print(
        f"peak RSS ratio klrev/nll: {kl['peak_rss_during_heal_mb'] / nll['peak_rss_during_heal_mb']:.3f} "
        f"(ru_maxrss {kl['ru_maxrss_mb'] / nll['ru_maxrss_mb']:.3f}); "
        f"heal increment ratio {kl['heal_increment_mb'] / max(nll['heal_increment_mb'], 1e-9):.2f}; "
        f"time ratio {kl['wall_s'] / nll['wall_s']:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["run", "compare"])
    parser.add_argument("--reg", choices=["nll", "klrev"], default="klrev")
    parser.add_argument("--tau", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.mode == "run":
        print(json.dumps(run(args)), flush=True)
    else:
        compare(args)


if __name__ == "__main__":
    main()
