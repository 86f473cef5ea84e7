"""`carechain console user …`: accounts made, changed, listed and removed from the command line, on real files.

Passwords come from stdin (`--password-stdin`) or the hidden prompt, never from an argument; what the CLI writes
is what the running console reads (`AccountBook.verify`).
"""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path

from click.testing import Result
from typer.testing import CliRunner

from carechain.cli import app
from chain_bridge.console.accounts import AccountBook, Role

PASSWORD = "a long enough passphrase"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def run(*args: str | Path, stdin: str | None = None) -> Result:
    return CliRunner(env={"COLUMNS": "200"}).invoke(app, ["console", "user", *map(str, args)], input=stdin,
                                                    catch_exceptions=False)


def text(result: Result) -> str:
    return _ANSI.sub("", result.output)


def test_add_list_passwd_roles_and_remove_through_stdin(tmp_path: Path) -> None:
    data = ["--data-dir", str(tmp_path / "bridge")]
    added = run("add", "alice", "--role", "operator", *data, "--password-stdin", stdin=PASSWORD + "\n")
    assert added.exit_code == 0, text(added)
    file = tmp_path / "bridge" / "console" / "accounts.json"
    assert stat.S_IMODE(file.stat().st_mode) == 0o600 and PASSWORD not in file.read_text()
    assert PASSWORD not in text(added)
    assert AccountBook(file).verify("alice", PASSWORD) == frozenset({Role.OPERATOR})

    assert run("add", "pat", "--role", "privacy_officer", "--role", "operator", *data, "--password-stdin",
               stdin="pat's passphrase, long\n").exit_code == 0
    listed = run("list", *data, "--json")
    assert json.loads(listed.stdout)["users"] == [{"name": "alice", "roles": ["operator"]},
                                                  {"name": "pat", "roles": ["operator", "privacy_officer"]}]
    assert re.search(r"^alice\s+operator$", text(run("list", *data)), re.MULTILINE)

    assert run("passwd", "alice", *data, "--password-stdin", stdin="another long passphrase\n").exit_code == 0
    assert AccountBook(file).verify("alice", PASSWORD) is None
    assert AccountBook(file).verify("alice", "another long passphrase") == frozenset({Role.OPERATOR})

    assert run("roles", "pat", "--role", "privacy_officer", *data).exit_code == 0
    assert AccountBook(file).list()[1] == ("pat", frozenset({Role.PRIVACY_OFFICER}))

    assert run("remove", "alice", *data).exit_code == 0
    assert [name for name, _ in AccountBook(file).list()] == ["pat"]
    missing = run("remove", "alice", *data)
    assert missing.exit_code == 2 and "no console account 'alice'" in text(missing)


def test_the_password_is_prompted_twice_and_hidden(tmp_path: Path) -> None:
    file = tmp_path / "accounts.json"
    result = run("add", "alice", "--role", "operator", "--accounts", file, stdin=f"{PASSWORD}\n{PASSWORD}\n")
    assert result.exit_code == 0, text(result)
    assert "Repeat the password" in result.output and PASSWORD not in result.output  # hidden input is not echoed
    assert AccountBook(file).verify("alice", PASSWORD) is not None
    mismatch = run("add", "bob", "--role", "operator", "--accounts", file, stdin=f"{PASSWORD}\nsomething else\n")
    assert mismatch.exit_code != 0 and [n for n, _ in AccountBook(file).list()] == ["alice"]


def test_short_passwords_bad_names_and_unknown_roles_are_refused(tmp_path: Path) -> None:
    file = tmp_path / "accounts.json"
    short = run("add", "alice", "--role", "operator", "--accounts", file, "--password-stdin", stdin="short\n")
    assert short.exit_code == 2 and "at least 12 characters" in text(short)
    bad_name = run("add", "al ice", "--role", "operator", "--accounts", file, "--password-stdin",
                   stdin=PASSWORD + "\n")
    assert bad_name.exit_code == 2 and "not allowed" in text(bad_name)
    bad_role = run("add", "alice", "--role", "admin", "--accounts", file, "--password-stdin", stdin=PASSWORD + "\n")
    assert bad_role.exit_code == 2 and "operator, privacy_officer" in text(bad_role)
    assert not file.exists()


def test_a_password_cannot_be_given_as_an_argument(tmp_path: Path) -> None:
    result = run("add", "alice", "--role", "operator", "--accounts", tmp_path / "a.json", "--password", PASSWORD)
    assert result.exit_code == 2 and "No such option" in text(result)


def test_a_world_readable_accounts_file_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "accounts.json"
    assert run("add", "alice", "--role", "operator", "--accounts", file, "--password-stdin",
               stdin=PASSWORD + "\n").exit_code == 0
    file.chmod(0o644)
    result = run("list", "--accounts", file)
    assert result.exit_code == 2 and f"chmod 600 {file}" in text(result)


def test_the_config_file_says_where_the_accounts_live(tmp_path: Path) -> None:
    file = tmp_path / "etc" / "console-accounts.json"
    config = tmp_path / "carechain.yaml"
    config.write_text(f"bridge:\n  data_dir: {tmp_path / 'bridge'}\n  console:\n    accounts_file: {file}\n")
    assert run("add", "alice", "--role", "operator", "--config", config, "--password-stdin",
               stdin=PASSWORD + "\n").exit_code == 0
    assert AccountBook(file).list() == [("alice", frozenset({Role.OPERATOR}))]
    assert not (tmp_path / "bridge").exists()
