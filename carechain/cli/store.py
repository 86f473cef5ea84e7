"""`carechain store put|get|update|status|audit|repair|commit|settle`: datasets on the storage miners.

put/get/update/status/audit/repair run on the owner's machine; commit and settle write to the ledger on the
bridge host.

The manifest (`FILE.manifest.json`) and the dataset key (`FILE.manifest.key`) are written with mode 0600
before any share leaves the machine (docs/storage.md). Miners are named with `--miners ID,ID,…` or
discovered from their retained `cc/v1/store/{id}/hello`; the placement seed is `--seed HEX` or that of the
final checkpoint retained on the broker. The work is chain_bridge.storage_client's; this module parses
arguments and prints.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from carechain.cli._ledger import load_key, now_ms, print_result, replay, submit
from carechain.cli._options import (
    BrokerOpt,
    ConfigOpt,
    DataDirOpt,
    JsonOpt,
    bridge_dir,
    console,
    example,
    fail,
    load,
    resolved_broker,
)
from carechain.cli._options import out as stdout

store_app = typer.Typer(help="Encrypted, erasure-coded datasets on storage miners (put, get, update, status, "
                             "audit, repair; commit and settle record roots and audit epochs on the ledger).",
                        no_args_is_help=True, epilog=example("carechain store put scan.pdf --broker 127.0.0.1:1883"))
MinersOpt = Annotated[str | None, typer.Option(
    "--miners", help="Comma-separated storage miner ids; default: every miner announced on the broker.")]
SeedOpt = Annotated[str | None, typer.Option(
    "--seed", help="Placement/audit seed (64 hex digits); default: from the broker's final checkpoint.")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", help="Seconds to wait for each miner's answer.", min=0.1)]
ManifestArg = Annotated[Path, typer.Argument(help="A manifest written by `carechain store put`.")]


@contextmanager
def _client(config: Path | None, broker: str | None, timeout: float) -> Iterator[tuple[Any, Any]]:
    """A connected StorageClient with a rich progress display wired to it."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from carechain.storage.codec import StorageError
    from chain_bridge.storage_client import StorageClient

    settings = resolved_broker(load(config, broker))
    tasks: dict[str, Any] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  console=console, transient=False) as bar:

        def progress(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total)
            bar.update(tasks[phase], completed=done, total=total)

        try:
            with StorageClient(settings, timeout=timeout, progress=progress) as client:
                yield client, bar
        except StorageError as exc:
            raise fail(str(exc), 1) from None


def _miners(client: Any, miners: str | None) -> list[str]:
    found = [m.strip() for m in miners.split(",") if m.strip()] if miners else client.discover()
    if not found:
        raise fail("no storage miners: pass --miners ID,… or start `python -m "
                   "chain_miner.storage_server --data-dir DIR --broker HOST:PORT`")
    return found


def _seed(client: Any, seed: str | None) -> bytes:
    if seed is None:
        return bytes(client.seed())
    try:
        raw = bytes.fromhex(seed)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise fail(f"--seed must be 64 hex digits (32 bytes), got {seed!r}")
    return raw


def _load(manifest: Path) -> tuple[Any, Any]:
    from carechain.storage.codec import StorageError
    from carechain.storage.keyfile import load_dataset_key
    from chain_bridge.storage_client import key_path, load_manifest

    try:
        m = load_manifest(manifest)
        return m, load_dataset_key(key_path(manifest), m.dataset_id)
    except (OSError, StorageError) as exc:
        raise fail(str(exc)) from None


@store_app.command("put", epilog=example("carechain store put scan.pdf --broker 127.0.0.1:1883"))
def put(file: Annotated[Path, typer.Argument(help="The file to store.", exists=True, dir_okay=False)],
        manifest: Annotated[Path | None, typer.Option(help="Where to write the manifest "
                                                      "(default FILE.manifest.json).")] = None,
        owner: Annotated[str, typer.Option(help="Owner recorded in the manifest.")] = "owner",
        miners: MinersOpt = None, seed: SeedOpt = None, timeout: TimeoutOpt = 10.0,
        config: ConfigOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False) -> None:
    """Encrypt, erasure-code and upload FILE; write its manifest and key (0600) first."""
    out = manifest or file.with_name(file.name + ".manifest.json")
    with _client(config, broker, timeout) as (client, _):
        m = client.put(file, _miners(client, miners), _seed(client, seed), out, owner=owner)
    if as_json:
        print(json.dumps({"dataset": m.dataset_id, "bytes": m.length, "segments": len(m.segments), "k": m.k,
                          "n": m.n, "manifest": str(out), "key": str(out.with_suffix(".key"))}), flush=True)
        return
    stdout.print(f"stored {m.length} bytes as dataset {m.dataset_id} ({len(m.segments)} segments, "
                 f"{m.k}-of-{m.n}); manifest {out}, key {out.with_suffix('.key')}", soft_wrap=True)


