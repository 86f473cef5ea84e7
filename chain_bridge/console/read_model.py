"""The console's pages as plain data: ledger metadata (`LedgerScan`) and the bridge's counters (`ConsoleSource`).

`ConsoleModel.refresh()` reads new leaves and takes one chart sample, at most once per `refresh_s` whoever asks
(a page load, a live stream, the sampler thread); each page method then builds its figures from what is already
in memory plus a few bounded queries (the devices table, the last checkpoints). Every figure a page shows is in
its `figures` map under a stable key: the page renders it on load and the live stream sends the same map again.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from carechain.entries import (
    ACCESS_GRANT,
    CHECKPOINT_FINAL,
    ENTRY_EVENT,
    RX_ANCHOR,
    RX_REVOKE,
    SALE_REFUSED,
    TOKEN_TRANSFER,
    WELLNESS_SETTLE,
)
from chain_bridge.console.history import History, Sample
from chain_bridge.console.ledger_scan import AccessRow, ConsentRow, LedgerScan
from chain_bridge.console.pseudonyms import Pseudonyms
from chain_bridge.console.source import Bond, ConsoleSource

DASH = "—"
FLEET_PAGE = 500  # devices listed on the fleet page (the counts by profile cover all of them)
CHECKPOINTS_SHOWN = 50
ACCESS_PAGE = 100
LATENCY_WINDOW_S = 60.0
PAGES = ("overview", "fleet", "ingest", "checkpoints", "contracts", "storage", "access", "consents")
PRIVACY_PAGES = frozenset({"access", "consents"})


@dataclass
class Page:
    """One page's data: `figures` (live, by key) and whatever tables and charts it shows."""

    name: str
    figures: dict[str, str] = field(default_factory=dict)
    tables: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    charts: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def live(self, series: dict[str, list[float | None]]) -> dict[str, Any]:
        """What the live stream sends for this page: its figures and its charts' series."""
        return {"page": self.name, "figures": self.figures, "series": {c: series.get(c, []) for c in self.charts}}


def fmt_int(value: object) -> str:
    return f"{value:,}" if isinstance(value, int) else DASH


def fmt_float(value: float | None, unit: str = "", digits: int = 1) -> str:
    return DASH if value is None else f"{value:,.{digits}f}{unit}"


def fmt_time(ms: int | None) -> str:
    if ms is None:
        return DASH
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


# Token accounts shown one by one (parties, not people); any other role (patients) only as a total.
TOKEN_ROLES_SHOWN = frozenset({"insurer", "pharmacy", "miner", "pool", "researcher", "sponsor", "operator"})


def fmt_minor(minor: int) -> str:
    return f"{minor / 100:,.2f}"


