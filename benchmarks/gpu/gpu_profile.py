"""Where the host time of one loop round goes: the torch profiler and cProfile on a GPU.

    PYTHONPATH=. python benchmarks/gpu/gpu_profile.py --out OUT [--tool torch|cprofile|both] [--compiled false]
    PYTHONPATH=. python benchmarks/gpu/gpu_profile.py --out OUT --tool none [--arms fast+spec,cudnn+seq,...]

The embedded SmolLM2-135M, `--preset full`, one round, `dtype auto` (bfloat16 on CUDA). The base stage runs
once per tool, unprofiled; then round 0 runs on a fresh student under each tool in turn (so
both profile the same work); the profiled rounds run with torch's default attention
backends. `--tool none` times unprofiled rounds instead, one per arm, side by side. Writes:

    OUT/timings.json        seconds per stage for each profiled round (profiler overhead included)
    OUT/torch_ops.txt       aten ops by self CPU time (the host cost of launching and syncing),
                            from a sample of one in `--every` forward-to-forward windows
    OUT/cprofile_self.txt   Python functions by self time (where the interpreter spends the round)
    OUT/cprofile_cum.txt    the same by cumulative time
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time
import warnings
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from steer_heal.models.devices import attention_backends
from steer_heal.run import config as cfg
from steer_heal.run import loop
from steer_heal.run.runlog import RunDir


def round_timings(run: RunDir) -> dict:
    event = next(e for e in run.events() if e["event"] == "round")
    return {**event["timings"], "round": sum(event["timings"].values())}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def profiled_round(config, root: Path, name: str, make_tool, shared_prefix=None) -> tuple[dict, object]:
    """Base stage unprofiled, then round 0 under `make_tool(model)` on a fresh student."""
    s = loop.setup(config)  # a fresh student: every profiled round does round 0's work
    if "logodds" in s.probes:  # None: the probe's device-dependent default
        s.probes["logodds"] = replace(s.probes["logodds"], shared_prefix=shared_prefix)
    tool = make_tool(s.model)
    with RunDir.create(root / name, config) as run:
        loop.base_stage(config, s, run)
        sync()
        t0 = time.perf_counter()
        with tool:
            loop.one_round(config, s, run, 0, None)
            sync()
        return {"wall_s": time.perf_counter() - t0, "stages": round_timings(run)}, tool


class SampledTorchProfile:
    """The torch profiler over one in `every` model forwards: each forward (pre-hook) steps the
    profiler's schedule, so a recorded window runs from one forward to the next and holds
    everything between (sampling, filters, backward, optimiser). Each window is reduced to
    per-op totals as it closes: a whole round (millions of ops) would take far longer to
    post-process than to run. Totals x `every` estimate the round's."""

    def __init__(self, model: torch.nn.Module, every: int) -> None:
        self.model, self.every = model, every
        self.totals: dict[str, list[float]] = {}  # op -> [calls, self CPU us]
        self.windows = 0

    def _reduce(self, prof) -> None:
        self.windows += 1
        for a in prof.key_averages():
            row = self.totals.setdefault(a.key, [0, 0.0])
            row[0] += a.count
            row[1] += a.self_cpu_time_total

    def __enter__(self):
        warnings.filterwarnings("ignore", message=".*(warmup|clears events).*")  # both by design here
        plan = schedule(wait=self.every - 1, warmup=0, active=1)
        self.prof = profile(activities=[ProfilerActivity.CPU], schedule=plan, on_trace_ready=self._reduce)
        self.prof.__enter__()
        self.handle = self.model.register_forward_pre_hook(lambda *_: self.prof.step())

    def __exit__(self, *exc) -> None:
        self.handle.remove()
        self.prof.__exit__(*exc)


