"""The protocol cutover: an operator-signed entry names the tree size from which v1 health readings are refused."""

from __future__ import annotations

from test_contracts_access import HOUR, AccessWorld
from test_contracts_world import FLU_SHOT, T0

from carechain.events import make_sealed_payload
from contract_rules import replay
from contract_rules import transactions as ce


def cutover(w: AccessWorld, after: int) -> str:
    return w.add(ce.protocol_cutover_entry(w.operator, ce.ProtocolCutover(retire_v1_after=after, ts=T0)))


def test_v1_and_v2_readings_run_side_by_side_until_the_cutover_then_v1_is_version_retired() -> None:
    w = AccessWorld()
    v2_band = w.band
    v1_band = w.wearable
    assert w.register_device(v1_band, "heart_rate_band", w.patient.device_id) == "ok"
    retire_at = len(w.entries) + 4
    assert cutover(w, retire_at) == "ok"
    assert w.activity(30, T0 + 60_000, dev=v1_band) == "ok"  # before the cutover: v1 still anchored
    seal = make_sealed_payload(v2_band.device_id, 0, T0, "heart_rate", T0 // HOUR, b"\x01" * 32)
    assert w.add(w.v2_event(v2_band, seal)) == "ok"
    assert w.activity(31, T0 + 120_000, dev=v1_band) == "ok"
    assert len(w.entries) == retire_at
    assert w.activity(32, T0 + 180_000, dev=v1_band) == "version_retired"
    seal = make_sealed_payload(v2_band.device_id, 1, T0 + 1000, "heart_rate", T0 // HOUR, b"\x02" * 32)
    assert w.add(w.v2_event(v2_band, seal)) == "ok"  # v2 keeps going


def test_clear_v1_kinds_that_are_not_readings_survive_the_cutover() -> None:
    w = AccessWorld()
    w.standard_parties()
    assert cutover(w, len(w.entries) + 1) == "ok"
    assert w.sale(FLU_SHOT, rx_only=False, price=100, patient="pt-x", ts=T0) == "ok"  # after the bridge's clock


def test_a_cutover_is_set_once_and_never_reaches_back_into_history() -> None:
    w = AccessWorld()
    assert cutover(w, len(w.entries)) == "cutover_is_retroactive"
    assert w.add(ce.protocol_cutover_entry(w.patient, ce.ProtocolCutover(retire_v1_after=10**6, ts=T0))) \
        == "signer_not_allowed"
    assert cutover(w, 10**6) == "ok"
    assert cutover(w, 10**7) == "cutover_already_set"
    assert w.state.table("protocol")["cutover"] == {"retire_v1_after": 10**6, "at": len(w.entries) - 2}


def test_the_same_log_replays_to_the_same_root() -> None:
    w = AccessWorld()
    assert cutover(w, len(w.entries) + 2) == "ok"
    w.epoch_key(T0 // HOUR)
    w.activity(5, T0, dev=w.band)  # v1 activity after the cutover: refused, and the refusal is in the root
    request = w.request()[1]
    w.grant(request)
    assert replay(w.genesis, w.entries).root() == w.state.root()