@store_app.command("get", epilog=example("carechain store get scan.pdf.manifest.json -o scan-copy.pdf"))
def get(manifest: ManifestArg, out: Annotated[Path, typer.Option("-o", "--out", help="Where to write the data.")],
        prefer: Annotated[str | None, typer.Option(help="Comma-separated miners to ask first.")] = None,
        timeout: TimeoutOpt = 10.0, config: ConfigOpt = None,
        broker: BrokerOpt = None, as_json: JsonOpt = False) -> None:
    """Fetch k intact shares per segment, decode and decrypt into OUT (mode 0600: it is health data)."""
    from carechain.files import PRIVATE, write_atomic

    m, key = _load(manifest)
    with _client(config, broker, timeout) as (client, _):
        data = client.get(m, key, prefer=[p for p in (prefer or "").split(",") if p])
    write_atomic(out, data, PRIVATE)
    if as_json:
        print(json.dumps({"dataset": m.dataset_id, "bytes": len(data), "out": str(out)}), flush=True)
        return
    stdout.print(f"wrote {len(data)} bytes to {out}", soft_wrap=True)


@store_app.command("update", epilog=example("carechain store update scan.pdf.manifest.json scan-v2.pdf"))
def update(manifest: ManifestArg, file: Annotated[Path, typer.Argument(help="The new content.", exists=True)],
           miners: MinersOpt = None, seed: SeedOpt = None, timeout: TimeoutOpt = 10.0,
           config: ConfigOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False) -> None:
    """Upload only the segments of FILE that changed; delete the versions they replace."""
    m, key = _load(manifest)
    with _client(config, broker, timeout) as (client, _):
        r = client.update(m, key, file.read_bytes(), _miners(client, miners), _seed(client, seed), manifest)
    if as_json:
        print(json.dumps({"dataset": m.dataset_id, "revision": r.manifest.revision, "segments": list(r.segments),
                          "bytes_sent": r.bytes_sent}), flush=True)
        return
    stdout.print(f"revision {r.manifest.revision}: segments {list(r.segments)} rewritten, "
                 f"{r.bytes_sent} share bytes sent", soft_wrap=True)


@store_app.command("status", epilog=example("carechain store status scan.pdf.manifest.json --json"))
def status(manifest: ManifestArg, timeout: TimeoutOpt = 10.0, as_json: JsonOpt = False,
           config: ConfigOpt = None, broker: BrokerOpt = None) -> None:
    """Live shares per segment (each miner proves it holds chunk 0 of its shares)."""
    from rich.table import Table

    m, _ = _load(manifest)
    with _client(config, broker, timeout) as (client, _):
        rows = client.status(m)
    if as_json:
        print(json.dumps({"dataset": m.dataset_id, "revision": m.revision,
                          "segments": [{"index": r.index, "version": r.version, "live": list(r.live)} for r in rows]}))
        return
    t = Table("segment", "version", "live shares", "readable", title=f"{m.dataset_id} revision {m.revision}")
    for r in rows:
        t.add_row(str(r.index), str(r.version), f"{len(r.live)}/{r.n} {list(r.live)}", "yes" if r.readable else "NO")
    stdout.print(t)
    if not all(r.readable for r in rows):
        raise typer.Exit(1)


@store_app.command("audit", epilog=example("carechain store audit scan.pdf.manifest.json --challenges 32"))
def audit(manifest: ManifestArg, challenges: Annotated[int, typer.Option(help="Challenges per miner.", min=1)] = 16,
          seed: SeedOpt = None, timeout: TimeoutOpt = 10.0, as_json: JsonOpt = False,
          config: ConfigOpt = None, broker: BrokerOpt = None) -> None:
    """Challenge every miner holding a share with seeded chunk challenges; a verdict per miner."""
    from rich.table import Table

    m, _ = _load(manifest)
    with _client(config, broker, timeout) as (client, _):
        verdicts = client.audit(m, _seed(client, seed), challenges)
    if as_json:
        print(json.dumps({v.miner: {"passed": v.passed, "challenges": v.challenges, "failed": v.failed,
                                    "reasons": list(v.reasons)} for v in verdicts.values()}))
    else:
        t = Table("miner", "verdict", "failed/challenges", "first failure", title=f"audit of {m.dataset_id}")
        for v in verdicts.values():
            t.add_row(v.miner, "passed" if v.passed else "[red]FAILED[/]", f"{v.failed}/{v.challenges}",
                      v.reasons[0] if v.reasons else "")
        stdout.print(t)
    if not all(v.passed for v in verdicts.values()):
        raise typer.Exit(1)


