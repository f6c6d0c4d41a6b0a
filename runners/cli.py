"""`steer-heal`: extract, steer, run, eval, plot. Each command parses options and calls the library."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import click

from steer_heal.errors import SteerHealError
from steer_heal.run.config import PRESETS
from steer_heal.vocab import (
    Aggregation,
    AnchorName,
    ItemSet,
    PairMethod,
    Reference,
    RegName,
    SteerHow,
    choices,
)

from .options import device_options, model_kwargs, parse_layers, placement, side_by_side

MODEL_HELP = "HF model id, local path, 'smollm2-135m' (embedded) or 'tiny-<family>' (random, for tests)"


def one_line(exc: BaseException, options: set[str] | None = None) -> str:
    """An error as the one line the user reads (file-system errors say which file and what to do).
    `options`: the command's own options; a suggestion of an option it lacks is left out."""
    import errno

    if isinstance(exc, OSError) and not isinstance(exc, (FileNotFoundError, ModuleNotFoundError)) and exc.errno:
        where = f"{exc.filename}: " if exc.filename else ""
        fix = {
            errno.ENOSPC: "free some space or write elsewhere (--out)",
            errno.EROFS: "the folder is read-only; write elsewhere (--out)",
            errno.EACCES: "no permission; write elsewhere (--out) or fix the folder's permissions",
            errno.EPERM: "no permission; write elsewhere (--out) or fix the folder's permissions",
        }.get(exc.errno, "check the path")
        return _only_options(f"{where}{exc.strerror or exc}; {fix}", options)
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = _only_options(text, options)
    return text if isinstance(exc, (ValueError, SteerHealError)) else f"{type(exc).__name__}: {text}"


def _only_options(text: str, options: set[str] | None) -> str:
    """Drop a library message's "(--option)" hints that name an option this command lacks."""
    import re

    if options is None:
        return text
    return re.sub(r" \((--[a-z][a-z-]*)\)", lambda m: m.group(0) if m.group(1) in options else "", text)


class PipeClosed(Exception):
    """stdout's reader went away (`steer-heal steer ... | head -2`); not an OSError, so click
    leaves it to the entry point, which exits quietly."""


