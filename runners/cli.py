"""`steer-heal`: extract, steer, run, eval, plot. Each command parses options and calls the library."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import click

from .options import parse_layers, side_by_side

MODEL_HELP = "HF model id, local path, 'smollm2-135m' (embedded) or 'tiny-<family>' (random, for tests)"


class _Group(click.Group):
    """Library errors (bad input) become one-line messages, not tracebacks."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (ValueError, FileNotFoundError, ModuleNotFoundError) as exc:
            raise click.ClickException(str(exc)) from exc


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="steer-heal")
def main() -> None:
    """Distil activation steering into LoRA adapters and heal the incoherence it injects."""


@main.command()
@click.option("--model", "model_name", default="smollm2-135m", show_default=True, help=MODEL_HELP)
@click.option("--axis", default="authority", show_default=True, help="bundled axis name or .toml file (persona pair)")
@click.option("--pos", default=None, help="positive persona system prompt (overrides the axis)")
@click.option("--neg", default=None, help="negative persona system prompt (overrides the axis)")
@click.option("--contexts", "contexts_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="file of user messages, one per line (default: the bundled set)")
@click.option("--n-contexts", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--layers", default="0.45,0.55", show_default=True, help="'lo,hi' depth fractions or ints '13,14'")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="where to write the .safetensors vector")
def extract(model_name, axis, pos, neg, contexts_file, n_contexts, layers, batch_size, out) -> None:
    """Extract a mean-difference steering vector from a persona pair."""
    from steer_heal import SteeringVector, load_model
    from steer_heal.data import load_axis, load_contexts

    persona = load_axis(axis)
    contexts = load_contexts(contexts_file)[:n_contexts]
    model, tok = load_model(model_name)
    start = time.perf_counter()
    vec = SteeringVector.from_persona_pair(
        model, tok, pos=pos or persona.pos, neg=neg or persona.neg, contexts=contexts,
        layers=parse_layers(layers), batch_size=batch_size, progress=True,
    )
    vec.save(out)
    norms = ", ".join(f"{layer}: {norm:.2f}" for layer, norm in vec.norms().items())
    click.echo(f"{len(contexts)} contexts in {time.perf_counter() - start:.1f}s; layers {{{norms}}} -> {out}")


@main.command()
@click.option("--vector", "vector_file", type=click.Path(exists=True, dir_okay=False), required=True)
@click.option("--model", "model_name", default=None, help=MODEL_HELP + " (default: the vector's model)")
@click.option("--prompt", "prompts", multiple=True, required=True, help="user message; repeat for several")
@click.option("--coeff", type=float, default=1.0, show_default=True)
@click.option("--system", default=None, help="optional system prompt for both runs")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--how", type=click.Choice(["hooks", "bias"]), default="hooks", show_default=True)
@click.option("--sample/--greedy", default=False, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def steer(vector_file, model_name, prompts, coeff, system, max_new_tokens, how, sample, seed) -> None:
    """Print unsteered and steered completions side by side."""
    from steer_heal import SteeringVector, generate, load_model

    vec = SteeringVector.load(vector_file)
    model, tok = load_model(model_name or vec.model_id)
    settings = dict(max_new_tokens=max_new_tokens, do_sample=sample, seed=seed, system=system)
    plain = generate(model, tok, list(prompts), **settings)
    steered = generate(model, tok, list(prompts), steering=vec, coeff=coeff, how=how, **settings)
    width = shutil.get_terminal_size((100, 20)).columns
    for a, b in zip(plain, steered):
        click.echo(f"\n> {a.prompt}\n")
        click.echo(side_by_side("unsteered", a.text, f"steered (coeff {coeff:g})", b.text, width))
