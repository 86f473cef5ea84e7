"""`--log-format json` (or CARECHAIN_LOG_FORMAT=json): one JSON object per log record, and no secret in any.

Each case runs a real process (logging is process-wide state) with a command declared with the shared
options, as the party commands declare them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.conftest import TestBroker


REPO = Path(__file__).resolve().parent.parent
PASSWORD = "Sup3r-s3cret-broker-pw"

# A command with the shared options: it loads the config, connects to the broker with its login, and logs
# what a careless caller might (the whole config, the broker section, an extra field named password, an error).
COMMAND = """
import logging, threading
import typer
from carechain.cli._options import BrokerOpt, LogFormatOpt, VerboseOpt, load, setup_logging
from carechain.transport import connect_client

def main(broker: BrokerOpt = None, verbose: VerboseOpt = False, log_format: LogFormatOpt = "text",
         connect: bool = False) -> None:
    setup_logging(verbose, log_format)
    cfg = load(None, broker)
    log = logging.getLogger("carechain.check")
    log.info("loaded %s", cfg, extra={"device": "dev-1", "seq": 7, "broker": cfg.broker,
                                      "password": cfg.broker.password})
    if connect:
        up = threading.Event()
        client = connect_client(cfg.broker, "log-format-check", connected=up)
        assert up.wait(20), "not connected"
        paho = logging.getLogger("paho")
        paho.setLevel(logging.DEBUG)
        client.enable_logger(paho)
        client.disconnect()
        client.loop_stop()
        log.info("connected to %s as %s", cfg.broker.address, cfg.broker.username)
    try:
        raise RuntimeError("the ledger is on fire")
    except RuntimeError:
        log.exception("failed while checking %s", cfg.broker)

typer.run(main)
"""


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("CARECHAIN_")}
    return subprocess.run([sys.executable, "-c", COMMAND, *args], capture_output=True, text=True, timeout=60,
                          env={**clean, "PYTHONPATH": str(REPO), "TZ": "Pacific/Auckland", "COLUMNS": "200",
                               **(env or {})})


def records(stderr: str) -> list[dict[str, object]]:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines, "nothing logged"
    return [json.loads(line) for line in lines]  # every line is one JSON object


def test_json_logs_are_one_object_per_line_with_utc_time_level_logger_message_extras_and_traceback() -> None:
    done = run("--verbose", "--log-format", "json", env={"CARECHAIN_BROKER_USERNAME": "bridge"})
    assert done.returncode == 0, done.stderr
    loaded, failed = records(done.stderr)
    assert list(loaded)[:4] == ["ts", "level", "logger", "message"]
    assert (loaded["level"], loaded["logger"], loaded["device"], loaded["seq"]) == ("INFO", "carechain.check",
                                                                                     "dev-1", 7)
    assert str(loaded["message"]).startswith("loaded broker=BrokerConfig(host='127.0.0.1'")
    ts = str(loaded["ts"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", ts), ts  # milliseconds, UTC whatever TZ
    assert datetime.fromisoformat(ts).utcoffset() == timedelta(0)
    assert failed["level"] == "ERROR"
    assert str(failed["exc_info"]).startswith("Traceback (most recent call last)")
    assert str(failed["exc_info"]).endswith("RuntimeError: the ledger is on fire")


def test_the_format_comes_from_the_environment_and_text_stays_the_default() -> None:
    by_env = run("--verbose", env={"CARECHAIN_LOG_FORMAT": "json"})
    assert by_env.returncode == 0, by_env.stderr
    assert [r["level"] for r in records(by_env.stderr)] == ["INFO", "ERROR"]
    text = run("--verbose")
    assert text.returncode == 0, text.stderr
    assert re.search(r"^\S+ \S+ INFO carechain.check: loaded broker=", text.stderr, re.MULTILINE), text.stderr
    refused = run("--log-format", "xml")
    assert refused.returncode == 2 and "'xml' is not one of" in refused.stderr


@pytest.mark.integration
@pytest.mark.parametrize("log_format", ["json", "text"])
def test_a_broker_password_never_reaches_a_log_record(broker: TestBroker, log_format: str) -> None:
    done = run("--verbose", "--log-format", log_format, "--connect", "--broker", f"{broker.host}:{broker.port}",
               env={"CARECHAIN_BROKER_USERNAME": "bridge", "CARECHAIN_BROKER_PASSWORD": PASSWORD})
    assert done.returncode == 0, done.stderr
    assert "connected to" in done.stderr and "Sending DISCONNECT" in done.stderr  # paho's records are there too
    assert PASSWORD not in done.stderr
    if log_format == "json":
        assert any(r.get("password") == "[redacted]" for r in records(done.stderr))