class _Group(click.Group):
    """Library errors (bad input, blow-ups, full disks) become one-line messages and exit 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.exceptions.ClickException:
            raise
        except BrokenPipeError as exc:  # the reader's choice, not an error: runners/entry.py exits quietly
            raise PipeClosed() from exc
        except (SteerHealError, ValueError, OSError) as exc:
            command = self.get_command(ctx, ctx.invoked_subcommand) if ctx.invoked_subcommand else None
            options = {o for p in command.params for o in p.opts} if command is not None else None
            raise click.ClickException(one_line(exc, options)) from exc


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="steer-heal")
@click.option("--quiet", "-q", is_flag=True, help="only warnings and errors on stderr (no progress lines)")
@click.option("--verbose", "-v", is_flag=True, help="debug lines, and transformers' own logs and bars")
@click.pass_context
def main(ctx: click.Context, quiet: bool, verbose: bool) -> None:
    """Distil activation steering into LoRA adapters and heal the incoherence it injects."""
    import os

    from .options import set_verbosity

    set_verbosity("quiet" if quiet else "verbose" if verbose else "normal")
    world = os.environ.get("WORLD_SIZE", "1")
    if ctx.invoked_subcommand not in (None, "run") and world not in ("", "1"):
        # N copies of another command would each write the same files
        raise click.UsageError(
            f"only `steer-heal run` spreads over a launch ({world} processes here); run "
            f"`steer-heal {ctx.invoked_subcommand}` in one process, without torchrun / accelerate launch"
        )


@main.command()
@click.option("--model", "model_name", default="smollm2-135m", show_default=True, help=MODEL_HELP)
@click.option("--axis", default="authority", show_default=True, help="bundled axis name or .toml file (persona pair)")
@click.option("--pos", default=None, help="positive persona system prompt (overrides the axis)")
@click.option("--neg", default=None, help="negative persona system prompt (overrides the axis)")
@click.option(
    "--contexts",
    "contexts_file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="file of user messages, one per line (default: the bundled set)",
)
@click.option("--n-contexts", type=click.IntRange(min=1), default=256, show_default=True)
@click.option(
    "--pairs",
    "pairs_file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="contrastive pairs instead of a persona pair: JSONL {pos, neg[, prompt]}, CAA A/B JSON or repeng JSON",
)
@click.option(
    "--method", type=click.Choice(choices(PairMethod)), default="mean_diff", show_default=True, help="with --pairs"
)
@click.option(
    "--read",
    type=click.Choice(["last", "mean"]),
    default="last",
    show_default=True,
    help="with --pairs: last token or answer mean",
)
@click.option("--layers", default="0.45,0.55", show_default=True, help="'lo,hi' depth fractions or ints '13,14'")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="where to write the .safetensors vector")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object (path, layers, norms, seconds)")
@device_options
def extract(
    model_name,
    axis,
    pos,
    neg,
    contexts_file,
    n_contexts,
    pairs_file,
    method,
    read,
    layers,
    batch_size,
    out,
    as_json,
    device,
    dtype,
    device_map,
    blocks,
    writer,
) -> None:
    """Extract a steering vector: mean difference of a persona pair, or of your own contrastive pairs (--pairs)."""
    from steer_heal.data import load_axis, load_contexts
    from steer_heal.io import check_output
    from steer_heal.models.devices import attention_backends
    from steer_heal.models.loading import load_model
    from steer_heal.models.model import input_device
    from steer_heal.steering.extract import check_personas
    from steer_heal.steering.pairs import read_pairs
    from steer_heal.steering.vector import SteeringVector

    check_output(out)
    # every input is read and checked before the model loads
    if pairs_file is not None:
        if pos is not None or neg is not None or contexts_file is not None:
            raise click.UsageError("--pairs replaces the persona pair: drop --pos, --neg and --contexts")
        pairs = read_pairs(pairs_file)
        source, count = f"{len(pairs)} pairs ({method}, read {read})", {"pairs": len(pairs)}
    else:
        persona = load_axis(axis)
        pos = persona.pos if pos is None else pos  # an empty --pos '' is refused, not replaced
        neg = persona.neg if neg is None else neg
        check_personas(pos, neg)
        contexts = load_contexts(contexts_file)[:n_contexts]
        source, count = f"{len(contexts)} contexts", {"contexts": len(contexts)}
    device, dtype = placement(device, dtype)
    model, tok = load_model(
        model_name, dtype=dtype, device=device, device_map=device_map, blocks=blocks, writer=writer, **model_kwargs()
    )
    start = time.perf_counter()
    with attention_backends(input_device(model)):
        if pairs_file is not None:
            vec = SteeringVector.from_pairs(model, tok, pairs, parse_layers(layers), read, method, batch_size, True)
        else:
            vec = SteeringVector.from_persona_pair(
                model, tok, pos, neg, contexts, layers=parse_layers(layers), batch_size=batch_size, progress=True
            )
    vec.save(out)
    seconds = time.perf_counter() - start
    if as_json:
        record = {"out": str(out), "model": vec.model_id, **count, "seconds": round(seconds, 3)}
        click.echo(json.dumps(record | {"norms": {str(k): v for k, v in vec.norms().items()}}))
        return
    norms = ", ".join(f"{layer}: {norm:.2f}" for layer, norm in vec.norms().items())
    click.echo(f"{source} in {seconds:.1f}s; layers {{{norms}}} -> {out}")


@main.command()
@click.option("--vector", "vector_file", type=click.Path(exists=True, dir_okay=False), required=True)
@click.option("--model", "model_name", default=None, help=MODEL_HELP + " (default: the vector's model)")
@click.option("--prompt", "prompts", multiple=True, required=True, help="user message; repeat for several")
@click.option("--coeff", type=float, default=1.0, show_default=True)
@click.option("--system", default=None, help="optional system prompt for both runs")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--how", type=click.Choice(choices(SteerHow)), default="hooks", show_default=True)
@click.option("--sample/--greedy", default=False, show_default=True)
@click.option("--seed", type=click.IntRange(0, 2**62), default=0, show_default=True)
@click.option("--allow-other-model", is_flag=True, help="steer a model other than the one the vector was made on")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of the side-by-side text")
@device_options
def steer(
    vector_file,
    model_name,
    prompts,
    coeff,
    system,
    max_new_tokens,
    how,
    sample,
    seed,
    allow_other_model,
    as_json,
    device,
    dtype,
    device_map,
    blocks,
    writer,
) -> None:
    """Print unsteered and steered completions side by side."""
    from steer_heal.models.devices import attention_backends
    from steer_heal.models.loading import load_model
    from steer_heal.models.model import input_device
    from steer_heal.sampling import Sampling
    from steer_heal.steering.generation import generate
    from steer_heal.steering.hooks import check_coeff
    from steer_heal.steering.vector import SteeringVector

    check_coeff(coeff)
    device, dtype = placement(device, dtype)
    vec, name = SteeringVector.load_for(
        vector_file, model_name, allow_other_model, blocks, writer
    )  # before the weights load
    model, tok = load_model(
        name, dtype=dtype, device=device, device_map=device_map, blocks=blocks, writer=writer, **model_kwargs()
    )
    settings = dict(sampling=Sampling(max_new_tokens=max_new_tokens, do_sample=sample), seed=seed, system=system)
    with attention_backends(input_device(model)):
        plain = generate(model, tok, list(prompts), **settings)
        steered = generate(
            model,
            tok,
            list(prompts),
            steering=vec,
            coeff=coeff,
            how=how,
            allow_other_model=allow_other_model,
            **settings,
        )
    if as_json:
        rows = [{"prompt": a.prompt, "unsteered": a.text, "steered": b.text} for a, b in zip(plain, steered)]
        click.echo(json.dumps({"vector": vector_file, "model": name, "coeff": coeff, "how": how, "rows": rows}))
        return
    width = shutil.get_terminal_size((100, 20)).columns
    for a, b in zip(plain, steered):
        click.echo(f"\n> {a.prompt}\n")
        click.echo(side_by_side("unsteered", a.text, f"steered (coeff {coeff:g})", b.text, width))


def _overrides(**options) -> dict[str, dict]:
    """CLI flags -> config sections; None means 'not given'."""
    where = {
        "model": "run",
        "rounds": "run",
        "seed": "run",
        "axis": "run",
        "reg": "heal",
        "lam": "heal",
        "tau": "heal",
        "agg": "heal",
        "reference": "heal",
        "anchor": "heal",
        "anchor_lam": "heal",
        "max_auc": "drift",
        "max_kl": "drift",
        "coherence_floor": "eval",
        "device": "run",
        "dtype": "run",
        "device_map": "run",
        "blocks": "run",
        "writer": "run",
    }
    out: dict[str, dict] = {}
    for key, value in options.items():
        if value is not None:
            out.setdefault(where[key], {})[key] = value
    return out


@main.command()
@click.option("--preset", type=click.Choice(list(PRESETS)), default=None, help="a sized starting config")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), default=None, help="TOML config")
@click.option("--model", default=None, help=MODEL_HELP)
@click.option("--axis", default=None, help="bundled axis (authority, love) or .toml file")
@click.option("--rounds", type=click.IntRange(min=1), default=None)
@click.option("--reg", type=click.Choice(choices(RegName)), default=None)
@click.option("--lam", type=float, default=None)
@click.option("--tau", type=float, default=None)
@click.option("--agg", type=click.Choice(choices(Aggregation)), default=None)
@click.option("--reference", type=click.Choice(choices(Reference)), default=None)
@click.option(
    "--anchor",
    type=click.Choice(choices(AnchorName)),
    default=None,
    help="hold the register: a divergence to the base on its own neutral completions, every heal step",
)
@click.option("--anchor-lam", type=float, default=None, help="the anchor's weight (> 0)")
@click.option("--max-auc", type=float, default=None, help="stop when the register-shift AUC exceeds this (0 never)")
@click.option("--max-kl", type=float, default=None, help="stop when NeutralKL exceeds this, nats/token (0 never)")
@click.option("--seed", type=int, default=None)
@click.option(
    "--coherence-floor",
    type=float,
    default=None,
    help="stop when a healed round's coherence < this x the base's (0 never stops)",
)
@click.option(
    "--out", type=click.Path(file_okay=False), default=None, help="run directory (default out/<timestamp>_...)"
)
@click.option(
    "--resume",
    "resume_dir",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="continue a run after its last finished round (--rounds, --coherence-floor, --max-auc, --max-kl may change)",
)
@click.option("--overwrite", is_flag=True, help="replace an existing --out directory")
@click.option("--dry-run", is_flag=True, help="print the resolved config and the planned work, run nothing")
@device_options(default=None)
def run(
    preset,
    config_file,
    model,
    axis,
    rounds,
    reg,
    lam,
    tau,
    agg,
    reference,
    anchor,
    anchor_lam,
    max_auc,
    max_kl,
    seed,
    coherence_floor,
    out,
    resume_dir,
    overwrite,
    dry_run,
    device,
    dtype,
    device_map,
    blocks,
    writer,
) -> None:
    """Run the distill-and-heal loop and write a run directory."""
    from steer_heal.errors import InputError
    from steer_heal.run import config as cfg
    from steer_heal.run import loop, parallel, plot
    from steer_heal.run.runlog import RunDir, read_events, run_name

    if dry_run and parallel.env_rank() != 0:
        return  # under a launcher the plan is printed once, by rank 0
    where = None if dry_run else parallel.launch()  # torchrun / accelerate launch: this process's rank
    speaks = where is None or where.writer  # rank 0 prints and writes for the launch
    if not speaks:
        from .options import set_verbosity

        set_verbosity("quiet")  # rank 0 speaks for the launch

    overrides = _overrides(
        model=model,
        axis=axis,
        rounds=rounds,
        reg=reg,
        lam=lam,
        tau=tau,
        agg=agg,
        reference=reference,
        anchor=anchor,
        anchor_lam=anchor_lam,
        max_auc=max_auc,
        max_kl=max_kl,
        seed=seed,
        coherence_floor=coherence_floor,
        device=device,
        dtype=dtype,
        device_map=device_map,
        blocks=blocks,
        writer=writer,
    )
    started = time.perf_counter()
    if resume_dir:
        if out is not None and Path(out).resolve() != Path(resume_dir).resolve():
            raise InputError(f"--resume {resume_dir} continues that folder in place; drop --out {out}")
        if overwrite:
            raise InputError("--resume continues a run and --overwrite replaces one; pass one of them")
        # a preset or config file must match the saved config; single options change only
        # what may change on resume (more rounds, another coherence floor)
        given = cfg.resolve(preset, config_file, overrides) if (preset or config_file) else None
        run_dir = parallel.open_run(
            where, lambda: RunDir.resume(resume_dir, given, None if given else overrides, write=not dry_run)
        )
        config = run_dir.config
    else:
        config = cfg.resolve(preset or "quick", config_file, overrides)
        target = Path(out or Path("out") / run_name(config))
        # refuse before any slow work; writes nothing (rank 0 looks, before anyone writes)
        parallel.on_writer(where, lambda: RunDir.check_target(target, overwrite))
    local = parallel.local_config(config, where)  # under a launch: this rank's own GPU
    if speaks:
        placement(local.run.device, local.run.dtype)  # a device that is not there fails here, in one line
    if dry_run:
        click.echo(cfg.to_toml(config))
        click.echo(
            f"# plan: base + prompted evaluation, then {config.run.rounds} round(s) of extract -> dose search "
            f"({config.dose.steps + 2} probes max) -> collect {config.collect.n_keep} -> heal ({config.heal.reg}, "
            f"{config.heal.epochs} epochs, reference {config.heal.reference}"
            + (f", anchor {config.heal.anchor} lam {config.heal.anchor_lam:g}" if config.heal.anchor != "none" else "")
            + ") -> evaluate"
            + (" -> drift on held-out neutral prompts" if config.drift.enabled else "")
        )
        return
    setup = loop.setup(local)  # loads the model and data: a failure here leaves nothing on disk
    if not resume_dir:
        run_dir = parallel.open_run(where, lambda: RunDir.create(target, config, overwrite=overwrite))
    if not speaks:
        with run_dir:
            loop.run(config, run_dir, setup, sharder=where)
        return
    click.echo(f"run directory: {run_dir.path}" + (f" ({where.world} processes)" if where else ""))
    with run_dir:
        result = loop.run(config, run_dir, setup, sharder=where)
        files = plot.render(run_dir.path)
    click.echo("\n" + files["stages"].read_text())
    if result["stopped"]:
        click.echo(f"stopped early: {result['stopped']}")
    click.echo(f"time per stage: {plot.time_breakdown(read_events(run_dir.path / 'events.jsonl'))}")
    click.echo(
        f"wall time {time.perf_counter() - started:.0f} s; report {files['report']}, figure {files['trajectory']}"
    )


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
def plot(run_dir) -> None:
    """Re-render trajectory.png, stages.md and report.md from a run's events.jsonl."""
    from steer_heal.run.plot import render

    for name, path in render(run_dir).items():
        click.echo(f"{name}: {path}")


