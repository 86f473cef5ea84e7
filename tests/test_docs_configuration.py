"""docs/configuration.md is generated from the pydantic models in carechain/config.py and cannot drift.

When this fails, the models changed (a key, a default, a limit, a description): regenerate the page with
`python -m carechain.config_reference > docs/configuration.md` and commit it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

from carechain import config_reference
from carechain.config import Config, load_config

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
REGENERATE = "regenerate it: python -m carechain.config_reference > docs/configuration.md"


def test_the_configuration_page_is_what_the_models_generate() -> None:
    assert DOC.read_text() == config_reference.render(), f"docs/configuration.md is out of date; {REGENERATE}"


def test_the_documented_regeneration_command_prints_the_page(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "carechain.config_reference"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == DOC.read_text()


def _documented_keys() -> dict[str, list[str]]:
    """Section path (`bridge.limits`, `agent.devices[]`) → the keys its table lists."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in DOC.read_text().splitlines():
        if heading := re.fullmatch(r"## `([\w.\[\]]+)`", line):
            current = sections.setdefault(heading.group(1), [])
        elif current is not None and (row := re.match(r"\| `(\w+)` \|", line)):
            current.append(row.group(1))
    return sections


def test_every_key_of_the_loader_is_documented_and_every_documented_key_loads(tmp_path: Path) -> None:
    documented = _documented_keys()
    assert set(documented) >= {"broker", "bridge", "bridge.limits", "agent", "agent.devices[]", "miner"}
    defaults = Config().model_dump(mode="json")
    for section in ("broker", "bridge", "agent", "miner"):
        assert documented[section] == list(defaults[section]), section
        # Each documented key, written with its default value, is accepted by the loader as is.
        path = tmp_path / f"{section}.yaml"
        path.write_text(yaml.safe_dump({section: defaults[section]}))
        assert load_config(path, env={}).model_dump(mode="json")[section] == defaults[section]
