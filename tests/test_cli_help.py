"""The command line's surface: its order, version, examples, 80-column help, and `verify`'s messages."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import typer

from carechain.cli import ORDER, app
from carechain.identity import Identity
from tests.test_cli import Log, log, proof_file, run, text  # noqa: F401 - `log` is a fixture

ROOT = typer.main.get_command(app)


def every_command() -> list[list[str]]:
    found: list[list[str]] = []

    def walk(cmd: Any, path: list[str]) -> None:  # typer's click commands and groups
        found.append(path)
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                walk(sub, [*path, name])

    walk(ROOT, [])
    return found


@pytest.mark.parametrize("command", every_command(), ids=lambda c: " ".join(c) or "carechain")
def test_every_help_has_an_example_and_fits_80_columns(command: list[str]) -> None:
    result = run(*command, "--help", columns=80)
    assert result.exit_code == 0, text(result)
    help_text = text(result)
    assert "Example:" in help_text and "$ carechain" in help_text
    too_wide = [line for line in help_text.splitlines() if len(line) > 80]
    assert too_wide == []


def test_commands_are_listed_in_the_order_a_deployment_meets_them() -> None:
    listed = re.findall(r"^│ (\w+) ", text(run("--help", columns=100)), re.MULTILINE)
    commands = [c for c in listed if c in ORDER]
    assert commands == list(ORDER)


def test_version_prints_the_package_version() -> None:
    result = run("--version")
    assert result.exit_code == 0 and re.fullmatch(r"carechain \S+\n", text(result))


def test_shell_completion_is_offered() -> None:
    assert "--install-completion" in text(run("--help"))


def test_verify_without_log_key_warns_that_it_checked_only_self_consistency(log: Log, tmp_path: Path) -> None:  # noqa: F811
    bundle = proof_file(log, tmp_path, log.device_id, "1", "--json")
    unanchored = run("verify", bundle)
    assert unanchored.exit_code == 0
    assert "WARNING: no --log-key" in unanchored.stderr and "self-consistent" in unanchored.stderr
    anchored = run("verify", bundle, "--log-key", log.log_key_hex)
    assert anchored.exit_code == 0 and "WARNING" not in text(anchored)


def test_a_bundle_with_an_unknown_field_fails_in_one_clear_line(log: Log, tmp_path: Path) -> None:  # noqa: F811
    bundle = proof_file(log, tmp_path, log.device_id, "1", "--json")
    raw = json.loads(bundle.read_text())
    raw["extra_proof"] = "trust me"
    bundle.write_text(json.dumps(raw))
    result = run("verify", bundle, "--log-key", log.log_key_hex, columns=200)
    assert result.exit_code == 1
    lines = text(result).strip().splitlines()
    assert len(lines) == 1 and "unknown field 'extra_proof'" in lines[0], lines
    assert "pydantic" not in text(result) and "validation error" not in text(result)


@pytest.mark.parametrize("args", [
    [], ["--checkpoint", "note.txt"], ["p.json", "--log-key", "ab" * 31], ["missing.json"],
])
def test_verify_usage_errors_exit_2(args: list[str], tmp_path: Path) -> None:
    result = run("verify", *[str(tmp_path / a) if a.endswith((".json", ".txt")) else a for a in args])
    assert result.exit_code == 2, text(result)
    assert "VERIFIED" not in text(result)


def test_keys_new_json_prints_the_identity(tmp_path: Path) -> None:
    result = run("keys", "new", tmp_path / "k.key", "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["device_id"] == Identity.load(tmp_path / "k.key").device_id