@main.command()
@click.option("--vector", "vector_file", type=click.Path(exists=True, dir_okay=False), required=True)
@click.option("--model", "model_name", default=None, help=MODEL_HELP + " (default: the vector's model)")
@click.option("--axis", default="authority", show_default=True, help="axis whose prompts, target and samples to use")
@click.option("--coeffs", default="0,0.5,1,2,3,4,6", show_default=True, help="comma-separated doses; must include 0")
@click.option("--items", type=click.Choice(choices(ItemSet)), default="bundled", show_default=True)
@click.option("--mfv-dir", type=click.Path(exists=True, file_okay=False), default=None)
@click.option("--n-items", type=click.IntRange(min=0), default=0, help="stratified subset size per item set (0: all)")
@click.option(
    "--n", type=click.IntRange(min=0), default=16, show_default=True, help="completions per dose to filter (0: skip)"
)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option(
    "--calibrate/--no-calibrate",
    default=True,
    show_default=True,
    help="filter thresholds from the unsteered model's own completions (else the absolute --ppl-tau)",
)
@click.option(
    "--ppl-tau", type=float, default=50.0, show_default=True, help="absolute tail-ppl threshold (--no-calibrate)"
)
@click.option(
    "--coherence-floor",
    "--floor",
    "coherence_floor",
    type=float,
    default=0.95,
    show_default=True,
    help="operating dose: coherence >= this x unsteered",
)
@click.option("--seed", type=click.IntRange(0, 2**62), default=0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), required=True, help="directory for sweep.json and sweep.md")
@click.option("--allow-other-model", is_flag=True, help="steer a model other than the one the vector was made on")
@click.option("--json", "as_json", is_flag=True, help="print sweep.json's content instead of the report")
@device_options
def sweep(
    vector_file,
    model_name,
    axis,
    coeffs,
    items,
    mfv_dir,
    n_items,
    n,
    max_new_tokens,
    calibrate,
    ppl_tau,
    coherence_floor,
    seed,
    out,
    allow_other_model,
    as_json,
    device,
    dtype,
    device_map,
    blocks,
    writer,
) -> None:
    """Sweep a vector's dose: vignette profile, coherence, filter report and samples per coefficient."""
    import json
    from dataclasses import replace

    from steer_heal.data import load_axis
    from steer_heal.filters import calibrate_on_pool, default_filter
    from steer_heal.io import atomic_write_text, check_output
    from steer_heal.models.devices import attention_backends
    from steer_heal.models.loading import load_model
    from steer_heal.models.model import input_device
    from steer_heal.run.config import EvalSection, RunConfig
    from steer_heal.run.loop import probes
    from steer_heal.run.sweep import check_sweep, dose_sweep, sweep_report
    from steer_heal.sampling import Sampling
    from steer_heal.steering.vector import SteeringVector

    try:
        doses = [float(x) for x in coeffs.split(",") if x.strip()]
    except ValueError as exc:
        raise click.BadParameter(f"--coeffs takes numbers separated by commas, got {coeffs!r}") from exc
    if items in ("mfv", "both") and not mfv_dir:
        raise click.UsageError(f"--items {items} needs --mfv-dir (the folder with the MFV JSONL files)")
    persona = load_axis(axis)
    check_sweep(doses, coherence_floor)  # every setting before the model loads (not after the sweep)
    check_output(out)
    device, dtype = placement(device, dtype)
    vec, name = SteeringVector.load_for(
        vector_file, model_name, allow_other_model, blocks, writer
    )  # before the weights load
    model, tok = load_model(
        name, dtype=dtype, device=device, device_map=device_map, blocks=blocks, writer=writer, **model_kwargs()
    )
    chosen = {
        k: replace(p, progress=True) if hasattr(p, "progress") else p
        for k, p in probes(
            RunConfig(eval=EvalSection(items=items, n_items=n_items, mfv_dir=mfv_dir or "")), seed, persona
        ).items()
    }
    start = time.perf_counter()
    sampling = Sampling(do_sample=True, max_new_tokens=max_new_tokens, batch_size=16)
    filt = None
    with attention_backends(input_device(model)):
        if n and calibrate:
            filt, calibration = calibrate_on_pool(
                model, tok, persona.prompts, sampling=sampling, seed=seed, narration_patterns=persona.narration_patterns
            )
            click.echo(calibration.describe())
        elif n:
            filt = default_filter(model, tok, tau=ppl_tau, narration_patterns=persona.narration_patterns)
        points = dose_sweep(
            model,
            tok,
            vec,
            doses,
            chosen,
            prompts=persona.prompts,
            filt=filt,
            n=max(n, 1),
            sample_prompts=persona.sample_prompts[:3],
            seed=seed,
            sampling=sampling,
            allow_other_model=allow_other_model,
        )
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = json.dumps({"vector": vector_file, "axis": axis, "points": [p.to_dict() for p in points]})
    atomic_write_text(out_dir / "sweep.json", record)
    report = sweep_report(points, persona.target, persona.direction, coherence_floor)
    atomic_write_text(out_dir / "sweep.md", report)
    if as_json:
        click.echo(record)
        return
    click.echo(report)
    click.echo(f"{len(doses)} doses in {time.perf_counter() - start:.0f} s -> {out_dir}/sweep.md, sweep.json")


