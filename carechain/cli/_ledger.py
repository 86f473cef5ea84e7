"""Helpers of the commands that write contract entries to the ledger on the bridge host (contracts, store)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from carechain.cli._options import bridge_dir, console, fail, load, out, resolved_broker
from carechain.cli._options import now_ms as now_ms  # where the commands have always imported it from


def deployment_genesis(cfg: Any, data_dir: Path) -> Any:
    """The contract genesis of the bridge data dir (written on first use); a bad one exits 2."""
    from chain_bridge.registry import contract_genesis

    try:
        return contract_genesis(data_dir, cfg.bridge.genesis_allocations or None, cfg.bridge.operator_keys)
    except ValueError as exc:
        raise fail(str(exc)) from None


def load_key(path: Path) -> Any:
    """The acting party's key file; a missing or unsafe one exits 2."""
    from carechain.identity import Identity, KeyFileError

    try:
        return Identity.load(path)
    except KeyFileError as exc:
        raise fail(str(exc)) from None


def open_bridge_ledger(cfg: Any, data_dir: Path, *, missing: str | None = None) -> Any:
    """The bridge's ledger where `bridge.store` says (DATA_DIR/ledger.db, or the PostgreSQL database).

    A damaged or unreachable store is a one-line error and exit code 1. With `missing` (what to do instead),
    a SQLite ledger that does not exist yet is an error (exit 2) rather than a new, empty one.
    """
    from carechain.sqlite_store import StoreError
    from chain_bridge.ledger.sql import SqliteLocation
    from chain_bridge.ledger.store import open_ledger, store_location

    location = store_location(cfg.bridge, data_dir)
    if missing is not None and isinstance(location, SqliteLocation) and not location.path.exists():
        raise fail(f"no ledger at {location.path}: {missing}")
    try:
        return open_ledger(cfg.bridge, data_dir, role="carechain cli")
    except StoreError as exc:
        raise fail(str(exc), 1) from None


def submit(config: Path | None, data_dir: Path | None, entry: Any) -> int:
    """Check `entry` against a replay of the ledger and append it; its leaf index (exit 1 if refused)."""
    return submit_all(config, data_dir, [entry])[0]


def submit_all(config: Path | None, data_dir: Path | None, entries: list[Any]) -> list[int]:
    """Check `entries` in order against a replay of the ledger, then append them all or none (exit 1 if any
    is refused); their leaf indexes."""
    from chain_bridge.contract_admin import ContractRefused, submit
    from chain_bridge.registry import operator_key

    cfg = load(config)
    bdir = bridge_dir(cfg, data_dir)
    genesis = deployment_genesis(cfg, bdir)
    ledger = open_bridge_ledger(cfg, bdir)
    try:
        return submit(ledger, genesis, entries, clock=operator_key(bdir))
    except ContractRefused as exc:
        raise fail(f"{exc} (nothing appended)", 1) from None
    finally:
        ledger.close()


def replay(config: Path | None, data_dir: Path | None) -> Any:
    from chain_bridge.contract_admin import replay_ledger

    cfg = load(config)
    bdir = bridge_dir(cfg, data_dir)
    ledger = open_bridge_ledger(cfg, bdir, missing="use --data-dir: the bridge's data directory")
    genesis = deployment_genesis(cfg, bdir)
    try:
        return replay_ledger(ledger, genesis)
    finally:
        ledger.close()


def print_result(data: dict[str, Any], as_json: bool) -> None:
    if as_json:
        out.print_json(data=data)
    else:
        width = max(len(k) for k in data)
        out.print("\n".join(f"{k:<{width}}  {v}" for k, v in data.items()), soft_wrap=True, markup=False,
                       highlight=False)


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except OSError as exc:
        raise fail(f"{path}: cannot read {what}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise fail(f"{path}: {what} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise fail(f"{path}: {what} must be a JSON object")
    return raw


def load_pre_key(path: Path) -> Any:
    """A party's re-encryption key file (`carechain keys new --pre`), or exit with why not."""
    from carechain.identity import KeyFileError
    from carechain.reencryption import PreKey

    try:
        return PreKey.load(path)
    except KeyFileError as exc:
        raise fail(str(exc)) from None


def final_note(path: Path | None, config: Path | None, broker: str | None) -> str:
    """A final checkpoint note: from `path` when given, else the latest the broker holds (retained)."""
    if path is not None:
        try:
            return path.read_text()
        except OSError as exc:
            raise fail(f"{path}: cannot read the checkpoint: {exc.strerror}") from None
    from record_access.client import AccessClientError, fetch_final_checkpoint

    try:
        return fetch_final_checkpoint(resolved_broker(load(config, broker)))
    except AccessClientError as exc:
        raise fail(str(exc), 1) from None


def submit_faults(config: Path | None, data_dir: Path | None, entries: list[Any]) -> list[int]:
    """Append the access.fault entries when the bridge's data dir is here; refused ones are only warned about."""
    from chain_bridge import contract_admin

    if not entries:
        return []
    cfg = load(config)
    bdir = bridge_dir(cfg, data_dir)
    ledger = open_bridge_ledger(cfg, bdir)
    leaves: list[int] = []
    try:
        for entry in entries:
            try:
                leaves += contract_admin.submit(ledger, deployment_genesis(cfg, bdir), [entry])
            except contract_admin.ContractRefused as exc:
                console.print(f"[yellow]warning:[/] {exc}", soft_wrap=True)
    finally:
        ledger.close()
    return leaves
