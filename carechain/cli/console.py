"""`carechain console`: operator accounts of the bridge's web console (docs/console.md)."""

from __future__ import annotations

import typer

console_app = typer.Typer(no_args_is_help=True, help="Operator accounts of the bridge's web console.")