@main.command(name="eval")
@click.option("--model", "model_name", default="smollm2-135m", show_default=True, help=MODEL_HELP)
@click.option(
    "--adapter", type=click.Path(exists=True, file_okay=False), default=None, help="a round's adapter/ directory"
)
@click.option("--vector", "vector_file", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--coeff", type=float, default=1.0, show_default=True)
@click.option("--system", default=None, help="persona system prompt (the prompted baseline)")
@click.option(
    "--axis",
    default="love",
    show_default=True,
    help="bundled axis name or .toml file whose answer log-odds probe to run ('' for the vignettes only)",
)
@click.option(
    "--items", type=click.Choice([c for c in choices(ItemSet) if c != "both"]), default="bundled", show_default=True
)
@click.option("--mfv-dir", type=click.Path(exists=True, file_okay=False), default=None)
@click.option("--think-tokens", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--n-items", type=click.IntRange(min=0), default=0, help="stratified subset size (0: all)")
@click.option(
    "--allow-other-model",
    is_flag=True,
    help="steer or adapt a model other than the one the vector or adapter was made on",
)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of the tables")
@device_options
def evaluate(
    model_name,
    adapter,
    vector_file,
    coeff,
    system,
    axis,
    items,
    mfv_dir,
    think_tokens,
    n_items,
    allow_other_model,
    as_json,
    device,
    dtype,
    device_map,
    blocks,
    writer,
) -> None:
    """Evaluate one configuration (model, optional adapter, steering or system prompt) against the
    plain model: the axis's answer log-odds (stance, wording, off-axis, with 95% intervals) and the
    7-way vignettes (coherence), each with a one-line reading."""
    from contextlib import ExitStack
    from dataclasses import replace

    from steer_heal.data import load_axis
    from steer_heal.evaluate import AnswerLogOdds, Vignettes, load_mfv, load_vignettes, shift, stratified_subset
    from steer_heal.healing.history import Adapter, History
    from steer_heal.models.devices import attention_backends
    from steer_heal.models.loading import load_model
    from steer_heal.models.model import input_device
    from steer_heal.steering.hooks import check_coeff
    from steer_heal.steering.vector import SteeringVector

    if items == "mfv" and not mfv_dir:
        raise click.UsageError("--items mfv needs --mfv-dir (the folder with the MFV JSONL files)")
    # every input is read and checked before the model loads
    check_coeff(coeff)
    logodds = AnswerLogOdds.from_axis(load_axis(axis)) if axis else None
    device, dtype = placement(device, dtype)
    vec = (
        SteeringVector.load_for(vector_file, model_name, allow_other_model, blocks, writer)[0] if vector_file else None
    )
    round_adapter = Adapter.load(adapter) if adapter else None
    chosen = load_mfv(mfv_dir) if items == "mfv" else load_vignettes()
    if 0 < n_items < len(chosen):
        chosen = stratified_subset(chosen, n_items)
    vignettes = Vignettes(items=chosen, think_tokens=think_tokens, progress=not as_json)
    model, tok = load_model(
        model_name, dtype=dtype, device=device, device_map=device_map, blocks=blocks, writer=writer, **model_kwargs()
    )
    changed = round_adapter is not None or vec is not None or system is not None
    with ExitStack() as stack:
        stack.enter_context(attention_backends(input_device(model)))
        plain = {"vignettes": vignettes(model, tok)} if changed else {}
        if logodds is not None and changed:
            plain["logodds"] = logodds(model, tok)
        if round_adapter is not None:
            history = History(model)
            stack.callback(history.close)
            history.fold(round_adapter, allow_other_model)
        if vec is not None:
            stack.enter_context(vec.apply(model, coeff, allow_other_model))
        this = {"vignettes": replace(vignettes, system=system)(model, tok)}
        if logodds is not None:
            this["logodds"] = replace(logodds, system=system)(model, tok)
    shifts = {}
    if "logodds" in plain:
        shifts = {c: shift(plain["logodds"], this["logodds"], c) for c in ("stance", "wording", "off_axis")}
    coherence = this["vignettes"].metrics["coherence"]
    base_coherence = plain["vignettes"].metrics["coherence"] if plain else None
    if as_json:
        record = {
            "model": model_name,
            "adapter": adapter,
            "vector": vector_file,
            "coeff": coeff if vec is not None else None,
            "system": system,
            "axis": axis or None,
            "metrics": {k: r.metrics for k, r in this.items()},
            "plain": {k: r.metrics for k, r in plain.items()},
            "shifts": {c: x.to_dict() | {"z": x.z} for c, x in shifts.items()},
        }
        click.echo(json.dumps(record))
        return
    for name, result in this.items():
        click.echo(f"{name}:")
        for key, value in result.metrics.items():
            click.echo(f"{key:>22s}  {value:.4f}")
    if shifts:
        cells = "; ".join(
            f"{c.replace('_', '-')} {x.mean:+.3f} nats [{x.ci[0]:+.3f}, {x.ci[1]:+.3f}]{' (noise)' if x.noise else ''}"
            for c, x in shifts.items()
        )
        click.echo(
            f"Against the plain model on {len(logodds.scenarios)} held-out {axis} scenarios: {cells}; 7-way "
            f"coherence {coherence:.3f} against {base_coherence:.3f} ({coherence / base_coherence:.3f} x)."
        )
    elif base_coherence is not None:
        click.echo(f"7-way coherence {coherence:.3f} against the plain model's {base_coherence:.3f}.")
    else:
        click.echo("The plain model (nothing applied): pass --adapter, --vector or --system to compare against it.")


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="print the rows as one JSON list instead of a markdown table")
def compare(run_dirs, as_json) -> None:
    """One table across runs: stance, wording, retain, coherence, rounds, stop reason and drift."""
    from steer_heal.run.table import markdown, runs_table

    rows = runs_table(list(run_dirs))
    click.echo(json.dumps(rows) if as_json else markdown(rows))


@main.group(cls=_Group)
def export() -> None:
    """Write plain files other tools load: a merged or baked checkpoint, peft adapters, a llama.cpp control vector."""


@export.command(name="merged")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), required=True, help="folder for the checkpoint")
@click.option("--overwrite", is_flag=True, help="replace an earlier export at --out")
@device_options
def export_merged(run_dir, out, overwrite, device, dtype, device_map, blocks, writer) -> None:
    """A run's student (base + every finished round) as a plain Hugging Face checkpoint."""
    from steer_heal.run.export import check_target, export_merged

    check_target(out, overwrite)  # before the model loads
    device, dtype = placement(device, dtype)
    path = export_merged(
        run_dir, out, overwrite, device=device, dtype=dtype, blocks=blocks, writer=writer, **model_kwargs()
    )
    click.echo(f"merged checkpoint -> {path} (loads with AutoModelForCausalLM.from_pretrained)")


