"""What every command group shares: the consoles, the common options, errors and config loading.

Command modules import these by name (`from carechain.cli._options import ConfigOpt, fail, …`). Nothing
here knows a party: assembling a bridge, an agent or a miner from config is their packages' `assembly`.
"""

from __future__ import annotations

import enum
import logging
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from pythonjsonlogger.json import JsonFormatter
from rich.console import Console
from rich.markup import escape

from carechain.config import BrokerConfig, Config, ConfigError, Override, load_config, parse_address

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from carechain.health_http import HealthServer

console = Console(stderr=True)  # progress, warnings and errors
out = Console()  # results, for the user or a script

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML or TOML config file.",
                                                envvar="CARECHAIN_CONFIG")]
BrokerOpt = Annotated[str | None, typer.Option("--broker", help="MQTT broker HOST:PORT (overrides config).")]
DataDirOpt = Annotated[Path | None, typer.Option("--data-dir", help="Bridge data directory (ledger, log key).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Log every decision (INFO).")]
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", metavar="KEY=VALUE", help="Set one config key, e.g. bridge.batch_max=500 (lists and maps as JSON); "
    "repeatable; wins over the file and CARECHAIN_* variables. Never a password: use broker.password_file.")]


class LogFormat(enum.StrEnum):
    """How log records are written on stderr."""

    text = "text"  # for a person at a terminal
    json = "json"  # one JSON object per line, for journald, Loki, Elasticsearch...


LogFormatOpt = Annotated[LogFormat, typer.Option("--log-format", envvar="CARECHAIN_LOG_FORMAT", case_sensitive=False,
                                                 help="Log records as `text` lines or `json` objects, one a line.")]

T = TypeVar("T")


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print `error: message` on stderr; the caller raises the returned Exit (2: usage/config, 1: failed)."""
    # soft_wrap: never fold a file path or a hex key across lines, whatever the terminal width
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    return typer.Exit(code)


def example(*lines: str) -> str:
    """A help epilog with example command lines (rich markup off: shown as typed)."""
    return "Example:\n\n" + "\n\n".join(f"  $ {escape(line)}" for line in lines)


def load(path: Path | None, broker: str | None = None, overrides: Sequence[str] | None = None) -> Config:
    """The settings: defaults, the config file, the environment, then the flags (`--set KEY=VALUE` in `overrides`,
    then `--broker HOST:PORT`); a bad one exits 2 with the key and the file, variable or flag that set it."""
    try:
        flags = [Override.parse(text) for text in overrides or ()]
        if broker:
            host, port = parse_address(broker)
            flags += [Override("broker.host", host, "--broker"), Override("broker.port", str(port), "--broker")]
        return load_config(path, overrides=flags)
    except ConfigError as exc:
        raise fail(str(exc)) from None


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


# Extra fields a careless `log.info(..., extra={...})` could fill with a secret; their values are never written.
_SECRET_FIELD = re.compile(r"pass(word|phrase)?|secret|token|credential|private|api_?key", re.IGNORECASE)


class JsonLogFormatter(JsonFormatter):
    """One JSON object per record: `ts` (ISO 8601, UTC, milliseconds), `level`, `logger`, `message`, then
    `exc_info` (the traceback, as one string) and any `extra` fields; an extra field named like a secret
    (password, token, ...) is written as "[redacted]"."""

    def __init__(self) -> None:
        super().__init__(["levelname", "name", "message"], rename_fields={"levelname": "level", "name": "logger"})

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        log_data["ts"] = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        super().add_fields(log_data, record, message_dict)
        for key in log_data:
            if _SECRET_FIELD.search(key):
                log_data[key] = "[redacted]"


def setup_logging(verbose: bool, log_format: LogFormat | str = LogFormat.text) -> None:
    """Log WARNING and above (INFO with `verbose`) to stderr, as text lines or one JSON object per line."""
    handler = logging.StreamHandler()
    if LogFormat(log_format) is LogFormat.json:
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler])


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


def serve_health(setting: str, listen: str, registry: CollectorRegistry,
                 ready: Callable[[], tuple[bool, str]]) -> HealthServer:
    """/metrics, /healthz and /readyz on `listen` (the party's `setting`, e.g. agent.metrics_listen), started;
    exits with the reason if it cannot listen."""
    from carechain.health_http import HealthServer, ListenError

    try:
        health = HealthServer.from_listen(listen, registry, ready)
        health.start()
    except (ValueError, ListenError) as exc:
        raise fail(f"{setting}: {exc}") from None
    party = setting.split(".", 1)[0]
    console.print(f"{party}: metrics and health on http://{health.address}/metrics, /healthz, /readyz",
                  highlight=False, soft_wrap=True)
    return health


# -- times and durations on the command line -------------------------------------------------------------

_DURATION = re.compile(r"^(\d+)(ms|s|m|h|d)$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def now_ms() -> int:
    return int(time.time() * 1000)


def is_duration(text: str) -> bool:
    """Whether `text` reads as a duration (90s, 15m, 1h, 30d) rather than a time."""
    return _DURATION.match(text.strip()) is not None


def parse_duration_ms(text: str, what: str) -> int:
    m = _DURATION.match(text.strip())
    if not m:
        raise fail(f"{what} {text!r} must be a duration like 90s, 15m, 1h or 30d")
    return int(m.group(1)) * _UNIT_MS[m.group(2)]


def parse_time_ms(text: str, what: str) -> int:
    """Epoch milliseconds, or an ISO 8601 date/time (UTC unless it says otherwise), or `now`."""
    text = text.strip()
    if text == "now":
        return now_ms()
    if text.isdigit():
        return int(text)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise fail(f"{what} {text!r} must be epoch milliseconds, an ISO 8601 time (2026-12-01T08:00Z) or now") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


def parse_when_ms(text: str, what: str, now: int, *, back: bool = False) -> int:
    """A duration from `now` (ahead; with `back`, before it), or a time (`parse_time_ms`)."""
    if is_duration(text):
        return now - parse_duration_ms(text, what) if back else now + parse_duration_ms(text, what)
    return parse_time_ms(text, what)


class Progress:
    """Progress on stderr for long work in phases (pages, then records); silent for short work and when quiet."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self._last = 0.0

    def __call__(self, phase: str, done: int, total: int) -> None:
        now = time.monotonic()
        if self.quiet or (now - self._last < 0.5 and done < total):
            return
        self._last = now
        console.print(f"\r{phase}: {done}/{total}", end="", highlight=False)

    def done(self) -> None:
        if self._last and not self.quiet:
            console.print()
