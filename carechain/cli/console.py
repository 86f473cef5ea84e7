"""`carechain console user add|passwd|roles|remove|list`: operator accounts of the bridge's web console.

Passwords are typed at a hidden prompt (twice) or piped with --password-stdin, never given as an argument (argv
is visible to every user of the host in `ps`). The running bridge re-reads the accounts file when it changes,
so changes apply without a restart; a password change, a role change or a removal ends the account's open
sessions (docs/console-access.md).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from carechain.cli._options import ConfigOpt, DataDirOpt, JsonOpt, example, fail, load, out

if TYPE_CHECKING:
    from chain_bridge.console.accounts import AccountBook, Role

console_app = typer.Typer(no_args_is_help=True, help="Operator accounts of the bridge's web console.",
                          epilog=example("carechain console user add alice --role operator",
                                         "carechain console user list"))
user_app = typer.Typer(no_args_is_help=True, help="Add, change, remove and list console accounts (argon2id "
                       "password hashes and roles, in a file of mode 0600). A running bridge applies changes at "
                       "once.", epilog=example("carechain console user add alice --role operator",
                                               "carechain console user roles bob --role privacy_officer"))
console_app.add_typer(user_app, name="user")

NameArg = Annotated[str, typer.Argument(help="The account name: 1-64 letters, digits, '.', '_' or '-'.")]
RolesOpt = Annotated[list[str], typer.Option("--role", help="operator (fleet and counters) or privacy_officer "
                                             "(the access log); repeatable.")]
AccountsOpt = Annotated[Path | None, typer.Option("--accounts", help="The accounts file (default: "
                                                  "bridge.console.accounts_file, else "
                                                  "DATA_DIR/console/accounts.json).")]
StdinOpt = Annotated[bool, typer.Option("--password-stdin", help="Read the password from the first line of "
                                        "stdin instead of prompting (for scripts).")]


def _book(config: Path | None, data_dir: Path | None, accounts: Path | None) -> AccountBook:
    from chain_bridge.console.accounts import AccountBook, accounts_path

    if accounts is not None and data_dir is not None:
        raise fail("give --accounts or --data-dir, not both")
    if accounts is not None:
        return AccountBook(accounts)
    return AccountBook(accounts_path(load(config).bridge, data_dir))


def _roles(names: list[str]) -> list[Role]:
    from chain_bridge.console.accounts import Role

    known = {r.value for r in Role}
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise fail(f"--role must be one of: {', '.join(sorted(known))} (repeat it to give several)"
                   + (f"; got {', '.join(map(repr, unknown))}" if unknown else ""))
    return [Role(n) for n in names]


def _password(from_stdin: bool) -> str:
    from chain_bridge.console.accounts import AccountError, check_password

    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt="Repeat the password")
    try:
        return check_password(password)
    except AccountError as exc:
        raise fail(str(exc)) from None


@user_app.command("add", epilog=example("carechain console user add alice --role operator",
                                        "carechain console user add pat --role privacy_officer --password-stdin "
                                        "< pw.txt"))
def user_add(name: NameArg, role: RolesOpt, config: ConfigOpt = None, data_dir: DataDirOpt = None,
             accounts: AccountsOpt = None, password_stdin: StdinOpt = False) -> None:
    """Create an account with one or more roles; asks for its password (at least 12 characters) twice."""
    from chain_bridge.console.accounts import AccountError, check_name

    book = _book(config, data_dir, accounts)
    roles = _roles(role)
    try:
        check_name(name)
        book.add(name, _password(password_stdin), roles)
    except AccountError as exc:
        raise fail(str(exc)) from None
    out.print(f"added console account {name} ({', '.join(sorted(roles))}) in {book.path}", soft_wrap=True,
              markup=False, highlight=False)


@user_app.command("passwd", epilog=example("carechain console user passwd alice"))
def user_passwd(name: NameArg, config: ConfigOpt = None, data_dir: DataDirOpt = None, accounts: AccountsOpt = None,
                password_stdin: StdinOpt = False) -> None:
    """Set a new password; the account's open console sessions end."""
    from chain_bridge.console.accounts import AccountError

    book = _book(config, data_dir, accounts)
    try:
        if book.current(name) is None:  # before asking for a password that would be thrown away
            raise AccountError(f"no console account {name!r} in {book.path}; `carechain console user list` shows "
                               "them")
        book.set_password(name, _password(password_stdin))
    except AccountError as exc:
        raise fail(str(exc)) from None
    out.print(f"new password for console account {name}; its open sessions end", soft_wrap=True, markup=False,
              highlight=False)


@user_app.command("roles", epilog=example("carechain console user roles bob --role operator "
                                          "--role privacy_officer"))
def user_roles(name: NameArg, role: RolesOpt, config: ConfigOpt = None, data_dir: DataDirOpt = None,
               accounts: AccountsOpt = None) -> None:
    """Replace an account's roles; its open console sessions end."""
    from chain_bridge.console.accounts import AccountError

    book = _book(config, data_dir, accounts)
    roles = _roles(role)
    try:
        book.set_roles(name, roles)
    except AccountError as exc:
        raise fail(str(exc)) from None
    out.print(f"console account {name} now has roles: {', '.join(sorted(roles))}; its open sessions end",
              soft_wrap=True, markup=False, highlight=False)


@user_app.command("remove", epilog=example("carechain console user remove alice"))
def user_remove(name: NameArg, config: ConfigOpt = None, data_dir: DataDirOpt = None,
                accounts: AccountsOpt = None) -> None:
    """Delete an account; its open console sessions end at their next request."""
    from chain_bridge.console.accounts import AccountError

    book = _book(config, data_dir, accounts)
    try:
        book.remove(name)
    except AccountError as exc:
        raise fail(str(exc)) from None
    out.print(f"removed console account {name}", soft_wrap=True, markup=False, highlight=False)


@user_app.command("list", epilog=example("carechain console user list", "carechain console user list --json"))
def user_list(config: ConfigOpt = None, data_dir: DataDirOpt = None, accounts: AccountsOpt = None,
              as_json: JsonOpt = False) -> None:
    """Every account and its roles (never a password or hash)."""
    from chain_bridge.console.accounts import AccountError

    book = _book(config, data_dir, accounts)
    try:
        users = book.list()
    except AccountError as exc:
        raise fail(str(exc)) from None
    if as_json:
        print(json.dumps({"accounts_file": str(book.path),
                          "users": [{"name": name, "roles": sorted(roles)} for name, roles in users]}), flush=True)
        return
    if not users:
        out.print(f"no console accounts in {book.path}; add one with `carechain console user add NAME --role "
                  "operator`", soft_wrap=True, markup=False, highlight=False)
        return
    width = max(len(name) for name, _ in users)
    out.print("\n".join(f"{name:<{width}}  {', '.join(sorted(roles))}" for name, roles in users), soft_wrap=True,
              markup=False, highlight=False)