@export.command(name="adapters")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), required=True, help="folder for round_N/ adapters")
@click.option(
    "--base", default=None, help="the base model's hub id or path to name in the adapters (default: the run's)"
)
@click.option("--overwrite", is_flag=True, help="replace an earlier export at --out")
def export_adapters(run_dir, out, base, overwrite) -> None:
    """A run's round adapters as peft folders naming the real base model."""
    from steer_heal.run.export import export_adapters

    path = export_adapters(run_dir, out, overwrite, base=base, device="cpu", dtype="float32")
    click.echo(f"adapters -> {path} (load with AutoPeftModelForCausalLM.from_pretrained({str(path)!r}/round_0))")


@export.command(name="baked")
@click.option("--vector", "vector_file", type=click.Path(exists=True, dir_okay=False), required=True)
@click.option("--coeff", type=float, required=True, help="the coefficient folded into the biases")
@click.option("--model", "model_name", default=None, help=MODEL_HELP + " (default: the vector's model)")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="folder for the checkpoint")
@click.option("--overwrite", is_flag=True, help="replace an earlier export at --out")
@click.option("--allow-other-model", is_flag=True, help="bake into a model other than the one the vector was made on")
@device_options
def export_baked(
    vector_file, coeff, model_name, out, overwrite, allow_other_model, device, dtype, device_map, blocks, writer
) -> None:
    """A vector at one coefficient folded into the MLP output biases, saved as a plain checkpoint."""
    from steer_heal.models.loading import load_model
    from steer_heal.run.export import check_target, export_baked
    from steer_heal.steering.hooks import check_coeff
    from steer_heal.steering.vector import SteeringVector

    check_coeff(coeff)
    check_target(out, overwrite, inputs=(vector_file,))
    device, dtype = placement(device, dtype)
    vec, name = SteeringVector.load_for(vector_file, model_name, allow_other_model, blocks, writer)
    model, tok = load_model(
        name, dtype=dtype, device=device, device_map=device_map, blocks=blocks, writer=writer, **model_kwargs()
    )
    path = export_baked(model, tok, vec, coeff, out, overwrite, allow_other_model)
    click.echo(f"baked checkpoint (coeff {coeff:g}) -> {path}")


@export.command(name="gguf")
@click.option("--vector", "vector_file", type=click.Path(exists=True, dir_okay=False), required=True)
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="the .gguf file to write")
@click.option("--coeff", type=float, default=1.0, show_default=True, help="written as coeff * v (llama.cpp strength 1)")
@click.option("--overwrite", is_flag=True, help="replace an existing file")
def export_gguf(vector_file, out, coeff, overwrite) -> None:
    """A vector as a llama.cpp control vector (direction.N tensors; --control-vector-scaled FILE S)."""
    from steer_heal.errors import InputError
    from steer_heal.io import check_output
    from steer_heal.steering.hooks import check_coeff
    from steer_heal.steering.vector import SteeringVector

    check_coeff(coeff)
    check_output(out, inputs=(vector_file,))
    if Path(out).exists() and not overwrite:
        raise InputError(f"{out} exists; pass --overwrite to replace it")
    vec = SteeringVector.load(vector_file)
    path = vec.to_gguf(out, coeff)
    click.echo(f"control vector ({len(vec.directions)} layers, coeff {coeff:g}) -> {path}")


if __name__ == "__main__":  # last: every command and group above is registered by now
    main()
