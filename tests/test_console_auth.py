"""Console access (issue 18): accounts, login, sessions, CSRF, roles and failed-login limits.

A small Starlette app of the test's own holds one operator page, one privacy-officer page and one form post,
behind `ConsoleAuth` exactly as the console mounts it; requests go through Starlette's TestClient. Time is an
injected clock, so expiry and lockout windows are checked without waiting or reading the wall clock.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from argon2 import PasswordHasher
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket, WebSocketDisconnect

from carechain.config import ConsoleConfig
from chain_bridge.console.accounts import AccountBook, AccountError, Role
from chain_bridge.console.auth import ConsoleAuth, require_role

OPERATOR_PW = "correct horse battery staple"
OFFICER_PW = "privacy is a team sport"
CFG = ConsoleConfig(session_idle_s=60, session_max_s=300, max_login_failures=3, lockout_s=60)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def accounts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One accounts file for the module (argon2 hashing takes a while): alice operates, pat is the privacy
    officer. Tests that change accounts copy it first."""
    path = tmp_path_factory.mktemp("console") / "accounts.json"
    book = AccountBook(path)
    book.add("alice", OPERATOR_PW, [Role.OPERATOR])
    book.add("pat", OFFICER_PW, [Role.PRIVACY_OFFICER])
    return path


