"""Which SDPA backend the loop should run on a GPU: host and GPU time of the loop's three
kinds of work (sampled decoding, a heal step, a prefill evaluation) per backend.

    PYTHONPATH=. python benchmarks/gpu/gpu_attention.py [--model smollm2-135m] [--out OUT]

Backends: torch's default choice, the default without cuDNN attention, and math only; the
model is loaded once (bfloat16, CUDA) and each variant runs twice, interleaved, timed by
wall clock after a synchronize. Decoding: 16 prompts x 96 new tokens, sampled, eager;
heal step: forward + backward of a batch of 4 x 160 tokens; prefill: 32 x 200 tokens.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from steer_heal import generate
from steer_heal.data import load_axis
from steer_heal.models.loading import load_model
from steer_heal.sampling import Sampling

VARIANTS = {
    "default": None,
    "no cudnn": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "math only": [SDPBackend.MATH],
}


@contextmanager
def backend(name: str):
    if VARIANTS[name] is None:
        yield
    else:
        with sdpa_kernel(VARIANTS[name]):
            yield


def seconds(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default="out/gpu_attention")
    args = ap.parse_args()
    model, tok = load_model(args.model, device="cuda", dtype="bfloat16")
    prompts = (load_axis("love").prompts * 4)[:16]
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    train_ids = torch.randint(0, vocab, (4, 160), generator=g).cuda()
    eval_ids = torch.randint(0, vocab, (32, 200), generator=g).cuda()
    params = [p for p in model.parameters()]

    def decode():
        generate(model, tok, prompts, sampling=Sampling(max_new_tokens=96, do_sample=True, batch_size=16), seed=0)

    def heal_step():
        for p in params:
            p.requires_grad_(True)
        loss = model(train_ids, labels=train_ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        for p in params:
            p.requires_grad_(False)

    def prefill():
        with torch.no_grad():
            model(eval_ids)

    work = {"decode 16x96": decode, "heal step 4x160": heal_step, "prefill 32x200": prefill}
    times: dict = {v: {w: [] for w in work} for v in VARIANTS}
    for name in VARIANTS:  # warm-up
        with backend(name):
            for fn in work.values():
                fn()
    for repeat in range(2):
        for name in list(VARIANTS)[repeat:] + list(VARIANTS)[:repeat]:
            with backend(name):
                for w, fn in work.items():
                    times[name][w].append(seconds(fn))
    lines = [f"{torch.cuda.get_device_name(0)}, {args.model}, bfloat16, seconds (two interleaved repeats)", ""]
    lines.append("| backend | " + " | ".join(work) + " |")
    lines.append("|---|" + "---|" * len(work))
    for name in VARIANTS:
        cells = [" / ".join(f"{t:.3f}" for t in times[name][w]) for w in work]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    print("\n".join(lines), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attention.json").write_text(json.dumps(times, indent=1))
    (out / "attention.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