class CProfile:
    def __init__(self) -> None:
        self.profiler = cProfile.Profile()

    def __enter__(self):
        self.profiler.enable()

    def __exit__(self, *exc) -> None:
        self.profiler.disable()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/gpu_profile")
    ap.add_argument("--tool", choices=["torch", "cprofile", "both", "none"], default="both")
    ap.add_argument(
        "--arms",
        default="fast+spec+before,fast+spec,fast+spec+before,fast+spec",
        help="with --tool none: rounds side by side, in this order, each the preset changed by its parts. "
        "fast: the loop's attention backends (devices.attention_backends), cudnn: torch's default; spec/seq: "
        "dose.speculative true/false; b16: generate.batch_size 16; nll: heal.reg nll; before: the full preset before the "
        "large-batch evaluations (eval and extract batch 16, log-odds by shared prompt, heal batch 4 at lr 1e-4)",
    )
    ap.add_argument("--compiled", choices=["false", "true"], default="false")
    ap.add_argument("--rows", type=int, default=40)
    ap.add_argument("--every", type=int, default=20, help="the torch profiler records one in this many windows")
    ap.add_argument("--preset", default="full", help="tiny: a CPU smoke test of this script")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = {"run": {"rounds": 1, "device": args.device, "dtype": "auto", "compiled": args.compiled}}
    config = cfg.resolve(args.preset, overrides=overrides)
    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    result: dict = {"card": card, "torch": torch.__version__, "preset": args.preset, "compiled": args.compiled}
    if args.tool == "none":
        for i, arm in enumerate(args.arms.split(",")):
            parts = set(arm.split("+"))
            changes: dict = {"run": overrides["run"], "dose": {"speculative": "true" if "spec" in parts else "false"}}
            if "nll" in parts:
                changes["heal"] = {"reg": "nll"}
            if "b16" in parts:
                changes["generate"] = {"batch_size": 16}
            if "before" in parts:
                changes.update(extract={"batch_size": 16}, eval={"batch_size": 16}, heal={"batch_size": 4, "lr": 1e-4})
            arm_config = cfg.resolve(args.preset, overrides=changes)
            attention = attention_backends(torch.device(args.device)) if "fast" in parts else nullcontext()
            with attention:
                result[f"{i}: {arm}"], _ = profiled_round(
                    arm_config, out / "runs", f"{i}_{arm}", lambda m: nullcontext(), True if "before" in parts else None
                )
            print(arm, json.dumps(result[f"{i}: {arm}"]), flush=True)
            (out / "timings.json").write_text(json.dumps(result, indent=1))
    if args.tool in ("torch", "both"):
        result["torch"], tool = profiled_round(
            config, out / "runs", "torch", lambda model: SampledTorchProfile(model, args.every)
        )
        result["torch"].update(every=args.every, windows=tool.windows)
        ops = sorted(tool.totals.items(), key=lambda kv: kv[1][1], reverse=True)
        total = sum(us for _, (_, us) in ops)
        lines = [
            f"one in {args.every} forward-to-forward windows recorded ({tool.windows}); totals scaled x {args.every}",
            f"total self CPU time of ops (estimated): {total * args.every / 1e6:.2f} s",
            "op | calls | self CPU s | share | per call us",
        ]
        for key, (calls, us) in ops[: args.rows]:
            lines.append(
                f"{key} | {calls * args.every} | {us * args.every / 1e6:.2f} | {us / total:.3f} | {us / max(calls, 1):.1f}"
            )
        (out / "torch_ops.txt").write_text("\n".join(lines) + "\n")
        print("\n".join(lines[:25]), flush=True)
    if args.tool in ("cprofile", "both"):
        result["cprofile"], tool = profiled_round(config, out / "runs", "cprofile", lambda model: CProfile())
        profiler = tool.profiler
        for key, name in (("tottime", "cprofile_self.txt"), ("cumulative", "cprofile_cum.txt")):
            buf = io.StringIO()
            pstats.Stats(profiler, stream=buf).strip_dirs().sort_stats(key).print_stats(args.rows)
            (out / name).write_text(buf.getvalue())
            if key == "tottime":
                print(buf.getvalue()[-6000:], flush=True)
    (out / "timings.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1), flush=True)


if __name__ == "__main__":
    main()
