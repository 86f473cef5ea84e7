"""A live deployment whose miners run the data market's and the trials' jobs by themselves, for
tests/test_market_live.py and tests/test_trial_live.py.

tests/access_world.py's deployment made smaller: one `carechain bridge` (contracts on) and three bonded `carechain
miner` processes (final = 2 of 3), each started with a config file of its own (the `miner` section a world gives
it, e.g. its `mpc_listen`). The retained checkpoints and miner hellos of earlier worlds on a session broker are
cleared first, and a world is started once the bridge recorded a final checkpoint on its ledger: a study's
aggregators and a trial's labellers are drawn from it and found through these miners' hellos. Not a test module
itself.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
import yaml

from carechain import topics
from carechain.entries import CHECKPOINT_FINAL, Entry, Registration, registration_entry
from carechain.identity import Identity
from chain_bridge.contract_admin import replay_ledger, submit
from chain_bridge.ledger.store import Ledger
from chain_bridge.registry import ledger_path
from chain_miner.jobs_file import JOBS_FILE
from contract_rules import transactions as ce
from simulators.miners import CARECHAIN, clear_retained
from tests.access_world import DEADLINE_S, AccessWorld, Miner, Observer, Party, now_ms, wait_for

World = TypeVar("World", bound="LiveWorld")


@dataclass
class LiveWorld(AccessWorld):
    """AccessWorld with three bonded miners (final = 2 of 3) and no band streaming; subclasses add their parties
    in `register` (`register_parties`) and their miners' settings in `miner_settings`."""

    n_miners: int = 3
    threshold: int = 2

    def miner_settings(self, miner: Miner) -> dict[str, Any]:
        """The `miner` section of `miner`'s config file (none here)."""
        return {}

    def start(self, before_processes: Callable[[], None] | None = None) -> None:
        """Register the parties, run `before_processes` (e.g. a prefill of the ledger), then start the bridge and
        the miners, each with its own config file, and wait until each is ready and a final checkpoint is
        recorded."""
        clear_retained(self.broker, f"live-world-clear-{id(self)}",
                       [topics.CHECKPOINT, topics.FINAL_CHECKPOINT, *(topics.miner_hello(m.id) for m in self.miners)])
        self.register()
        if before_processes is not None:
            before_processes()
        self.observer = Observer(self.broker, [], f"live-world-observer-{id(self)}")
        assert self.observer.connected.wait(30), "observer could not connect to the broker"
        self.bridge.start()
        self.bridge.wait_output("bridge ready")
        for m in self.miners:
            config = m.dir.parent / f"{m.dir.name}.yaml"  # beside its data dir, as its log is
            config.write_text(yaml.safe_dump({"broker": {"host": self.broker.host, "port": self.broker.port},
                                              "miner": self.miner_settings(m)}))
            m.process.start([*CARECHAIN, "miner", "--config", str(config), "--data-dir", str(m.dir), "--broker",
                             self.broker.address, "--log-public-key", self.log_public_key.hex(), "--genesis",
                             str(self.genesis_file), "--verbose"])
        for m in self.miners:
            m.wait_ready()
        self.wait_final_recorded()

    def wait_final_recorded(self) -> None:
        """Until the bridge recorded a final checkpoint on the ledger (`checkpoint.final`). Meanwhile the operator
        attests the time every second or so, which grows the log: a checkpoint the miners missed is followed by
        another (the bridge checkpoints a quiet log only once)."""
        deadline = time.monotonic() + DEADLINE_S
        while not self._final_recorded():
            assert time.monotonic() < deadline, f"no final checkpoint on the ledger\n{self.logs()}"
            self.submit([])  # a clock.attest, once the attested time is a second old
            time.sleep(0.5)

    def _final_recorded(self) -> bool:
        ledger = Ledger(ledger_path(self.bridge_dir))
        try:
            return any(Entry.decode(ledger.entry(i)).type == CHECKPOINT_FINAL for i in range(ledger.refresh()))
        finally:
            ledger.close()

    def register_parties(self, registrations: Sequence[ce.PartyRegistration],
                         bands: Sequence[tuple[Identity, Party]] = ()) -> None:
        """Register parties (signed by the operator) and heart-rate bands, each to its owner, before the bridge
        runs."""
        self.submit([ce.party_registration_entry(self.operator, r) for r in registrations])
        ts = now_ms()
        ledger = Ledger(ledger_path(self.bridge_dir))
        try:
            for band, owner in bands:
                reg = Registration(dev=band.device_id, pk=band.public_key, profile="heart_rate_band",
                                   owner=owner.id, site="home", ts=ts)
                ledger.append_registrations([(registration_entry(self.operator, reg), reg)])
        finally:
            ledger.close()

    def submit(self, entries: list[Entry]) -> list[int]:
        """Append signed entries as the CLI does (checked against a replay, a clock.attest first when stale)."""
        ledger = Ledger(ledger_path(self.bridge_dir))
        try:
            return submit(ledger, self.genesis, entries, clock=self.operator)
        finally:
            ledger.close()

    def check(self, entry: Entry) -> str:
        """What the rules would say to `entry` on top of the ledger now."""
        ledger = Ledger(ledger_path(self.bridge_dir))
        try:
            return replay_ledger(ledger, self.genesis).check(entry)
        finally:
            ledger.close()

    def wait_job_done(self, miner: Miner, runner: str, key: str) -> set[str]:
        """Until `miner`'s jobs file of `runner` ("studies", "trials") lists job `key` as done; the jobs done. The
        runner saves the file just after the job's entry left: wait for it, never race it."""
        path = miner.dir / runner / JOBS_FILE

        def done() -> set[str]:
            return set(json.loads(path.read_text())["done"]) if path.exists() else set()

        wait_for(f"miner {miner.id}'s {runner} jobs file to record {key} as done", lambda: key in done(),
                 context=self.logs)
        return done()


def module_world(world_type: type[World], name: str) -> Any:  # noqa: ANN401 - a pytest fixture
    """A module-scoped `world` fixture: a `world_type` in a fresh directory named after `name`, started on the
    session's broker and stopped after the module's last test."""

    @pytest.fixture(scope="module")
    def world(broker: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:  # noqa: ANN401
        if broker.kind != "mosquitto":
            pytest.skip("needs mosquitto (retained hellos and the miners' topics as in production)")
        w = world_type(tmp_path_factory.mktemp(name), broker.config)
        try:
            w.start()
            yield w
        finally:
            w.stop()

    return world
