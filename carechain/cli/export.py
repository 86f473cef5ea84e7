"""`carechain export`: the ledger's records in the formats of the field (docs/fhir.md)."""

from __future__ import annotations

import typer

export_app = typer.Typer(no_args_is_help=True, help="Export records in the formats of the field (FHIR R4).")
