"""`python -m carechain.cli` runs the `carechain` command (the fault harness and benchmarks use it)."""

from carechain.cli import app

app(prog_name="carechain")
