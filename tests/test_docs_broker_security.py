"""docs/broker-security.md's step-by-step commands work as written, and the broker they set up behaves as
the page says: the block after `<!-- snippet: generate -->` runs in bash in an empty folder, then the
shipped template runs with its output and refuses an anonymous client with the message the page shows."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from carechain.config import BrokerConfig
from carechain.credentials import load_mqtt_credentials
from simulators.mosquitto import Mosquitto, mosquitto_binary
from simulators.ports import free_port
from tests.locked_broker import render_template
from tests.test_tls import connects

DOC = Path(__file__).resolve().parent.parent / "docs" / "broker-security.md"


def snippet(name: str) -> str:
    found = re.search(rf"<!-- snippet: {re.escape(name)} -->\n```bash\n(.*?)^```", DOC.read_text(),
                      re.DOTALL | re.MULTILINE)
    assert found, f"{DOC.name} has no snippet {name}"
    return found.group(1)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("doc")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("CARECHAIN_CONFIG", None)
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", snippet("generate")], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return folder


def test_the_generate_steps_leave_the_files_the_page_lists(generated: Path) -> None:
    files = generated / "broker-files"
    private = [files / "passwd", files / "acl", files / "server.key", files / "bridge.json",
               generated / "carechain-data" / "bridge" / "broker" / "credentials.json", generated / "ca" / "ca.key",
               *(files / "devices").glob("*.json")]
    assert len(private) == 8  # with two devices
    assert {p: stat.S_IMODE(p.stat().st_mode) for p in private} == {p: 0o600 for p in private}
    for public in ("ca.crt", "server.crt"):
        assert (files / public).exists()


@pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")
def test_the_broker_they_set_up_lets_devices_in_over_tls_and_refuses_anonymous_clients(generated: Path) -> None:
    tls_port = free_port()
    conf = render_template(generated / "broker-files", tls_port)
    with Mosquitto(generated / "mosquitto", conf=conf, wait_ports=(tls_port,)):
        device_file = next((generated / "broker-files" / "devices").glob("*.json"))
        login = load_mqtt_credentials(device_file)
        broker = BrokerConfig(host="127.0.0.1", port=tls_port, tls_ca=generated / "ca" / "ca.crt",
                              username=login.username, password=login.password)
        assert connects(broker)
        if shutil.which("mosquitto_sub"):
            shown = re.search(r"\$ (mosquitto_sub .*)\n(.*)\n", DOC.read_text())
            assert shown, "the page shows a mosquitto_sub check"
            args = shlex.split(shown.group(1).replace("broker.example.org", "127.0.0.1").replace("8883", str(tls_port)))
            done = subprocess.run([*args, "-W", "5"], cwd=generated, capture_output=True, text=True, timeout=20)
            assert done.returncode != 0
            assert done.stderr.strip() == shown.group(2)
