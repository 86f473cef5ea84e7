"""`carechain demo --http`: the console, /metrics and /healthz are served while the demo runs and after it, with a
login made for the run and shown once on the terminal, until Ctrl-C ends it cleanly."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from simulators.mosquitto import REPO
from simulators.ports import free_port


def _lines(stream: object, into: list[str]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        into.append(line)


def test_demo_http_serves_the_console_during_and_after_the_run_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "carechain.cli", "demo", "--json", "--http", f"127.0.0.1:{port}", "--seconds", "2",
         "--skip", "market", "--skip", "trial", "--data-dir", str(tmp_path / "demo")],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    out: list[str] = []
    err: list[str] = []
    readers = [threading.Thread(target=_lines, args=(proc.stdout, out), daemon=True),
               threading.Thread(target=_lines, args=(proc.stderr, err), daemon=True)]
    for r in readers:
        r.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        login = None
        while time.monotonic() < deadline and proc.poll() is None:
            login = login or re.search(r"user (\S+)\s+password (\S+)", "".join(err))
            if login and out:  # the summary is out: the demo is done and the console holds
                break
            time.sleep(0.2)
        assert proc.poll() is None, "".join(err)[-3000:]
        assert login, "".join(err)[-3000:]
        summary = json.loads(out[-1])
        assert summary["proof_verified"] is True
        assert "password" not in out[-1] and login.group(2) not in "".join(out)  # JSON on stdout only
        with httpx.Client(base_url=base, timeout=10) as client:
            assert client.get("/healthz").text == "ok"
            metrics = client.get("/metrics").text
            anchored = re.search(r'^carechain_bridge_events_total\{outcome="anchored"\} (\S+)$', metrics, re.M)
            assert anchored and float(anchored.group(1)) == summary["anchored"], metrics[:2000]
            form = client.get("/login")
            token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
            assert token
            done = client.post("/login", data={"user": login.group(1), "password": login.group(2),
                                               "csrf_token": token.group(1)})
            assert done.status_code == 303, done.text[:500]
            fleet = client.get("/fleet")
            assert fleet.status_code == 200 and "Devices registered" in fleet.text
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0, "".join(err)[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    for r in readers:
        r.join(5)
    assert (tmp_path / "demo" / "bridge" / "ledger.db").exists()  # --data-dir: the demo's data stays
