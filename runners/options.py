"""Option parsing shared by the CLI commands."""

from __future__ import annotations

import logging

import click

from steer_heal.models.model import LayerSpec


def parse_layers(text: str) -> LayerSpec:
    """'0.45,0.55' -> depth fractions; '13,14,15' or '-1' -> layer indices."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        if any("." in p for p in parts):
            if len(parts) != 2:
                raise click.BadParameter(f"depth fractions take two numbers 'lo,hi', got {text!r}")
            return (float(parts[0]), float(parts[1]))
        return [int(p) for p in parts]
    except ValueError:
        raise click.BadParameter(f"layers must be 'lo,hi' fractions or comma-separated ints, got {text!r}") from None


def side_by_side(left_title: str, left: str, right_title: str, right: str, width: int = 100) -> str:
    import textwrap

    col = (width - 3) // 2
    a = [left_title, "-" * col, *textwrap.wrap(left, col)]
    b = [right_title, "-" * col, *textwrap.wrap(right, col)]
    rows = max(len(a), len(b))
    a += [""] * (rows - len(a))
    b += [""] * (rows - len(b))
    return "\n".join(f"{x.ljust(col)} | {y}" for x, y in zip(a, b))


def device_options(command=None, *, default: str | None = "auto"):
    """--device, --dtype, --device-map, --blocks and --writer, shared by every command that
    loads a model. `default=None` (for `run`): not given means the config's value."""
    from steer_heal.models.devices import DEVICE_NAMES, DTYPE_NAMES

    if command is None:
        return lambda f: device_options(f, default=default)
    shown = default is not None
    if default is not None:  # commands that call load_model themselves (run reads its config)
        command = click.option(
            "--model-kwargs",
            default=None,
            expose_value=False,
            callback=_model_kwargs,
            help='JSON passed to from_pretrained, e.g. \'{"attn_implementation": "sdpa", "revision": "main"}\'',
        )(command)
    command = click.option(
        "--writer",
        default=None,
        help="override: the linear inside a block that writes the MLP output (e.g. mlp.down_proj); enables bake",
    )(command)
    command = click.option(
        "--blocks",
        default=None,
        help="override: the decoder-block ModuleList path (e.g. model.layers) where it cannot be found",
    )(command)

    command = click.option(
        "--device-map",
        type=click.Choice(["auto"]),
        default=None,
        help="shard a model larger than one card over the visible devices (accelerate)",
    )(command)
    command = click.option(
        "--dtype", default=default, show_default=shown, help=f"{' | '.join(DTYPE_NAMES)} (auto: bfloat16 on a GPU)"
    )(command)
    return click.option(
        "--device",
        default=default,
        show_default=shown,
        help=f"{' | '.join(DEVICE_NAMES)} (auto: a GPU if one is visible)",
    )(command)


def _model_kwargs(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """Parse --model-kwargs into the context (`model_kwargs()` hands them to load_model)."""
    import json

    if value is None:
        return
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON ({exc.msg}): {value!r}") from None
    if not isinstance(parsed, dict):
        raise click.BadParameter(f"a JSON object of keyword arguments, got {type(parsed).__name__}")
    ctx.meta["steer_heal.model_kwargs"] = parsed


def model_kwargs() -> dict:
    """What --model-kwargs gave (revision, attn_implementation, quantization settings, ...)."""
    return dict(click.get_current_context().meta.get("steer_heal.model_kwargs", {}))


def placement(device: str, dtype: str) -> tuple[str, str]:
    """Check the names and say on stderr what `auto` chose, before any model loads."""
    from steer_heal.models.devices import resolve

    chosen = resolve(device, dtype)
    click.echo(f"steer-heal: {chosen}", err=True)
    return str(chosen.device), str(chosen.dtype).removeprefix("torch.")


class _Stderr(logging.StreamHandler):
    """A handler that writes to whatever `sys.stderr` is at each line (a test runner swaps it)."""

    @property
    def stream(self):
        import sys

        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def set_verbosity(level: str) -> None:
    """What the command line says on stderr: `normal` one progress line per stage (the library's
    `steer_heal` logger at INFO) and the tqdm bars of long stages; `quiet` warnings and errors
    only; `verbose` debug lines, plus transformers' own logs and download/loading bars, which are
    kept quiet otherwise (they repeat what the stage lines say)."""
    import os

    logger = logging.getLogger("steer_heal")
    logger.setLevel({"quiet": logging.WARNING, "normal": logging.INFO, "verbose": logging.DEBUG}[level])
    if not any(getattr(h, "_steer_heal", False) for h in logger.handlers):
        handler = _Stderr()  # stderr: stdout stays the command's result
        handler.setFormatter(logging.Formatter("steer-heal: %(message)s"))
        handler._steer_heal = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
    if level == "quiet":
        os.environ["TQDM_DISABLE"] = "1"
    if level != "verbose":
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        except ImportError:
            pass
