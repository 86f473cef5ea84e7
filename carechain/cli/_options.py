"""What every command group shares: the consoles, the common options, errors and config loading.

Command modules import these by name (`from carechain.cli._options import ConfigOpt, fail, …`). Nothing
here knows a party: assembling a bridge, an agent or a miner from config is their packages' `assembly`.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from carechain.config import BrokerConfig, Config, ConfigError, load_config, parse_address

console = Console(stderr=True)  # progress, warnings and errors
out = Console()  # results, for the user or a script

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML or TOML config file.",
                                                envvar="CARECHAIN_CONFIG")]
BrokerOpt = Annotated[str | None, typer.Option("--broker", help="MQTT broker HOST:PORT (overrides config).")]
DataDirOpt = Annotated[Path | None, typer.Option("--data-dir", help="Bridge data directory (ledger, log key).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Log every decision (INFO).")]

T = TypeVar("T")


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print `error: message` on stderr; the caller raises the returned Exit (2: usage/config, 1: failed)."""
    # soft_wrap: never fold a file path or a hex key across lines, whatever the terminal width
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    return typer.Exit(code)


def example(*lines: str) -> str:
    """A help epilog with example command lines (rich markup off: shown as typed)."""
    return "Example:\n\n" + "\n\n".join(f"  $ {escape(line)}" for line in lines)


def load(path: Path | None, broker: str | None = None) -> Config:
    """The config file (or defaults and environment), with --broker applied; a bad one exits 2."""
    try:
        cfg = load_config(path)
        if broker:
            cfg.broker.host, cfg.broker.port = parse_address(broker)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    return cfg


def bridge_dir(cfg: Config, data_dir: Path | None) -> Path:
    return data_dir or cfg.bridge.data_dir


def open_store(opener: Callable[..., T], path: Path, *args: Any) -> T:
    """Open a ledger or an outbox; a damaged or unreadable file is a one-line error and exit code 1."""
    from carechain.sqlite_store import StoreError

    try:
        return opener(path, *args)
    except StoreError as exc:
        raise fail(str(exc), 1) from None


def check_broker_tls(cfg: Config) -> None:
    """Check the broker's TLS files before connecting, so a bad one is an error now, not a retry loop.
    (The login in broker.credentials_file is read by each party's assembly: `resolve_broker_login`.)"""
    from carechain.transport import tls_context

    b = cfg.broker
    if b.tls_ca is not None:
        try:
            tls_context(b)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise fail(f"broker TLS settings (tls_ca {b.tls_ca}, tls_cert {b.tls_cert}, tls_key {b.tls_key}): "
                       f"{exc}") from None
    elif b.tls_cert is not None:
        raise fail("broker.tls_cert is set but broker.tls_ca is not: TLS needs the CA that signed the broker")


def resolved_broker(cfg: Config) -> BrokerConfig:
    """For a command that connects without a party's assembly (`carechain store`): the broker settings with
    their login resolved and TLS checked; a bad credentials or TLS file exits 2."""
    from carechain.credentials import CredentialsError, resolve_broker_login

    check_broker_tls(cfg)
    try:
        return resolve_broker_login(cfg.broker)
    except CredentialsError as exc:
        raise fail(str(exc)) from None


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


class StopSignal:
    """SIGINT/SIGTERM set an event instead of raising KeyboardInterrupt mid-work: install it first thing
    in a long-running command, so that a signal during start-up also ends in a clean, quiet shutdown."""

    def __init__(self) -> None:
        self.event = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.event.set())

    def wait(self) -> None:
        while not self.event.wait(0.5):
            pass

    def is_set(self) -> bool:
        return self.event.is_set()

    @contextmanager
    def children_ignore_sigint(self) -> Iterator[None]:
        """Processes spawned inside inherit an ignored SIGINT: a Ctrl-C in the terminal reaches the whole
        process group, and the parent, not each worker, decides how they stop (no worker tracebacks).
        (Blocking SIGINT instead would not do: the spawned interpreter starts with an empty signal mask.)
        A SIGINT in the few milliseconds of the spawn is lost; SIGTERM never is."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, lambda *_: self.event.set())

    def wait_for(self, ready: Callable[[float], bool], timeout: float) -> bool:
        """`ready(step)` (e.g. `bridge.wait_ready`) until it is true, `timeout` passes or a signal arrives."""
        deadline = time.monotonic() + timeout
        while not self.event.is_set() and (left := deadline - time.monotonic()) > 0:
            if ready(min(left, 0.5)):
                return True
        return False
