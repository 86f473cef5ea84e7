"""What an install holds and needs: the agent runs without the extras, data files ship as package data, and the
protocol reads the same with cbor2 5 and 6 (`.ci/run` runs this file in a venv with cbor2 6 and no pycose)."""

from __future__ import annotations

import fnmatch
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from carechain import cbor, envelope
from carechain.events import make_payload
from carechain.identity import Identity

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PRODUCT = ["carechain", "edge_agent", "chain_bridge", "chain_miner", "contract_rules", "device_profiles"]
EXTRAS_ONLY = ["amqtt", "bumble", "zfec", "psycopg"]  # the demo's broker, virtual BLE, erasure coding, PostgreSQL
# Modules that exist only for an extra: no other module may import them at import time (checked below, with the
# extra's package blocked), and their extra must name what they import.
EXTRA_MODULES = {"chain_bridge.ledger.postgres": ("postgresql", "psycopg"),
                 "chain_bridge.lease": ("postgresql", "psycopg")}

DEVICE = Identity.from_seed(bytes(range(32)))


def test_every_product_module_imports_without_amqtt_bumble_or_zfec() -> None:
    # An agent (or a bridge beside a real broker) installed without the extras must run: no product module
    # may import amqtt, bumble or zfec at import time (the embedded broker, `demo --ble` and erasure coding
    # import them when used). Run in a fresh interpreter where those imports fail.
    code = f"""
import importlib, pkgutil, sys
for name in {EXTRAS_ONLY!r}:
    sys.modules[name] = None  # `import name` now raises ImportError
failed = []
for top in {PRODUCT!r}:
    package = importlib.import_module(top)
    for info in pkgutil.walk_packages(package.__path__, top + "."):
        if info.name.endswith(".__main__") or info.name in {sorted(EXTRA_MODULES)!r}:  # the CLI; extra-only
            continue
        try:
            importlib.import_module(info.name)
        except ImportError as exc:
            failed.append(f"{{info.name}}: {{exc}}")
print("\\n".join(failed))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"modules that need an extra at import time:\n{done.stdout}"


def test_each_extra_only_module_is_covered_by_its_extra() -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]
    for module, (extra, package) in EXTRA_MODULES.items():
        assert package in {_name(req) for req in extras[extra]}, f"{module} needs {package}, not in [{extra}]"
        source = (ROOT / (module.replace(".", "/") + ".py")).read_text(encoding="utf-8")
        assert f"import {package}" in source  # the reason it is listed at all


def test_the_agent_dependencies_leave_the_extras_out() -> None:
    names = {_name(req) for req in PYPROJECT["project"]["dependencies"]}
    assert not names & {"bumble", "zfec"}
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert {_name(req) for req in extras["storage"]} == {"zfec"}
    assert {_name(req) for req in extras["ble-sim"]} == {"bumble"}
    assert {_name(req) for req in extras["anchor"]} == {"web3"}
    assert {_name(req) for req in extras["postgresql"]} == {"psycopg"}
    assert not names & {"web3", "psycopg"}  # only a bridge that anchors on a chain / shares a PostgreSQL log
    assert "carechain[storage,ble-sim,anchor,postgresql]" in extras["test"]  # the tests exercise all four


def _name(requirement: str) -> str:
    return requirement.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].strip().lower()


def test_every_data_file_in_a_product_package_ships_as_package_data() -> None:
    # A file the code reads at run time (profiles, broker configs, the systemd unit) must be package data,
    # or `pip install .` (not -e) installs a program that fails when it looks for it.
    package_data: dict[str, list[str]] = PYPROJECT["tool"]["setuptools"]["package-data"]
    missing = []
    for top in [*PRODUCT, "simulators"]:
        for path in sorted((ROOT / top).rglob("*")):
            if not path.is_file() or path.suffix in {".py", ".pyc"} or "__pycache__" in path.parts:
                continue
            rel = path.relative_to(ROOT / top).as_posix()
            if not any(fnmatch.fnmatch(rel, pattern) for pattern in package_data.get(top, [])):
                missing.append(f"{top}/{rel}")
    assert missing == [], f"add to [tool.setuptools.package-data] in pyproject.toml: {missing}"


def test_profiles_are_a_package_that_setuptools_installs() -> None:
    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    assert any(fnmatch.fnmatch("device_profiles", pattern) for pattern in include)
    assert (ROOT / "device_profiles" / "__init__.py").is_file()


# -- the protocol with either cbor2 major version -------------------------------------------------------------


def _event(seq: int = 1) -> dict[str, object]:
    return make_payload(DEVICE.device_id, seq, 1_700_000_000_000, "heart_rate", {"bpm": 72})


def test_an_envelope_round_trips() -> None:
    msg = envelope.parse(envelope.sign(DEVICE, _event()))
    assert msg.verify(DEVICE.public_key)
    assert msg.payload == _event()


def _sign1(protected: bytes, unprotected: object, payload: bytes) -> bytes:
    return cbor.encode(cbor.CBORTag(envelope.COSE_SIGN1_TAG, [protected, unprotected, payload, bytes(64)]))


@pytest.mark.parametrize(
    ("header", "unprotected", "reason"),
    [
        ({1: -7, 4: b"abc"}, {}, "bad_alg"),
        ({1: -8, 4: b"abc", 7: 1}, {}, "bad_header"),
        # Not the layout `sign` writes: the decoding path, where cbor2 6 returns the tagged array as a tuple
        # and the unprotected map as a frozendict, must still name the reason (not "not_cose_sign1").
        ({1: -8, 4: b"abc"}, {5: b"x"}, "bad_header"),
    ],
)
def test_envelope_rejections_name_the_reason(header: dict[int, object], unprotected: object, reason: str) -> None:
    data = _sign1(cbor.encode(header), unprotected, cbor.encode(_event()))
    with pytest.raises(envelope.EnvelopeError) as info:
        envelope.parse(data)
    assert info.value.reason == reason


def test_a_long_form_length_is_refused_as_not_deterministic() -> None:
    # The same envelope with the payload's length in a 2-byte head: the general (decoding) path must read it
    # as a COSE_Sign1 and refuse it as malformed, whichever cbor2 decoded it.
    data = envelope.sign(DEVICE, _event())
    protected = cbor.encode({1: -8, 4: DEVICE.device_id.encode()})
    payload = cbor.encode(_event())
    assert len(payload) < 256
    head = bytes([0xD2, 0x84]) + cbor.bstr_header(len(protected)) + protected + b"\xa0"
    assert data.startswith(head + cbor.bstr_header(len(payload)) + payload)
    long_form = head + bytes([0x59]) + len(payload).to_bytes(2, "big") + data[len(head) + 2:]
    with pytest.raises(envelope.EnvelopeError) as info:
        envelope.parse(long_form)
    assert info.value.reason == "malformed"


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    # What a contributor is told to run is what CI runs (from a copy under a path with "new" and spaces).
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    commands = [line.strip() for line in readme.splitlines() if ".venv/bin/pytest" in line]
    assert commands, "the README shows no test command"
    for command in commands:
        assert command in ci, f"the README's {command!r} is not in .ci/run"


def test_demo_ble_without_bumble_names_the_extra() -> None:
    code = """
import sys
sys.modules["bumble"] = None  # as on an install without the ble-sim extra
from carechain.cli import app
app(["demo", "--ble", "--json"], prog_name="carechain")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "carechain[ble-sim]" in done.stderr and "Traceback" not in done.stderr
