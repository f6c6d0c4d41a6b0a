"""Option parsing shared by the CLI commands."""

from __future__ import annotations

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


def placement(device: str, dtype: str) -> tuple[str, str]:
    """Check the names and say on stderr what `auto` chose, before any model loads."""
    from steer_heal.models.devices import resolve

    chosen = resolve(device, dtype)
    click.echo(f"steer-heal: {chosen}", err=True)
    return str(chosen.device), str(chosen.dtype).removeprefix("torch.")