@pytest.fixture
def own_accounts(accounts: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "console" / "accounts.json"
    copy.parent.mkdir(mode=0o700)
    copy.write_bytes(accounts.read_bytes())
    copy.chmod(0o600)
    return copy


def form_token(html: str) -> str:
    """The login form's CSRF token, as the page carries it."""
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found is not None, html
    return found.group(1)


class Console:
    """The test app and its auth, one clock, and clients that act as separate browsers."""

    def __init__(self, accounts_file: Path, cfg: ConsoleConfig = CFG) -> None:
        self.clock = Clock()
        self.auth = ConsoleAuth(accounts_file, cfg, clock=self.clock)

        async def fleet(request: Request) -> PlainTextResponse:
            user = require_role(request, Role.OPERATOR)
            return PlainTextResponse(f"fleet for {user.name}; csrf {request.state.csrf_token}")

        async def access_log(request: Request) -> PlainTextResponse:
            return PlainTextResponse(f"access log for {require_role(request, Role.PRIVACY_OFFICER).name}")

        async def action(request: Request) -> PlainTextResponse:
            form = await request.form()
            return PlainTextResponse(f"done: {form.get('what')}")

        async def healthz(request: Request) -> PlainTextResponse:
            return PlainTextResponse("ok")

        async def live(websocket: WebSocket) -> None:
            await websocket.accept()
            await websocket.send_text(f"live for {websocket.state.user.name}")
            await websocket.close()

        routes = [*self.auth.routes(), Route("/fleet", fleet), Route("/access-log", access_log),
                  Route("/action", action, methods=["POST"]), Route("/healthz", healthz), WebSocketRoute("/live", live)]
        self.app = Starlette(routes=routes, middleware=self.auth.middleware())

    def client(self, address: str = "10.0.0.1", base_url: str = "http://testserver") -> TestClient:
        return TestClient(self.app, base_url=base_url, client=(address, 50000), follow_redirects=False)

    def login(self, client: TestClient, user: str, password: str, **extra: str) -> httpx.Response:
        page = client.get("/login")
        assert page.status_code == 200
        return client.post("/login", data={"user": user, "password": password, "csrf_token": form_token(page.text),
                                           **extra})

    def logged_in(self, user: str = "alice", password: str = OPERATOR_PW, address: str = "10.0.0.1") -> TestClient:
        client = self.client(address)
        response = self.login(client, user, password)
        assert response.status_code == 303, response.text
        return client


@pytest.fixture
def console(accounts: Path) -> Iterator[Console]:
    yield Console(accounts)


def csrf_of(client: TestClient) -> str:
    page = client.get("/fleet")
    assert page.status_code == 200, page.text
    return page.text.rsplit("csrf ", 1)[1]


# -- login --------------------------------------------------------------------------------------------------------


def test_the_right_password_opens_a_session_with_a_strict_cookie(console: Console) -> None:
    client = console.client()
    response = console.login(client, "alice", OPERATOR_PW)
    assert response.status_code == 303 and response.headers["location"] == "/"
    cookie = next(c for c in response.headers.get_list("set-cookie") if c.startswith("cc_session="))
    flags = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/"} <= flags and "secure" not in flags
    assert len(client.cookies["cc_session"]) >= 43  # 32 random bytes, base64url
    assert client.get("/fleet").text.startswith("fleet for alice")
    assert console.auth.counters["login_ok"] == 1


def test_over_https_the_session_cookie_is_secure(console: Console) -> None:
    client = console.client(base_url="https://testserver")
    response = console.login(client, "alice", OPERATOR_PW)
    cookie = next(c for c in response.headers.get_list("set-cookie") if c.startswith("cc_session="))
    assert "secure" in cookie.lower()


def test_a_wrong_password_and_an_unknown_user_get_the_same_refusal(console: Console) -> None:
    wrong = console.login(console.client(), "alice", "not the password at all")
    unknown = console.login(console.client("10.0.0.2"), "mallory", "not the password at all")
    for response in (wrong, unknown):
        assert response.status_code == 401
        assert "Wrong user name or password." in response.text
        assert "cc_session" not in response.headers.get("set-cookie", "")
    assert console.auth.counters["login_failed"] == 2


def test_login_returns_to_a_local_page_only(console: Console) -> None:
    anonymous = console.client()
    redirect = anonymous.get("/fleet?site=ward-3")
    assert redirect.status_code == 303 and redirect.headers["location"] == "/login?next=%2Ffleet%3Fsite%3Dward-3"
    back = console.login(anonymous, "alice", OPERATOR_PW, next="/fleet?site=ward-3")
    assert back.headers["location"] == "/fleet?site=ward-3"
    for elsewhere in ("//evil.example/x", "https://evil.example/", "/\\evil.example", "javascript:alert(1)"):
        response = console.login(console.client("10.0.0.9"), "alice", OPERATOR_PW, next=elsewhere)
        assert response.headers["location"] == "/", elsewhere


def test_a_second_login_page_keeps_the_first_forms_token_valid(console: Console) -> None:
    client = console.client()
    first = form_token(client.get("/login").text)
    assert client.get("/favicon.ico").status_code == 303  # a browser's own request, sent on to /login
    client.get("/login?next=%2Ffavicon.ico")
    response = client.post("/login", data={"user": "alice", "password": OPERATOR_PW, "csrf_token": first})
    assert response.status_code == 303


def test_the_login_form_needs_its_own_token(console: Console) -> None:
    client = console.client()
    response = client.post("/login", data={"user": "alice", "password": OPERATOR_PW, "csrf_token": "forged"})
    assert response.status_code == 403 and "cc_session" not in client.cookies
    assert console.auth.counters["csrf_refused"] == 1
    console.clock.now += 16 * 60  # an old login page's token has expired
    token = form_token(client.get("/login").text)
    console.clock.now += 16 * 60
    late = client.post("/login", data={"user": "alice", "password": OPERATOR_PW, "csrf_token": token})
    assert late.status_code == 403


# -- roles and anonymous access ---------------------------------------------------------------------------------


def test_each_role_sees_its_own_pages_only(console: Console) -> None:
    operator = console.logged_in("alice", OPERATOR_PW)
    officer = console.logged_in("pat", OFFICER_PW, "10.0.0.2")
    assert operator.get("/access-log").status_code == 403
    assert officer.get("/access-log").text == "access log for pat"
    assert officer.get("/fleet").status_code == 403


def test_anonymous_requests_go_to_login_and_open_paths_stay_open(console: Console) -> None:
    anonymous = console.client()
    assert anonymous.get("/access-log").headers["location"] == "/login?next=%2Faccess-log"
    assert anonymous.post("/action", data={"what": "x"}).headers["location"] == "/login"
    assert anonymous.get("/healthz").text == "ok"
    assert anonymous.get("/login").status_code == 200


def test_every_response_carries_the_security_headers(console: Console) -> None:
    client = console.logged_in()
    for response in (client.get("/fleet"), client.get("/login"), console.client().get("/fleet")):
        csp = response.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["referrer-policy"] == "same-origin"  # `no-referrer` makes posts say Origin: null
        assert response.headers["cache-control"] == "no-store"


# -- CSRF -------------------------------------------------------------------------------------------------------


def test_a_post_needs_the_sessions_csrf_token(console: Console) -> None:
    client = console.logged_in()
    token = csrf_of(client)
    assert client.post("/action", data={"what": "x"}).status_code == 403
    assert client.post("/action", data={"what": "x", "csrf_token": "0" * len(token)}).status_code == 403
    assert client.post("/action", data={"what": "x"}, headers={"X-CSRF-Token": "nope"}).status_code == 403
    assert console.auth.counters["csrf_refused"] == 3
    assert client.post("/action", data={"what": "form", "csrf_token": token}).text == "done: form"
    assert client.post("/action", data={"what": "header"}, headers={"X-CSRF-Token": token}).text == "done: header"


def test_a_post_from_another_origin_is_refused_even_with_the_token(console: Console) -> None:
    client = console.logged_in()
    token = csrf_of(client)
    for header in ({"Origin": "https://evil.example"}, {"Origin": "null"}, {"Referer": "https://evil.example/p"}):
        assert client.post("/action", data={"what": "x", "csrf_token": token}, headers=header).status_code == 403
    assert client.post("/action", data={"what": "ok", "csrf_token": token},
                       headers={"Origin": "http://testserver"}).text == "done: ok"


def test_an_oversized_body_is_refused_before_it_is_read(console: Console) -> None:
    client = console.logged_in()
    assert client.post("/action", data={"what": "x" * 70_000, "csrf_token": csrf_of(client)}).status_code == 413


def test_logout_ends_the_session_for_good(console: Console) -> None:
    client = console.logged_in()
    stolen = client.cookies["cc_session"]
    assert client.post("/logout", data={"csrf_token": csrf_of(client)}).headers["location"] == "/login"
    assert client.get("/fleet").status_code == 303
    replay = console.client("10.0.0.5")
    replay.cookies.set("cc_session", stolen)
    assert replay.get("/fleet").status_code == 303
    assert console.auth.session_count == 0


def test_a_websocket_opens_only_for_a_session_from_this_origin(console: Console) -> None:
    with pytest.raises(WebSocketDisconnect) as refused, console.client().websocket_connect("/live"):
        pass
    assert refused.value.code == 1008
    client = console.logged_in()
    with pytest.raises(WebSocketDisconnect), client.websocket_connect("/live", headers={"Origin": "https://evil.example"}):
        pass
    with client.websocket_connect("/live", headers={"Origin": "http://testserver"}) as ws:
        assert ws.receive_text() == "live for alice"


# -- session lifetime -------------------------------------------------------------------------------------------


def test_a_session_ends_after_the_idle_timeout(console: Console) -> None:
    client = console.logged_in()
    for _ in range(3):  # activity keeps it alive
        console.clock.now += 59
        assert client.get("/fleet").status_code == 200
    console.clock.now += 60
    response = client.get("/fleet")
    assert response.status_code == 303 and "ended=1" in response.headers["location"]
    assert "cc_session=;" in response.headers["set-cookie"]
    assert console.auth.counters["session_expired"] == 1
    again = console.login(client, "alice", OPERATOR_PW)  # the same browser, its dead cookie still sent once
    assert again.status_code == 303 and client.get("/fleet").status_code == 200


def test_a_session_ends_at_its_absolute_limit_however_busy(console: Console) -> None:
    client = console.logged_in()
    for _ in range(5):
        console.clock.now += 59
        assert client.get("/fleet").status_code == 200
    console.clock.now += 10  # 305 s after login, 10 s after the last request
    assert client.get("/fleet").status_code == 303


def session_token(response: httpx.Response) -> str:
    cookie = next(c for c in response.headers.get_list("set-cookie") if c.startswith("cc_session="))
    return cookie.split(";", 1)[0].removeprefix("cc_session=")


def test_login_issues_a_new_session_token_and_drops_the_old_one(console: Console) -> None:
    planted = console.client()
    planted.cookies.set("cc_session", "planted-by-an-attacker")
    first = session_token(console.login(planted, "alice", OPERATOR_PW))
    assert first != "planted-by-an-attacker"
    client = console.client()
    client.cookies.set("cc_session", first)
    second = session_token(console.login(client, "alice", OPERATOR_PW))
    assert second != first
    old = console.client("10.0.0.7")
    old.cookies.set("cc_session", first)
    assert old.get("/fleet").status_code == 303
    new = console.client("10.0.0.7")
    new.cookies.set("cc_session", second)
    assert new.get("/fleet").status_code == 200


def test_the_session_table_is_bounded_and_drops_the_least_recently_used(accounts: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("chain_bridge.console.auth.MAX_SESSIONS", 2)
    console = Console(accounts)
    first, second = console.logged_in(address="10.0.3.1"), console.logged_in(address="10.0.3.2")
    assert first.get("/fleet").status_code == 200  # now `second` is the least recently used
    console.logged_in(address="10.0.3.3")
    assert console.auth.session_count == 2
    assert first.get("/fleet").status_code == 200 and second.get("/fleet").status_code == 303


@pytest.mark.parametrize("change", ["password", "roles", "remove"])
def test_changing_or_removing_an_account_ends_its_sessions(own_accounts: Path, change: str) -> None:
    console = Console(own_accounts)
    client = console.logged_in()
    assert client.get("/fleet").status_code == 200
    cli = AccountBook(own_accounts)  # as `carechain console user …` would, from another process
    {"password": lambda: cli.set_password("alice", "a brand new passphrase"),
     "roles": lambda: cli.set_roles("alice", [Role.OPERATOR, Role.PRIVACY_OFFICER]),
     "remove": lambda: cli.remove("alice")}[change]()
    assert client.get("/fleet").status_code == 303
    assert console.auth.counters["session_revoked"] == 1


def test_an_account_added_while_running_can_log_in_at_once(own_accounts: Path) -> None:
    console = Console(own_accounts)
    assert console.login(console.client(), "sam", "sam's long passphrase").status_code == 401
    AccountBook(own_accounts).add("sam", "sam's long passphrase", [Role.OPERATOR])
    assert console.login(console.client("10.0.0.2"), "sam", "sam's long passphrase").status_code == 303


# -- failed-login limits ----------------------------------------------------------------------------------------


def test_an_account_locks_after_too_many_failures_from_any_addresses(console: Console,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="carechain.console.auth")
    for address in ("10.0.1.1", "10.0.1.1", "10.0.1.2"):
        assert console.login(console.client(address), "alice", "guess number one!").status_code == 401
    locked = console.login(console.client("10.0.1.3"), "alice", OPERATOR_PW)  # the right password, a fresh address
    assert locked.status_code == 429 and re.search(r"Too many failed logins, try again in \d+ s", locked.text)
    assert console.login(console.client("10.0.1.3"), "pat", OFFICER_PW).status_code == 303  # others unaffected
    console.clock.now += 61
    assert console.login(console.client("10.0.1.3"), "alice", OPERATOR_PW).status_code == 303
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("login failed for user 'alice' from 10.0.1.2" in w for w in warnings)
    assert any("locked" in w and "user alice" in w for w in warnings)
    assert any("refused" in w and "'alice' from 10.0.1.3" in w for w in warnings)
    assert "guess number one!" not in caplog.text and OPERATOR_PW not in caplog.text
    assert console.auth.counters["login_locked"] == 1 and console.auth.counters["login_failed"] == 3


def test_an_address_locks_after_too_many_failures_on_any_names(console: Console,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="carechain.console.auth")
    for name in ("root", "admin", "alice"):
        console.login(console.client("10.0.2.1"), name, "password123456")
    assert console.login(console.client("10.0.2.1"), "pat", OFFICER_PW).status_code == 429
    assert console.login(console.client("10.0.2.2"), "pat", OFFICER_PW).status_code == 303
    assert any("addr 10.0.2.1" in r.getMessage() and "locked" in r.getMessage() for r in caplog.records)
    assert "password123456" not in caplog.text


# -- the accounts file ------------------------------------------------------------------------------------------


def test_the_accounts_file_is_private_and_holds_only_argon2id_hashes(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = tmp_path / "data" / "console" / "accounts.json"
        AccountBook(path).add("alice", OPERATOR_PW, [Role.OPERATOR])
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    raw = path.read_text()
    assert OPERATOR_PW not in raw
    entry = json.loads(raw)["users"]["alice"]
    assert json.loads(raw)["version"] == 1 and entry["roles"] == ["operator"]
    assert entry["hash"].startswith("$argon2id$") and PasswordHasher().verify(entry["hash"], OPERATOR_PW)
    assert entry["created_ms"] == entry["changed_ms"] > 0


def test_a_file_others_can_read_is_refused_with_the_fix(own_accounts: Path) -> None:
    own_accounts.chmod(0o644)
    with pytest.raises(AccountError, match=r"chmod 600"):
        AccountBook(own_accounts).verify("alice", OPERATOR_PW)
    console = Console(own_accounts)
    assert console.login(console.client(), "alice", OPERATOR_PW).status_code == 503


def test_names_passwords_and_roles_are_checked(tmp_path: Path) -> None:
    book = AccountBook(tmp_path / "accounts.json")
    for name, password, roles, message in [
        ("bad name", OPERATOR_PW, [Role.OPERATOR], "not allowed"),
        ("x" * 65, OPERATOR_PW, [Role.OPERATOR], "not allowed"),
        ("bob", "short pw", [Role.OPERATOR], "at least 12 characters"),
        ("bob", OPERATOR_PW, [], "at least one role"),
    ]:
        with pytest.raises(AccountError, match=message):
            book.add(name, password, roles)
    book.add("bob", OPERATOR_PW, [Role.OPERATOR])
    with pytest.raises(AccountError, match="already exists"):
        book.add("bob", OPERATOR_PW, [Role.OPERATOR])
    assert book.list() == [("bob", frozenset({Role.OPERATOR}))]


def test_an_unknown_name_costs_a_hash_check_like_a_known_one(accounts: Path) -> None:
    calls: list[str] = []

    class CountingHasher(PasswordHasher):
        def verify(self, hash: str | bytes, password: str | bytes) -> bool:  # noqa: A002 - argon2's name
            calls.append(str(hash))
            return super().verify(hash, password)

    book = AccountBook(accounts)
    book._hasher = CountingHasher()
    assert book.verify("nobody", OPERATOR_PW) is None
    assert book.verify("not a valid name!", OPERATOR_PW) is None
    assert book.verify("alice", "wrong wrong wrong") is None
    assert book.verify("alice", OPERATOR_PW) == frozenset({Role.OPERATOR})
    assert len(calls) == 4 and all(h.startswith("$argon2id$") for h in calls)


def test_a_weak_hash_is_upgraded_at_login_and_sessions_stay(own_accounts: Path) -> None:
    doc = json.loads(own_accounts.read_text())
    weak = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1).hash(OPERATOR_PW)
    doc["users"]["alice"]["hash"] = weak
    own_accounts.write_text(json.dumps(doc))
    before = doc["users"]["alice"]["changed_ms"]
    assert AccountBook(own_accounts).verify("alice", OPERATOR_PW) == frozenset({Role.OPERATOR})
    upgraded = json.loads(own_accounts.read_text())["users"]["alice"]
    assert upgraded["hash"] != weak and not PasswordHasher().check_needs_rehash(upgraded["hash"])
    assert upgraded["changed_ms"] == before
    assert stat.S_IMODE(own_accounts.stat().st_mode) == 0o600