@store_app.command("repair", epilog=example("carechain store repair scan.pdf.manifest.json --grace 3600"))
def repair(manifest: ManifestArg, miners: MinersOpt = None, seed: SeedOpt = None,
           grace: Annotated[int, typer.Option(help="Seconds a silent miner may be away before its shares are "
                                                   "regenerated elsewhere (default 24 h).", min=0)] = 24 * 3600,
           timeout: TimeoutOpt = 10.0, as_json: JsonOpt = False,
           config: ConfigOpt = None, broker: BrokerOpt = None) -> None:
    """Regenerate lost shares from k intact ones and place them on new miners; update the manifest (0600).

    When each miner was last seen is kept next to the manifest (MANIFEST with suffix .seen.json): a miner
    silent for less than --grace is suspect, not lost, so a reboot causes no repair.
    """
    from carechain.files import PRIVATE, write_atomic
    from carechain.storage.repair import RepairPolicy

    m, _ = _load(manifest)
    seen_path = manifest.with_suffix(".seen.json")
    try:
        last_seen = {str(k): int(v) for k, v in json.loads(seen_path.read_text()).items()}
    except FileNotFoundError:
        last_seen = {}
    except (OSError, ValueError, AttributeError) as exc:
        raise fail(f"{seen_path}: {exc}") from None
    with _client(config, broker, timeout) as (client, _):
        try:
            repaired, tasks = client.repair(m, manifest, _seed(client, seed), _miners(client, miners),
                                            RepairPolicy(grace=grace), last_seen=last_seen)
        finally:
            write_atomic(seen_path, json.dumps(last_seen, indent=1, sort_keys=True).encode(), PRIVATE)
    if as_json:
        print(json.dumps({"dataset": m.dataset_id, "repaired": [
            {"segment": t.segment, "version": t.version, "share": t.share, "target": t.target} for t in tasks]}))
        return
    if not tasks:
        stdout.print(f"{m.dataset_id}: nothing to repair (no segment below its threshold)", soft_wrap=True)
        return
    stdout.print(f"{m.dataset_id}: {len(tasks)} share(s) regenerated on "
                   f"{len({t.target for t in tasks})} miner(s) in {len({t.segment for t in tasks})} segment(s); "
                   f"manifest {manifest} updated", soft_wrap=True)


# -- on the ledger (run on the bridge host, like `carechain party|rx`: see carechain/cli/contracts.py) ---------


@store_app.command("commit", epilog=example(
    "carechain store commit scan.pdf.manifest.json --key keys/owner.key --seed-checkpoint final.note"))
def commit(manifest: ManifestArg,
           key: Annotated[Path, typer.Option("--key", help="The dataset owner's key file (it signs the entry; "
                                                           "any key, bound to the dataset by its first commit).")],
           seed_checkpoint: Annotated[Path, typer.Option(
               "--seed-checkpoint", help="The final checkpoint note (text) whose seed placed the manifest's new "
                                         "shares; the rules check the placement against it and the active miners.")],
           receipts: Annotated[Path | None, typer.Option(
               "--receipts", help="The miners' store receipts, JSON [[segment, version, share, hex], ...] "
                                  "(default: MANIFEST.receipts.json if it exists).")] = None,
           config: ConfigOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False) -> None:
    """Record MANIFEST's share Merkle roots on the ledger (a `storage.commit` v2 entry)."""
    from carechain.storage.codec import StorageError
    from chain_bridge.storage_client import load_manifest, load_receipts, receipts_path
    from contract_rules import transactions as ce
    from contract_rules.storage_v2 import commit_for

    try:
        m = load_manifest(manifest)
        note = seed_checkpoint.read_text()
        if receipts is not None:
            receipts.stat()  # named on the command line: it must exist
        signed = load_receipts(receipts or receipts_path(manifest))
    except (OSError, UnicodeDecodeError, StorageError) as exc:
        raise fail(str(exc)) from None
    owner = load_key(key)
    entry = ce.signed(owner, ce.STORAGE_COMMIT, commit_for(m, owner.public_key, note, signed, now_ms()))
    leaf = submit(config, data_dir, entry)
    print_result({"dataset": m.dataset_id, "revision": m.revision, "segments": len(m.segments),
                  "owner": owner.device_id, "leaf": leaf}, as_json)


@store_app.command("settle", epilog=example(
    "carechain store settle --epoch 12 --pool 100000 --data-dir carechain-data/bridge"))
def settle(epoch: Annotated[int, typer.Option("--epoch", min=0, help="The storage epoch to close (the current one).")],
           pool: Annotated[int, typer.Option("--pool", min=0, help="Minor units to pay from pool:miners.")],
           config: ConfigOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False) -> None:
    """Close a storage epoch and pay its rewards from pool:miners (`storage.settle`, signed with the operator key).

    The rules split POOL by the epoch's evidence on the ledger: cosignatures, audits passed, retrievals answered.
    """
    from chain_bridge.registry import operator_key
    from contract_rules import transactions as ce
    from contract_rules.storage_v2 import epoch_result

    runtime = replay(config, data_dir)
    result = epoch_result(runtime.state, pool)
    bdir = bridge_dir(load(config), data_dir)
    entry = ce.storage_settle_entry(operator_key(bdir), ce.StorageSettle(epoch=epoch, pool=pool))
    leaf = submit(config, data_dir, entry)
    print_result({"epoch": epoch, "leaf": leaf, "paid": sum(result["payouts"].values()),
                  "payouts": result["payouts"]}, as_json)
