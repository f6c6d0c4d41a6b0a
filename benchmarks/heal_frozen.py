"""A heal's time with the frozen views' log-probs kept per example, against recomputing them.

    PYTHONPATH=. python benchmarks/heal_frozen.py [--layers 30] [--hidden 64] [--repeats 3] [--out FILE]
    PYTHONPATH=. python benchmarks/heal_frozen.py --shape smollm2 --device cuda   # a GPU, bf16, random weights
    PYTHONPATH=. python benchmarks/heal_frozen.py --shape smollm2 --device cuda --arms joint --repeats 0 \
        --profile prof.txt   # where a heal's host time goes: ops by self CPU time, ops a step

The loop's heal at the full preset's size (48 kept completions of 96 tokens, 64 anchor
completions of 48, batch 8, 6 epochs, KLRev to `prev` + the anchor, one folded round
already in the History) on a random Llama of `--layers` x `--hidden` with the tiny test
tokenizer: deep and narrow, so the time is the host's per-forward cost, as on a GPU at
SmolLM2's size (docs/benchmarks.md, "where a loop round's time goes"). Arms alternate
(kept, recomputed, kept, ...) in one process on one thread; each heal reports its seconds
and its frozen forwards (the loop's settings: `split_grads` off, one backward a step). Rule,
written before the first run: report the median of each arm and their ratio; the store is
worth its memory if the ratio is below 0.9.

Two code trees (`--label`, `--arms kept`), one process each, alternating (before, after,
before, after) on one machine:

    for t in before after before after; do PYTHONPATH=trees/$t python benchmarks/heal_frozen.py \
        --arms kept --repeats 2 --label $t; done

Rule for a change between trees, written before its first run (2026-12-07, for the joint
student forward and the direct view switch): report each tree's median heal and the ratio
after / before; a gain if that ratio is below 0.95 and the slowest "after" heal is faster than
the fastest "before" heal; otherwise noise. And for `--arms joint,apart` in one process on a
GPU: `joint_anchor` becomes auto by default (joint on accelerators) if the median joint / apart
is below 0.95 there; it stays false otherwise.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from steer_heal.healing import History
from steer_heal.healing.frozen import FrozenLogprobs
from steer_heal.healing.lora import LoraSettings
from steer_heal.healing.regularizers import Anchor, KLRev
from steer_heal.healing.train import TrainSettings, heal
from steer_heal.models.model import chat_prompt
from steer_heal.models.tiny import tiny_model
from steer_heal.steering.generation import Completion


def texts(tok, n: int, length: int, seed: int) -> list[Completion]:
    rng = random.Random(seed)
    vocab = [i for i in range(tok.vocab_size) if i not in set(tok.all_special_ids)]
    out = []
    for i in range(n):
        prompt = f"Question {seed}-{i}: what would you do?"
        ids = tuple(rng.choice(vocab) for _ in range(length))
        out.append(Completion(prompt, tok.decode(ids), ids, 1.0, "length", None, chat_prompt(tok, prompt)))
    return out


def profiled(hist, tok, trait, regs, lora, anchor, setting: dict, epochs: int, device: str, path: Path) -> None:
    """One heal under the torch profiler; writes the op table and a summary line to `path`."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    train = TrainSettings(epochs=epochs, batch_size=8, lr=2e-4, seed=99, split_grads=False, **setting)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        res = heal(hist, tok, trait, regs, reference="prev", lora=lora, anchor=anchor, train=train)
        if device == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    ops = sum(e.count for e in events if e.key.startswith("aten::"))
    head = (
        f"heal under the profiler: {wall:.2f} s wall, {len(res.steps)} steps, {ops} aten ops "
        f"({ops / len(res.steps):.0f} a step, the frozen views and held-out NLL included)\n"
    )
    table = events.table(sort_by="self_cpu_time_total", row_limit=45, max_name_column_width=60)
    path.write_text(head + table + "\n")
    print(head, end="", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--shape", default=None, help="a shape of benchmarks/gpu/gpu_round_4b.py instead (e.g. smollm2)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--arms",
        default="kept,recomputed",
        help="of kept, recomputed (frozen views every step), joint, apart (kept, the student's trait and anchor "
        "batches in one forward or two; kept leaves it to joint_anchor's default), in this order",
    )
    ap.add_argument("--label", default="", help="a name for this process's rows (e.g. the tree it imported)")
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--profile",
        default=None,
        help="FILE: then one more heal of the first arm under the torch profiler: ops by self CPU time (the host's "
        "cost of dispatching them), their count per step (and the device's time per op on a GPU)",
    )
    args = ap.parse_args()
    arms = [a for a in args.arms.split(",") if a]
    settings = {
        "kept": {},
        "recomputed": {"frozen_cache_gib": 0.0},
        "joint": {"joint_anchor": True},
        "apart": {"joint_anchor": False},
    }
    if not arms or any(a not in settings for a in arms):
        ap.error(f"--arms takes some of {', '.join(settings)}, got {args.arms!r}")
    if args.shape is None:
        torch.set_num_threads(1)
        model, tok = tiny_model("llama", layers=args.layers, hidden=args.hidden)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent / "gpu"))
        from gpu_round_4b import random_model

        from steer_heal.models.tiny import tiny_tokenizer

        dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
        model, tok = random_model(args.shape, args.device, dtype), tiny_tokenizer()
    lora = LoraSettings(r=8, alpha=16, layers=(0.0, 1.0))
    trait, anchor = texts(tok, 48, 96, 0), texts(tok, 64, 48, 1)
    regs = [KLRev(lam=1.0, tau=0.0, agg="rmse"), Anchor(lam=1.0)]
    hist = History(model)
    counted = {"forwards": 0}
    real = FrozenLogprobs.logprobs

    def counting(self, xs, batch):
        before = self.forwards
        out = real(self, xs, batch)
        counted["forwards"] += self.forwards - before
        return out

    FrozenLogprobs.logprobs = counting
    rows = []
    try:
        first = heal(hist, tok, trait, regs, reference="prev", lora=lora, anchor=anchor, train=TrainSettings(epochs=1))
        hist.fold(first)  # the reference `prev` is then a folded round, as from round 1 on
        for repeat in range(args.repeats):
            for arm in arms:
                counted["forwards"] = 0
                # split_grads off, as the loop runs it (run.config's heal.split_grads): one backward a step
                train = TrainSettings(
                    epochs=args.epochs, batch_size=8, lr=2e-4, seed=repeat, split_grads=False, **settings[arm]
                )
                if args.device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                res = heal(hist, tok, trait, regs, reference="prev", lora=lora, anchor=anchor, train=train)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - t0
                row = {"arm": arm, "label": args.label, "repeat": repeat, "seconds": seconds, "steps": len(res.steps)}
                rows.append({**row, **counted})
                print(json.dumps(rows[-1]), flush=True)
        if args.profile:
            profiled(
                hist, tok, trait, regs, lora, anchor, settings[arms[0]], args.epochs, args.device, Path(args.profile)
            )
    finally:
        FrozenLogprobs.logprobs = real
        hist.close()
    median = {a: statistics.median(r["seconds"] for r in rows if r["arm"] == a) for a in arms if args.repeats}
    summary = {
        "label": args.label,
        "model": args.shape or f"llama {args.layers} x {args.hidden}",
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "median_s": median,
        "ratio": median["kept"] / median["recomputed"] if {"kept", "recomputed"} <= set(median) else None,
        "joint_over_apart": median["joint"] / median["apart"] if {"joint", "apart"} <= set(median) else None,
        "rows": rows,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
