"""The operator's web console, page by page, over a real ledger (Starlette's TestClient, the real sign-in).

The ledger is built with the project's own writers (device registrations, signed events, sealed readings with
ciphertexts, checkpoints, contract entries signed by their parties) and read back by independent SQL; the bridge
is a real `Bridge` assembled from config but not started (the console reads its counters and its ledger).
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from carechain import envelope, sealed
from carechain.checkpoint import add_signature
from carechain.config import BridgeConfig, BrokerConfig, Config, ConsoleConfig
from carechain.entries import Entry, Registration, event_entry, registration_entry
from carechain.events import make_payload, make_sealed_payload
from carechain.identity import Identity
from carechain.receipts import event_digest
from chain_bridge.assembly import AssembledBridge, assemble_bridge
from chain_bridge.console.accounts import AccountBook, Role
from chain_bridge.console.app import build_console_app
from chain_bridge.console.read_model import PAGES
from chain_bridge.console.serve import metrics_app_for
from chain_bridge.console.source import Bond, BridgeSource, TokenAccount
from chain_bridge.ledger.store import EventCandidate, Ledger
from chain_bridge.registry import ledger_path, log_key, operator_key
from contract_rules import transactions as ce

PASSWORD = "correct horse battery staple"
READING_CELSIUS = 39.87  # a clear v1 reading: its value must never appear on a page
OPERATOR_PAGES = ("overview", "fleet", "ingest", "checkpoints", "contracts", "storage")
PATHS = {"overview": "/", **{p: f"/{p}" for p in PAGES if p != "overview"}}


@dataclass
class World:
    root: Path
    patient: Identity
    doctor: Identity
    ciphertexts: list[bytes]
    assembled: AssembledBridge
    accounts: Path

    @property
    def ledger_file(self) -> Path:
        return ledger_path(self.root / "bridge")

    def sql(self, query: str) -> list[tuple[object, ...]]:
        db = sqlite3.connect(f"file:{self.ledger_file}?mode=ro", uri=True)
        try:
            return db.execute(query).fetchall()
        finally:
            db.close()


def _now_ms() -> int:
    return int(time.time() * 1000)


class _Refuse:
    """An event gate that puts `refusal` in place of every event (as the contract gate does for a refused sale)."""

    def __init__(self, refusal: Entry) -> None:
        self.refusal = refusal

    def catch_up(self, ledger: Ledger) -> None:
        pass

    def admit(self, index: int, candidate: EventCandidate) -> Entry:
        return self.refusal

    def abort(self) -> None:
        pass


def _build_ledger(bridge_dir: Path, patient: Identity, doctor: Identity) -> list[bytes]:
    """Parties, three devices of two profiles, clear and sealed events, contract entries and checkpoints."""
    operator, lk = operator_key(bridge_dir), log_key(bridge_dir)
    ledger = Ledger(ledger_path(bridge_dir))
    ts = _now_ms()
    try:
        ledger.append_entries([ce.party_registration_entry(operator, ce.PartyRegistration(
            role=role, pk=who.public_key, name=role, ts=ts))
            for role, who in (("patient", patient), ("doctor", doctor))])
        devices = [(Identity.generate(), "heart_rate_band"), (Identity.generate(), "heart_rate_band"),
                   (Identity.generate(), "thermometer")]
        for device, profile in devices:
            reg = Registration(dev=device.device_id, pk=device.public_key, profile=profile, owner=patient.device_id,
                               site="ward-7", ts=ts)
            ledger.append_registrations([(registration_entry(operator, reg), reg)])
        thermometer = devices[2][0]
        clear = envelope.sign(thermometer, make_payload(thermometer.device_id, 0, ts, "temperature",
                                                        {"celsius": READING_CELSIUS}))
        candidates = [EventCandidate(thermometer.device_id, 0, event_entry(clear).encode(), event_digest(clear),
                                     "temperature")]
        ciphertexts = []
        band = devices[0][0]
        epoch = sealed.epoch_of(ts, sealed.DEFAULT_EPOCH_MS)
        for seq in range(5):
            ct = os.urandom(48)
            ciphertexts.append(ct)
            cose = envelope.sign(band, make_sealed_payload(band.device_id, seq, ts + seq, "heart_rate", epoch,
                                                           sealed.ciphertext_hash(ct)))
            candidates.append(EventCandidate(band.device_id, seq, event_entry(cose).encode(), event_digest(cose),
                                             "heart_rate", version=2, ct=ct, epoch=epoch))
        ledger.append_events(candidates)
        ledger.issue_checkpoint(lk, "carechain.log/test")
        # The contracts' entries as their parties sign them (the console reads metadata, it does not judge them).
        request = ce.signed(doctor, ce.ACCESS_REQUEST, ce.AccessRequest(
            owner=patient.device_id, kinds=["heart_rate"], from_ms=ts - 3_600_000, to_ms=ts, purpose="follow-up",
            expires_ms=ts + 86_400_000, nonce=1, ts=ts))
        miners = [Identity.generate() for _ in range(3)]
        note = ledger.latest_checkpoint()
        assert note is not None
        cosigned = note[1]
        for i, miner in enumerate(miners[:2]):
            cosigned = add_signature(cosigned, f"miner-{i}", miner.public_key, miner.sign)
        grant = ce.signed(patient, ce.ACCESS_GRANT, ce.AccessGrant(
            request="ab" * 32, requester=doctor.device_id, threshold=2, miners=[m.device_id for m in miners],
            kfrags=[b"k" * 40] * 3, seed_checkpoint=cosigned, expires_ms=ts + 86_400_000, ts=ts))
        consent = ce.signed(patient, ce.CONSENT_GIVE, ce.ConsentGive(
            kinds=["heart_rate"], queries=["mean"], min_cohort=5, price_minor=100, expires_ms=ts + 86_400_000,
            nonce=1, ts=ts))
        rx = ce.signed(doctor, ce.RX_ANCHOR, ce.RxAnchor(
            rx_ref="11" * 32, patient_c="22" * 32, drug_c="33" * 32, quantity=1, refills=0,
            expires_ms=ts + 86_400_000, controlled=False, ts=ts))
        final = ce.signed(operator, ce.CHECKPOINT_FINAL, ce.CheckpointFinal(note=cosigned))
        ledger.append_entries([request, grant, consent, rx, final])
        # A refused sale goes in as the bridge's gate puts it: a sale.refused in the event's place.
        sale = envelope.sign(thermometer, make_payload(thermometer.device_id, 1, ts, "temperature",
                                                       {"celsius": 36.6}))
        refusal = ce.signed(operator, ce.SALE_REFUSED, ce.SaleRefusal(event=sale, reason="no_valid_rx", ts=ts))
        ledger.append_events([EventCandidate(thermometer.device_id, 1, event_entry(sale).encode(),
                                             event_digest(sale), "purchase")], gate=_Refuse(refusal))
        ledger.issue_checkpoint(lk, "carechain.log/test")
    finally:
        ledger.close()
    return ciphertexts


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    bridge_dir = tmp_path / "bridge"
    patient, doctor = Identity.generate(), Identity.generate()
    ciphertexts = _build_ledger(bridge_dir, patient, doctor)
    cfg = Config(broker=BrokerConfig(host="127.0.0.1", port=1), bridge=BridgeConfig(data_dir=bridge_dir))
    assembled = assemble_bridge(cfg, data_dir=bridge_dir)  # never started: nothing connects
    accounts = bridge_dir / "console" / "accounts.json"
    book = AccountBook(accounts)
    book.add("olga", PASSWORD, [Role.OPERATOR])
    book.add("pete", PASSWORD, [Role.PRIVACY_OFFICER])
    try:
        yield World(tmp_path, patient, doctor, ciphertexts, assembled, accounts)
    finally:
        assembled.close()


def _client(world: World) -> TestClient:
    bridge = world.assembled.bridge
    app = build_console_app(BridgeSource(bridge), ConsoleConfig(refresh_s=0.2), world.accounts,
                            metrics_app_for(bridge))
    return TestClient(app, base_url="http://127.0.0.1")


def _login(client: TestClient, name: str) -> None:
    form = client.get("/login")
    assert form.status_code == 200
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
    assert token, "the login form carries a CSRF token"
    done = client.post("/login", data={"user": name, "password": PASSWORD,
                                       "csrf_token": token.group(1)}, follow_redirects=False)
    assert done.status_code in (302, 303), done.text
    assert client.get("/").status_code in (200, 403)


def _figure(html: str, key: str) -> str:
    found = re.search(rf'data-live="{re.escape(key)}"[^>]*>([^<]*)<', html)
    assert found, f"figure {key} not on the page"
    return found.group(1).replace(",", "")


def test_anonymous_requests_are_sent_to_the_login_page_and_health_checks_stay_open(world: World) -> None:
    with _client(world) as client:
        for page in PAGES:
            response = client.get(PATHS[page], follow_redirects=False)
            assert response.status_code in (302, 303), page
            assert response.headers["location"].startswith("/login")
        assert client.get("/events?page=overview", follow_redirects=False).status_code in (302, 303)
        assert client.get("/healthz").text == "ok"
        metrics = client.get("/metrics", follow_redirects=False)  # open by design, for the scraper
        assert metrics.status_code == 200 and "carechain_bridge_events_received" in metrics.text
        ready = client.get("/readyz")  # the bridge was never started: not subscribed
        assert ready.status_code == 503 and "not subscribed" in ready.text


def test_each_page_renders_for_its_role_and_the_privacy_pages_are_refused_to_an_operator(world: World) -> None:
    with _client(world) as client:
        _login(client, "olga")
        for page in OPERATOR_PAGES:
            response = client.get(PATHS[page])
            assert response.status_code == 200, page
            assert "olga" in response.text and 'action="/logout"' in response.text
            assert "content-security-policy" in response.headers
        for page in ("access", "consents"):
            refused = client.get(PATHS[page])
            assert refused.status_code == 403, page
            assert "privacy_officer" in refused.text
            assert client.get(f"/live?page={page}").status_code == 403
        assert 'href="/access"' not in client.get("/").text  # not offered in the navigation either
    with _client(world) as client:
        _login(client, "pete")
        for page in PAGES:
            assert client.get(PATHS[page]).status_code == 200, page


def test_the_numbers_on_the_pages_equal_the_ledger(world: World) -> None:
    events = world.sql("SELECT COUNT(*) FROM entries WHERE type='event'")[0][0]  # a refused sale is not one
    devices = world.sql("SELECT COUNT(*) FROM devices")[0][0]
    bands = world.sql("SELECT COUNT(*) FROM devices WHERE profile='heart_rate_band'")[0][0]
    checkpoints, latest = world.sql("SELECT COUNT(*), MAX(tree_size) FROM checkpoints")[0]
    size = world.sql("SELECT COUNT(*) FROM entries")[0][0]
    by_type = {str(t): int(str(n)) for t, n in world.sql("SELECT type, COUNT(*) FROM entries GROUP BY type")}
    with _client(world) as client:
        _login(client, "pete")
        overview = client.get("/").text
        assert _figure(overview, "events") == str(events) == "6"
        assert _figure(overview, "devices") == str(devices) == "3"
        assert _figure(overview, "checkpoints") == str(checkpoints)
        assert _figure(overview, "latest_checkpoint") == str(latest)
        assert _figure(overview, "tree_size") == str(size)
        assert _figure(overview, "final_recorded") == str(by_type["checkpoint.final"])
        assert _figure(overview, "access_grants") == str(by_type["access.grant"]) == "1"
        fleet = client.get("/fleet").text
        assert _figure(fleet, "profile:heart_rate_band") == str(bands) == "2"
        assert _figure(fleet, "profile:thermometer") == "1"
        checkpoints_page = client.get("/checkpoints").text
        assert _figure(checkpoints_page, "final_recorded") == "1"
        assert "miner-0, miner-1" in checkpoints_page  # the cosigners of the recorded final checkpoint
        contracts = client.get("/contracts").text
        assert _figure(contracts, "rx_anchored") == str(by_type["rx.anchor"])
        assert _figure(contracts, "refusals") == str(by_type["sale.refused"])
        assert "no_valid_rx" in contracts
        access = client.get("/access").text
        assert _figure(access, "grants") == "1" and _figure(access, "requests") == "1"
        assert world.doctor.device_id in access  # the requester (a doctor) may be named
        assert _figure(client.get("/consents").text, "consents") == str(by_type["consent.give"])
        live = client.get("/live?page=overview").json()
        assert live["figures"]["events"] == str(events)


def test_no_reading_ciphertext_or_patient_id_appears_on_any_page(world: World) -> None:
    with _client(world) as client:
        _login(client, "pete")
        pages = {page: client.get(PATHS[page]).text for page in PAGES}
        pages.update({f"live:{page}": client.get(f"/live?page={page}").text for page in PAGES})
    owner = world.patient.device_id
    for name, html in pages.items():
        assert owner not in html, f"the patient's id is on {name}"
        assert str(READING_CELSIUS) not in html, f"a reading is on {name}"
        for ct in world.ciphertexts:
            assert ct.hex()[:16] not in html, f"a ciphertext is on {name}"
    # The owner is shown as the same pseudonym everywhere, and its key file is private.
    pseudonym = re.search(r"p:[0-9a-f]{8}", pages["access"])
    assert pseudonym and pseudonym.group(0) in pages["fleet"] and pseudonym.group(0) in pages["consents"]
    key = world.accounts.parent / "pseudonym.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_the_live_stream_sends_new_figures_after_events_are_appended(world: World) -> None:
    with _client(world) as client:
        _login(client, "olga")
        before = int(_figure(client.get("/").text, "events"))
        ledger = Ledger(world.ledger_file)
        try:
            band = Identity.generate()
            reg = Registration(dev=band.device_id, pk=band.public_key, profile="heart_rate_band",
                               owner=world.patient.device_id, site="ward-7", ts=_now_ms())
            ledger.append_registrations([(registration_entry(operator_key(world.root / "bridge"), reg), reg)])
            cose = envelope.sign(band, make_payload(band.device_id, 0, _now_ms(), "activity",
                                                    {"steps": 10, "active_minutes": 1}))
            ledger.append_events([EventCandidate(band.device_id, 0, event_entry(cose).encode(), event_digest(cose),
                                                 "activity")])
        finally:
            ledger.close()
        messages = []
        with client.stream("GET", "/events?page=overview") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            for line in stream.iter_lines():  # one message every refresh_s (0.2 s here)
                if line.startswith("data: "):
                    messages.append(json.loads(line.removeprefix("data: ")))
                    if int(messages[-1]["figures"]["events"]) > before or len(messages) == 20:
                        break
        message = messages[-1]
        assert int(message["figures"]["events"]) == before + 1, f"{len(messages)} live messages, no new event"
        assert set(message["series"]) == {"ingest_rate", "finality_lag"}


class _Ledgered(BridgeSource):
    """The world's bridge, with a token ledger in which money moved (as the contracts would have moved it)."""

    def __init__(self, bridge: object, patient_token: str) -> None:
        super().__init__(bridge)  # type: ignore[arg-type]
        self.patient_token = patient_token

    def token_accounts(self) -> list[TokenAccount] | None:
        return [TokenAccount("insurer:ins1", 70_000, 100_000),  # paid 300.00 in charges
                TokenAccount("miner:m1", 5_000, 0),  # earned 50.00 + 20.00 posted as its bond = 70.00
                TokenAccount("pool:miners", 90_000, 100_000),
                TokenAccount(f"patient:{self.patient_token}", 12_345, 0)]

    def bonds(self) -> list[Bond] | None:
        return [Bond("m1", 2_000, (), False)]


def test_the_contracts_page_shows_insurer_charges_and_miner_rewards_but_no_patient_account(world: World) -> None:
    token = "pt" + "7" * 30
    bridge = world.assembled.bridge
    app = build_console_app(_Ledgered(bridge, token), ConsoleConfig(refresh_s=0.2), world.accounts,
                            metrics_app_for(bridge))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        _login(client, "olga")
        html = client.get("/contracts").text
    assert _figure(html, "insurer_paid") == "300.00"
    assert _figure(html, "miner_earned") == "70.00"
    assert "insurer:ins1" in html and "pool:miners" in html
    assert token not in html and "patients (1 accounts)" in html and "123.45" in html
