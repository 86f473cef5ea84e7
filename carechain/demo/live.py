"""What the demo's live scenarios (the data market, the trial) share: entries appended beside a running bridge,
and bounded waits for what the bridge and the miners do by themselves.

The bridge and the miners run while a scenario appends its parties' entries as `carechain` commands do (checked
against a replay of the whole ledger, a clock.attest first when the attested time is stale), then waits — every
wait bounded, its error naming the step and where things stood — for the miners' own entries to arrive. A run
reports its summary whatever happens: an error goes into it (never hidden), with how long each step took.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, ClassVar

from carechain import envelope
from carechain.entries import CHECKPOINT_FINAL, Entry
from carechain.identity import Identity
from chain_bridge.contract_admin import ContractRefused, replay_ledger, submit
from chain_bridge.ledger.store import Ledger
from contract_rules import Genesis
from contract_rules.runtime import State

__all__ = ["CHECKPOINT_TIMEOUT_S", "POLL_S", "LiveScenario"]

POLL_S = 0.5
CHECKPOINT_TIMEOUT_S = 30.0  # the bridge signs a checkpoint each second the log grew


class LiveScenario:
    """A scenario on the live ledger; subclasses set `error` (their error type) and `genesis`, `operator`,
    `log_key`, and write `_summary` and `_run`."""

    error: ClassVar[type[Exception]] = RuntimeError
    genesis: Genesis
    operator: Identity
    log_key: Identity

    def run(self) -> dict[str, Any]:
        """The whole scenario; its summary (`_summary`, filled in by `_run`), with `error` (None, or what stopped
        it: the exit status says it failed), `phases` (how long each step took, in seconds) and `seconds`."""
        started = time.monotonic()
        self.phases: dict[str, float] = {}
        self._phase_started = started
        result = {**self._summary(), "error": None, "phases": self.phases}
        try:
            self._run(result)
        except Exception as exc:  # reported in the summary, never hidden
            result["error"] = f"{type(exc).__name__}: {exc}"
        result["seconds"] = round(time.monotonic() - started, 2)
        return result

    def _summary(self) -> dict[str, Any]:
        """The summary before the scenario runs: what it says when a step fails."""
        raise NotImplementedError

    def _run(self, result: dict[str, Any]) -> None:
        """The steps, filling in `result` and calling `_phase` after each."""
        raise NotImplementedError

    def _phase(self, name: str) -> None:
        """Step `name` is done: how long it took since the previous one goes into the summary's `phases`."""
        now = time.monotonic()
        self.phases[name] = round(now - self._phase_started, 2)
        self._phase_started = now

    def _latest_final_note(self, ledger: Ledger) -> str:
        """The last final checkpoint the bridge recorded (`checkpoint.final`, cosigned by a majority of the
        active miners): its seed draws a study's aggregators and a trial's labellers."""
        for index in range(ledger.refresh() - 1, -1, -1):
            entry = Entry.decode(ledger.entry(index))
            if entry.type == CHECKPOINT_FINAL:
                return str(envelope.parse(entry.cose).payload["note"])
        raise self.error("no final checkpoint on the ledger: the miners never cosigned one")

    def _submit(self, ledger: Ledger, what: str, entries: list[Entry]) -> list[int]:
        """Append `entries` as `carechain` commands do while the bridge runs: checked against a replay of the
        whole ledger (what the bridge appended meanwhile included), a clock.attest first when stale."""
        ledger.refresh()
        try:
            return submit(ledger, self.genesis, entries, clock=self.operator)
        except ContractRefused as exc:
            raise self.error(f"{what}: {exc}") from None

    def _wait(self, ledger: Ledger, what: str, timeout: float, done: Callable[[State], bool],
              progress: Callable[[State], str]) -> State:
        """The contract state once `done(state)`, replaying what the bridge appended every POLL_S; the error
        names the step and `progress(state)` when `timeout` passes."""
        deadline = time.monotonic() + timeout
        while True:
            ledger.refresh()
            state = replay_ledger(ledger, self.genesis).state
            if done(state):
                return state
            if time.monotonic() > deadline:
                raise self.error(f"gave up after {timeout:.0f} s waiting for {what}: {progress(state)} "
                                 "(the miners' logs say why)")
            time.sleep(POLL_S)

    def _checkpoint_covering(self, ledger: Ledger, index: int) -> Any:  # noqa: ANN401 - a verified Checkpoint
        """The bridge's newest checkpoint once it covers leaf `index`, verified against the log key as any
        outsider would."""
        from carechain.proofs import verify_checkpoint

        deadline = time.monotonic() + CHECKPOINT_TIMEOUT_S
        while True:
            latest = ledger.latest_checkpoint()
            if latest is not None and latest[0] > index:
                return verify_checkpoint(latest[1], self.log_key.public_key)
            if time.monotonic() > deadline:
                raise self.error(f"gave up after {CHECKPOINT_TIMEOUT_S:.0f} s waiting for a checkpoint of the "
                                 f"bridge covering leaf {index} (the latest covers "
                                 f"{latest[0] if latest else 0} leaves)")
            time.sleep(POLL_S)
