"""Option parsing shared by the CLI commands."""

from __future__ import annotations

import click

from steer_heal.model import LayerSpec


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