class ConsoleModel:
    """The read side of the console: one per console app."""

    def __init__(self, source: ConsoleSource, pseudonyms: Pseudonyms, refresh_s: float) -> None:
        self.source = source
        self.pseudonyms = pseudonyms
        self.refresh_s = refresh_s
        self.scan = LedgerScan(source.location, pseudonyms)
        self.history = History()
        self._refresh_lock = threading.Lock()
        self._refreshed_at: float | None = None

    def close(self) -> None:
        self.scan.close()

    # -- refresh -------------------------------------------------------------------------------------

    def refresh(self, force: bool = False) -> None:
        """Read new leaves and take a chart sample, unless another caller did within `refresh_s`."""
        with self._refresh_lock:
            now = time.monotonic()
            if not force and self._refreshed_at is not None and now - self._refreshed_at < self.refresh_s * 0.9:
                return
            self._refreshed_at = now
            self.scan.advance()
            latency = self.source.latency(LATENCY_WINDOW_S)
            stats = self.source.stats()
            self.history.add(now, Sample(
                anchored=int(stats.get("anchored") or 0),  # type: ignore[call-overload]
                latency_p50=latency[1] if latency else None, latency_p99=latency[2] if latency else None,
                finality_lag=self._finality_lag_s(), storage_shares=self.scan.totals.storage.shares))

    # -- shared lookups --------------------------------------------------------------------------------

    def _checkpoint_rows(self, limit: int) -> list[tuple[int, bytes, int]]:
        rows = self.scan.query("SELECT tree_size, root_hash, issued_ms FROM checkpoints ORDER BY tree_size DESC "
                               "LIMIT ?", (limit,))
        return [(int(size), bytes(root), int(ms)) for size, root, ms in rows]

    def _checkpoint_count(self) -> int:
        return int(self.scan.query("SELECT COUNT(*) FROM checkpoints")[0][0])

    def final_size(self) -> int:
        """The newest final checkpoint's size: the bridge's own word, or the newest `checkpoint.final` recorded."""
        recorded = self.scan.finals[-1].tree_size if self.scan.finals else -1
        return max(self.source.final_size(), recorded)

    def _issued_ms(self, tree_size: int) -> int | None:
        rows = self.scan.query("SELECT issued_ms FROM checkpoints WHERE tree_size=?", (tree_size,))
        return int(rows[0][0]) if rows else None

    def _finality_lag_s(self) -> float | None:
        latest = self._checkpoint_rows(1)
        final = self.final_size()
        if not latest or final < 0:
            return None
        final_ms = self._issued_ms(final)
        return None if final_ms is None else max(0, latest[0][2] - final_ms) / 1000

    def _latency(self) -> tuple[str, str]:
        latency = self.source.latency(LATENCY_WINDOW_S)
        if latency is None:
            return DASH, DASH
        return fmt_float(latency[1], " ms"), fmt_float(latency[2], " ms")

    def _devices(self) -> list[tuple[str, str, str, str, int, int | None]]:
        rows = self.scan.query("SELECT device_id, profile, owner, site, registered_idx, revoked_idx FROM devices "
                               "ORDER BY profile, device_id")
        return [(str(d), str(p), str(o), str(s), int(r), None if v is None else int(v)) for d, p, o, s, r, v in rows]

    # -- pages -----------------------------------------------------------------------------------------

    def page(self, name: str) -> Page:
        """The data of page `name` (one of PAGES)."""
        if name not in PAGES:
            raise KeyError(f"no console page {name!r}")
        with self.scan.locked():
            page: Page = getattr(self, f"_page_{name}")()
        return page

    def _page_overview(self) -> Page:
        t, stats = self.scan.totals, self.source.stats()
        latest = self._checkpoint_rows(1)
        p50, p99 = self._latency()
        figures = {
            "tree_size": fmt_int(t.scanned),
            "events": fmt_int(t.types[ENTRY_EVENT]),
            "devices": fmt_int(int(self.scan.query("SELECT COUNT(*) FROM devices")[0][0])),
            "checkpoints": fmt_int(self._checkpoint_count()),
            "latest_checkpoint": fmt_int(latest[0][0]) if latest else DASH,
            "final_size": fmt_int(self.final_size()) if self.final_size() >= 0 else DASH,
            "final_recorded": fmt_int(t.types[CHECKPOINT_FINAL]),
            "rejected": fmt_int(stats.get("rejected")),
            "ingest_rate": fmt_float(self.history.latest_rate(), " ev/s"),
            "latency_p50": p50, "latency_p99": p99,
            "access_grants": fmt_int(t.types[ACCESS_GRANT]),
            "role": str(stats.get("role") or DASH),
        }
        return Page("overview", figures, charts=("ingest_rate", "finality_lag"))

    def _page_fleet(self) -> Page:
        devices = self._devices()
        status = self.source.agent_status()
        by_profile = Counter(p for _, p, _, _, _, revoked in devices if revoked is None)
        rows = []
        for device, profile, owner, site, registered, revoked in devices[:FLEET_PAGE]:
            last = self.scan.query("SELECT MAX(seq) FROM events WHERE device_id=?", (device,))[0][0]
            seen_ms = None
            if last is not None:
                idx = self.scan.query("SELECT idx FROM events WHERE device_id=? AND seq=?", (device, last))[0][0]
                seen = self.scan.query("SELECT appended_ms FROM entries WHERE idx=?", (idx,))
                seen_ms = int(seen[0][0]) if seen else None
            report = (status or {}).get(device)
            rows.append({"device": device, "profile": profile, "owner": self.scan.display_party(owner),
                         "site": site, "registered": str(registered),
                         "state": "revoked" if revoked is not None else "active",
                         "last_seen": fmt_time(seen_ms),
                         "outbox": fmt_int(report.outbox_depth) if report else DASH,
                         "battery": f"{report.battery_pct} %" if report and report.battery_pct is not None else DASH})
        rejected = self.source.stats().get("rejected_by_reason") or {}
        figures = {"devices": fmt_int(len(devices)),
                   "active": fmt_int(sum(by_profile.values())),
                   "revoked": fmt_int(sum(1 for d in devices if d[5] is not None)),
                   "rejected": fmt_int(sum(rejected.values()) if isinstance(rejected, dict) else 0),
                   **{f"profile:{p}": fmt_int(n) for p, n in sorted(by_profile.items())}}
        return Page("fleet", figures, tables={
            "devices": rows,
            "profiles": [{"profile": p, "count": fmt_int(n)} for p, n in sorted(by_profile.items())],
            "rejections": [{"reason": r, "count": fmt_int(n)} for r, n in
                           sorted(rejected.items() if isinstance(rejected, dict) else [])],
        }, extra={"shown": min(len(devices), FLEET_PAGE)})

    def _page_ingest(self) -> Page:
        stats = self.source.stats()
        status = self.source.agent_status()
        p50, p99 = self._latency()
        figures = {key: fmt_int(stats.get(key)) for key in ("received", "anchored", "duplicates", "rejected",
                                                            "batches")}
        figures.update({"events": fmt_int(self.scan.totals.types[ENTRY_EVENT]),
                        "ingest_rate": fmt_float(self.history.latest_rate(), " ev/s"),
                        "latency_p50": p50, "latency_p99": p99,
                        "outbox_total": fmt_int(sum(s.outbox_depth for s in status.values())) if status else DASH,
                        "agents_reporting": fmt_int(len(status)) if status is not None else DASH})
        kinds = [{"kind": k, "count": fmt_int(n)} for k, n in sorted(self.scan.totals.event_kinds.items())]
        return Page("ingest", figures, tables={"kinds": kinds}, charts=("ingest_rate", "latency_p50", "latency_p99"))

    def _page_checkpoints(self) -> Page:
        final = self.final_size()
        rows = [{"tree_size": fmt_int(size), "issued": fmt_time(ms), "root": root.hex()[:16] + "…",
                 "final": "final" if 0 <= size <= final else "pending"}
                for size, root, ms in self._checkpoint_rows(CHECKPOINTS_SHOWN)]
        finals = [{"index": str(f.index), "tree_size": fmt_int(f.tree_size), "recorded": fmt_time(f.appended_ms),
                   # cosigner key names are "carechain.miner/<miner id>": the id is what the other pages show
                   "cosigners": ", ".join(n.rsplit("/", 1)[-1] for n in f.cosigners), "count": str(len(f.cosigners))}
                  for f in reversed(self.scan.finals)]
        latest = self._checkpoint_rows(1)
        figures = {"checkpoints": fmt_int(self._checkpoint_count()),
                   "latest_checkpoint": fmt_int(latest[0][0]) if latest else DASH,
                   "final_size": fmt_int(final) if final >= 0 else DASH,
                   "final_recorded": fmt_int(self.scan.totals.types[CHECKPOINT_FINAL]),
                   "lag_leaves": fmt_int(latest[0][0] - final) if latest and final >= 0 else DASH,
                   "lag_s": fmt_float(self._finality_lag_s(), " s")}
        return Page("checkpoints", figures, tables={"checkpoints": rows, "finals": finals}, charts=("finality_lag",))

    def _page_contracts(self) -> Page:
        t = self.scan.totals
        bonds = self.source.bonds()
        refusals = [{"reason": r, "count": fmt_int(n)} for r, n in sorted(t.sale_refusals.items())]
        bond_rows = [{"party": self.scan.display_party(b.party), "role": self.scan.roles.get(b.party, DASH),
                      "bond": fmt_minor(b.amount), "slashes": fmt_int(len(b.offences)),
                      "offences": ", ".join(sorted(set(b.offences))) or DASH,
                      "state": "suspended" if b.suspended else "active"} for b in bonds or []]
        money, account_rows = self._token_accounts(bonds or [])
        figures = {**money, "rx_anchored": fmt_int(t.types[RX_ANCHOR]), "rx_revoked": fmt_int(t.types[RX_REVOKE]),
                   "fills": fmt_int(t.event_kinds["purchase"]), "refusals": fmt_int(t.types[SALE_REFUSED]),
                   "wellness": fmt_int(t.types[WELLNESS_SETTLE]), "transfers": fmt_int(t.types[TOKEN_TRANSFER]),
                   "slashes": fmt_int(sum(len(b.offences) for b in bonds)) if bonds is not None else DASH}
        return Page("contracts", figures, tables={"refusals": refusals, "bonds": bond_rows, "accounts": account_rows},
                    extra={"contracts": bonds is not None})

    def _token_accounts(self, bonds: list[Bond]) -> tuple[dict[str, str], list[dict[str, str]]]:
        """Insurer charges and miners' rewards as the token ledger shows them, and a row per account; patients'
        accounts (keyed by their pseudonymous tokens) only as one total, never one by one."""
        accounts = self.source.token_accounts()
        if accounts is None:
            return {"insurer_paid": DASH, "miner_earned": DASH}, []
        bonded = {b.party: b.amount for b in bonds}
        rows, patients, patient_total = [], 0, 0
        paid = earned = 0
        for a in accounts:
            role, _, party = a.account.partition(":")
            if role == "patient" or role not in TOKEN_ROLES_SHOWN:
                patients += 1
                patient_total += a.balance
                continue
            change = a.balance + bonded.get(party, 0) - a.allocated  # a bond posted is still the party's money
            if role == "insurer":
                paid += -change
            elif role == "miner":
                earned += change
            rows.append({"account": a.account,  # an organisation's or a miner's account, never a person's
                         "balance": fmt_minor(a.balance), "allocated": fmt_minor(a.allocated),
                         "change": f"{'+' if change > 0 else ''}{fmt_minor(change)}"})
        if patients:
            rows.append({"account": f"patients ({patients} accounts)", "balance": fmt_minor(patient_total),
                         "allocated": DASH, "change": DASH})
        return {"insurer_paid": fmt_minor(paid), "miner_earned": fmt_minor(earned)}, rows

    def _page_storage(self) -> Page:
        s = self.scan.totals.storage
        archive = self.source.stats().get("archive") or {}
        figures = {"datasets": fmt_int(s.datasets), "commits": fmt_int(s.commits), "repairs": fmt_int(s.repairs),
                   "segments": fmt_int(s.segments), "shares": fmt_int(s.shares),
                   "shares_per_segment": fmt_float(s.shares / s.segments if s.segments else None),
                   "audits": fmt_int(s.audits), "retrievals": fmt_int(s.retrievals), "settles": fmt_int(s.settles)}
        rows = [{"counter": k, "count": fmt_int(v)} for k, v in sorted(archive.items() if isinstance(archive, dict)
                                                                       else [])]
        return Page("storage", figures, tables={"archive": rows}, charts=("storage_shares",))

    def _page_access(self, page_no: int = 1) -> Page:
        rows = list(reversed(self.scan.access))
        counts = Counter(r.action for r in rows)
        start = (max(page_no, 1) - 1) * ACCESS_PAGE
        figures = {"requests": fmt_int(counts["requested"]), "grants": fmt_int(self.scan.totals.types[ACCESS_GRANT]),
                   "revocations": fmt_int(counts["revoked"]), "faults": fmt_int(counts["fault reported"])}
        return Page("access", figures, tables={"log": [_access_cells(r) for r in rows[start:start + ACCESS_PAGE]]},
                    extra={"page_no": max(page_no, 1), "pages": max(1, -(-len(rows) // ACCESS_PAGE))})

    def access_page(self, page_no: int) -> Page:
        """The access log's page `page_no` (1: the newest ACCESS_PAGE rows)."""
        with self.scan.locked():
            return self._page_access(page_no)

    def _page_consents(self) -> Page:
        rows = sorted(self.scan.consents.values(), key=lambda c: c.index, reverse=True)
        now_ms = int(time.time() * 1000)
        active = sum(1 for c in rows if c.revoked_at is None and c.expires_ms > now_ms)
        figures = {"consents": fmt_int(len(rows)), "active": fmt_int(active),
                   "revoked": fmt_int(sum(1 for c in rows if c.revoked_at is not None))}
        return Page("consents", figures, tables={"consents": [_consent_cells(c) for c in rows[:ACCESS_PAGE]]})


def _access_cells(row: AccessRow) -> dict[str, str]:
    return {"index": str(row.index), "time": fmt_time(row.appended_ms), "action": row.action, "who": row.who,
            "owner": row.owner, "scope": row.scope}


def _consent_cells(row: ConsentRow) -> dict[str, str]:
    return {"index": str(row.index), "time": fmt_time(row.appended_ms), "owner": row.owner, "kinds": row.kinds,
            "queries": row.queries, "min_cohort": str(row.min_cohort), "expires": fmt_time(row.expires_ms),
            "state": f"revoked at leaf {row.revoked_at}" if row.revoked_at is not None else "given"}
