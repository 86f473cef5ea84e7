"""Who may use the console: login, server-side sessions, CSRF tokens, roles, failed-login limits, HTTP headers.

`ConsoleAuth` gives the console app its three routes (GET/POST /login, POST /logout) and one ASGI middleware
that runs before every page (docs/console-access.md):

- a session is a random token in the `cc_session` cookie (HttpOnly, SameSite=Strict, Secure over https) naming
  an entry in memory; it ends after `session_idle_s` without a request, `session_max_s` after login, at logout,
  and as soon as its account is removed or its password or roles change (checked on every request);
- every state-changing request (POST, PUT, PATCH, DELETE) must carry the session's CSRF token, in the
  `csrf_token` form field or the `X-CSRF-Token` header, and come from this origin when the browser says;
- failed logins are counted per account name and per client address in a sliding window of `lockout_s`; past
  `max_login_failures` every attempt is refused (429), the right password included, until the window passes;
- anonymous requests for pages are sent to /login; /login, /healthz, /readyz, /metrics and /static/ are open;
- every response carries a strict Content-Security-Policy (no inline script or style), nosniff, no framing,
  no referrer to other sites, and pages are never cached.

Refusals are logged at WARNING on `carechain.console.auth` with the account name and client address (never a
password or a token) and counted in `ConsoleAuth.counters`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import secrets
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from carechain.config import ConsoleConfig
from chain_bridge.console.accounts import NAME_PATTERN, AccountBook, AccountError, Role

__all__ = ["ConsoleAuth", "ConsoleUser", "Role", "require_role", "login_url", "CONTENT_SECURITY_POLICY",
           "CSRF_FIELD", "CSRF_HEADER", "SESSION_COOKIE"]

log = logging.getLogger("carechain.console.auth")

SESSION_COOKIE = "cc_session"
LOGIN_COOKIE = "cc_login"  # the login form's own CSRF token, before there is a session
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
MAX_SESSIONS = 1000  # past this, the least recently used session ends
MAX_TRACKED_FAILURES = 10_000  # account names and addresses with recent failed logins
MAX_BODY_BYTES = 64 * 1024  # a console form is a few fields; nothing larger is read
# argon2id takes 64 MiB and tens of milliseconds per check: a burst of logins queues here instead of
# exhausting the host's memory (the lockout is checked again once an attempt's turn comes).
MAX_CONCURRENT_LOGINS = 2
LOGIN_FORM_TTL_S = 15 * 60
OPEN_PATHS = frozenset({"/login", "/healthz", "/readyz", "/metrics"})
OPEN_PREFIXES = ("/static/",)
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Scripts and styles only from files the console serves (static/console.js, console.css): an injected
# <script> or style attribute does nothing. No framing (clickjacking); forms post only back to the console.
CONTENT_SECURITY_POLICY = ("default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'; "
                           "object-src 'none'")
SECURITY_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    # Not `no-referrer`: under it browsers send `Origin: null` with the console's own form posts, and the origin
    # check could not tell them from a sandboxed attacker page. `same-origin` still tells other sites nothing.
    "referrer-policy": "same-origin",
}
BAD_LOGIN = "Wrong user name or password."
CSRF_REFUSED = ("Refused: this form's security token is missing or out of date, or it came from another site. "
                "Reload the page and try again.")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True)
class ConsoleUser:
    """The logged-in operator a request is made by (`request.state.user`)."""

    name: str
    roles: frozenset[Role]


@dataclass
class _Session:
    user: ConsoleUser
    account_version: tuple[int, int]  # (created_ms, changed_ms): a re-created or changed account ends it
    created: float
    last_seen: float
    csrf_token: str


def _key(token: str) -> str:
    # Sessions are found by the token's hash: the table never holds a usable cookie value.
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8", "surrogateescape"), b.encode("utf-8", "surrogateescape"))


class _Sessions:
    """Open sessions by token hash, least recently used first; at most `limit`."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._by_key: OrderedDict[str, _Session] = OrderedDict()
        self._lock = threading.Lock()

    def open(self, session: _Session) -> str:
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._by_key[_key(token)] = session
            while len(self._by_key) > self._limit:
                _, evicted = self._by_key.popitem(last=False)
                log.warning("console session of %r ended early: more than %d sessions are open", evicted.user.name,
                            self._limit)
        return token

    def get(self, token: str) -> _Session | None:
        with self._lock:
            return self._by_key.get(_key(token))

    def touch(self, token: str, now: float) -> None:
        with self._lock:
            key = _key(token)
            if (session := self._by_key.get(key)) is not None:
                session.last_seen = now
                self._by_key.move_to_end(key)

    def end(self, token: str) -> _Session | None:
        with self._lock:
            return self._by_key.pop(_key(token), None)

    def sweep(self, expired: Callable[[_Session], bool]) -> None:
        """Forget sessions that ended without another request (their browsers never came back)."""
        with self._lock:
            for key in [key for key, session in self._by_key.items() if expired(session)]:
                del self._by_key[key]

    def __len__(self) -> int:
        return len(self._by_key)


class _FailedLogins:
    """Failure times per key (an account name or a client address) within a sliding window."""

    def __init__(self, limit: int, window_s: float, max_keys: int) -> None:
        self.limit, self.window_s, self._max_keys = limit, window_s, max_keys
        self._times: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> deque[float] | None:
        times = self._times.get(key)
        if times is None:
            return None
        while times and now - times[0] >= self.window_s:
            times.popleft()
        if not times:
            del self._times[key]
            return None
        return times

    def record(self, key: str, now: float) -> int:
        """Count one failure; returns how many `key` has in the window now."""
        with self._lock:
            times = self._recent(key, now)
            if times is None:
                times = self._times[key] = deque(maxlen=self.limit)  # older ones never matter
            times.append(now)
            self._times.move_to_end(key)
            while len(self._times) > self._max_keys:  # memory stays bounded under a spray of names/addresses
                self._times.popitem(last=False)
            return len(times)

    def locked_for(self, key: str, now: float) -> float:
        """Seconds until `key` may try again (0: it may now)."""
        with self._lock:
            times = self._recent(key, now)
            if times is None or len(times) < self.limit:
                return 0.0
            return times[0] + self.window_s - now

    def clear(self, key: str) -> None:
        with self._lock:
            self._times.pop(key, None)


def _local_path(target: str | None) -> str | None:
    """`target` if it is a path on this site (`/fleet?x=1`), else None: `next=` never leads elsewhere."""
    if not target or len(target) > 2048 or not target.startswith("/") or target.startswith("//"):
        return None
    if "\\" in target or any(ord(c) < 0x20 or ord(c) == 0x7F for c in target):
        return None
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return None
    return target


def login_url(next_path: str | None = None, ended: bool = False) -> str:
    """/login, asking to come back to `next_path` (a local path) afterwards."""
    query: dict[str, str] = {}
    if (local := _local_path(next_path)) is not None and local != "/":
        query["next"] = local
    if ended:
        query["ended"] = "1"
    return "/login" + (f"?{urlencode(query)}" if query else "")


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _same_origin(request: HTTPConnection) -> bool:
    """False when the browser says the request comes from another site (Origin, else Referer)."""
    host = request.headers.get("host", "").lower()
    origin = request.headers.get("origin")
    if origin is not None:
        return origin != "null" and urlsplit(origin).netloc.lower() == host
    referer = request.headers.get("referer")
    if referer:
        return urlsplit(referer).netloc.lower() == host
    return True  # neither sent (some privacy settings strip them): the CSRF token alone decides


def _is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


class ConsoleAuth:
    """Accounts, sessions and login limits of one console; mount `routes()` and `middleware()` in its app."""

    def __init__(self, accounts_file: Path, cfg: ConsoleConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.book = AccountBook(accounts_file)
        self.cfg = cfg
        self.counters: Counter[str] = Counter()
        self._clock = clock
        self._sessions = _Sessions(MAX_SESSIONS)
        self._failures = _FailedLogins(cfg.max_login_failures, cfg.lockout_s, MAX_TRACKED_FAILURES)
        self._verifying = threading.BoundedSemaphore(MAX_CONCURRENT_LOGINS)
        self._form_key = secrets.token_bytes(32)  # signs login-form tokens; a restart voids open login pages
        self._pages = Environment(loader=PackageLoader("chain_bridge.console", "templates"),
                                  autoescape=select_autoescape(["html"]))

    @property
    def session_count(self) -> int:
        """Sessions open now (some may have expired without a request since)."""
        return len(self._sessions)

    def routes(self) -> list[BaseRoute]:
        """GET /login (the form), POST /login, POST /logout."""
        return [Route("/login", self._login_page, methods=["GET"]),
                Route("/login", self._login, methods=["POST"]),
                Route("/logout", self._logout, methods=["POST"])]

    def middleware(self) -> list[Middleware]:
        """The middleware that authenticates every request; list it first so it wraps everything else."""
        return [Middleware(_AuthMiddleware, auth=self)]

    # -- sessions --------------------------------------------------------------------------------------------

    def _session_for(self, token: str | None) -> tuple[_Session | None, bool]:
        """The live session of cookie value `token` (touched), and whether one just ended (expired or revoked).

        Raises AccountError when the accounts file cannot be read: nobody is let in on a file nobody can check."""
        if not token:
            return None, False
        found = self._sessions.get(token)
        if found is None:
            return None, False
        now = self._clock()
        name = found.user.name
        if self._expired(found, now):
            self._sessions.end(token)
            self.counters["session_expired"] += 1
            log.info("console session of %r expired", name)
            return None, True
        account = self.book.current(name)
        if account is None or account.roles != found.user.roles or \
                (account.created_ms, account.changed_ms) != found.account_version:
            self._sessions.end(token)
            self.counters["session_revoked"] += 1
            log.info("console session of %r ended: the account was removed or its password or roles changed", name)
            return None, True
        self._sessions.touch(token, now)
        return found, False

    def _expired(self, session: _Session, now: float) -> bool:
        return now - session.last_seen >= self.cfg.session_idle_s or now - session.created >= self.cfg.session_max_s

    def _open_session(self, name: str, roles: frozenset[Role]) -> tuple[str, _Session] | None:
        account = self.book.current(name)
        if account is None or account.roles != roles:  # changed between the check and now: let them retry
            return None
        now = self._clock()
        self._sessions.sweep(lambda old: self._expired(old, now))
        session = _Session(ConsoleUser(name, roles), (account.created_ms, account.changed_ms), now, now,
                           secrets.token_urlsafe(32))
        return self._sessions.open(session), session

    # -- the login form's token ------------------------------------------------------------------------------

    def _form_token(self, request: Request) -> str:
        """The login form's token: the browser's current one while it is young, so that a second login page (a
        second tab, or a redirected favicon request) does not void the form already on screen; else a new one."""
        current = request.cookies.get(LOGIN_COOKIE)
        if current and (age := self._form_token_age(current)) is not None and age <= LOGIN_FORM_TTL_S / 2:
            return current
        issued = str(int(self._clock()))
        nonce = secrets.token_urlsafe(16)
        mac = hmac.new(self._form_key, f"{issued}.{nonce}".encode(), hashlib.sha256).hexdigest()
        return f"{issued}.{nonce}.{mac}"

    def _form_token_age(self, token: str) -> float | None:
        """Seconds since this console signed `token`, or None if it did not."""
        parts = token.split(".")
        if len(parts) != 3 or not parts[0].isdigit():
            return None
        expected = hmac.new(self._form_key, f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256).hexdigest()
        return self._clock() - int(parts[0]) if _same(parts[2], expected) else None

    def _form_token_ok(self, cookie: str | None, field: str) -> bool:
        if not cookie or not field or not _same(cookie, field):
            return False
        age = self._form_token_age(cookie)
        return age is not None and 0 <= age <= LOGIN_FORM_TTL_S

    # -- refusals --------------------------------------------------------------------------------------------

    def _refuse_csrf(self, request: Request, who: str | None, why: str) -> Response:
        """The 403 for a state-changing request without the right token or from another origin; logged, counted."""
        self.counters["csrf_refused"] += 1
        log.warning("console refused %s %s from %s (user %r): %s", request.method, request.url.path,
                    _client(request), who, why)
        return PlainTextResponse(CSRF_REFUSED, status_code=403)

    # -- routes ----------------------------------------------------------------------------------------------

    def _page(self, request: Request, *, status: int = 200, error: str = "", notice: str = "", name: str = "",
              next_path: str | None = None) -> Response:
        token = self._form_token(request)
        html = self._pages.get_template("login.html").render(csrf_token=token, error=error, notice=notice,
                                                             user_name=name, next=_local_path(next_path) or "")
        response = HTMLResponse(html, status_code=status)
        response.set_cookie(LOGIN_COOKIE, token, max_age=LOGIN_FORM_TTL_S, path="/login", httponly=True,
                            samesite="strict", secure=request.url.scheme == "https")
        return response

    async def _login_page(self, request: Request) -> Response:
        ended = request.query_params.get("ended") == "1"
        return self._page(request, notice="Your session ended; log in again." if ended else "",
                          next_path=request.query_params.get("next"))

    async def _login(self, request: Request) -> Response:
        form = await request.form(max_files=0, max_fields=8)
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        await form.close()
        name, password = fields.get("user", ""), fields.get("password", "")
        shown = name[:64]  # what logs and the re-filled form show of whatever was typed
        next_path = fields.get("next")
        address = _client(request)
        if not self._form_token_ok(request.cookies.get(LOGIN_COOKIE), fields.get(CSRF_FIELD, "")):
            self._refuse_csrf(request, shown, "login form token missing, wrong or expired")
            return self._page(request, status=403, name=shown, next_path=next_path,
                              error="This login form expired or was not sent by this console. Try again.")
        keys = [f"addr:{address}"] + ([f"user:{name}"] if NAME_PATTERN.fullmatch(name) else [])
        try:
            wait, roles = await run_in_threadpool(self._verify, name, password, keys)  # off the event loop
            opened = self._open_session(name, roles) if roles is not None else None
        except AccountError as exc:
            log.error("console login impossible: %s", exc)
            return self._page(request, status=503, name=shown, next_path=next_path,
                              error="Login is unavailable: the console cannot read its accounts. The bridge's log "
                                    "says why.")
        if wait > 0:
            self.counters["login_locked"] += 1
            log.warning("console login for user %r from %s refused: locked out for %d s more after too many failed "
                        "logins", shown, address, math.ceil(wait))
            return self._page(request, status=429, name=shown, next_path=next_path,
                              error=f"Too many failed logins, try again in {math.ceil(wait)} s.")
        if opened is None:
            return self._failed(request, shown, keys, next_path)
        token, _ = opened
        self._failures.clear(f"user:{name}")
        ended = self._sessions.end(old) if (old := request.cookies.get(SESSION_COOKIE)) else None
        self.counters["login_ok"] += 1
        log.info("console login of %r from %s%s", name, address, " (previous session ended)" if ended else "")
        response = RedirectResponse(_local_path(next_path) or "/", status_code=303)
        # A new token at every login: a cookie planted before login (session fixation) is never promoted.
        response.set_cookie(SESSION_COOKIE, token, path="/", httponly=True, samesite="strict",
                            secure=request.url.scheme == "https")
        response.delete_cookie(LOGIN_COOKIE, path="/login")
        return response

    def _verify(self, name: str, password: str, keys: list[str]) -> tuple[float, frozenset[Role] | None]:
        """(seconds locked out, 0 if not; the roles if the password is right). Runs in a worker thread."""
        with self._verifying:
            wait = max(self._failures.locked_for(key, self._clock()) for key in keys)
            if wait > 0:  # locked: refused without looking at the password, right or wrong
                return wait, None
            return 0.0, self.book.verify(name, password)

    def _failed(self, request: Request, name: str, keys: list[str], next_path: str | None) -> Response:
        now = self._clock()
        address = _client(request)
        self.counters["login_failed"] += 1
        counts = [self._failures.record(key, now) for key in keys]
        log.warning("console login failed for user %r from %s (%d failed from this address in the last %d s)",
                    name, address, counts[0], int(self.cfg.lockout_s))
        for key, count in zip(keys, counts, strict=True):
            if count == self.cfg.max_login_failures:
                log.warning("console logins for %s locked for %d s after %d failed logins (last: user %r from %s)",
                            key.replace(":", " ", 1), int(self.cfg.lockout_s), count, name, address)
        return self._page(request, status=401, name=name, next_path=next_path, error=BAD_LOGIN)

    async def _logout(self, request: Request) -> Response:
        token = request.cookies.get(SESSION_COOKIE)
        ended = self._sessions.end(token) if token else None
        if ended is not None:
            self.counters["logout"] += 1
            log.info("console logout of %r from %s", ended.user.name, _client(request))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict",
                               secure=request.url.scheme == "https")
        return response


def require_role(request: Request, role: Role) -> ConsoleUser:
    """The request's user if they hold `role`: 403 if they do not, a redirect to /login if nobody is logged in."""
    user = getattr(request.state, "user", None)
    if not isinstance(user, ConsoleUser):
        raise HTTPException(303, "log in first", headers={"Location": login_url(request.url.path)})
    if role not in user.roles:
        log.info("console refused %s to %r: it needs the %s role", request.url.path, user.name, role)
        raise HTTPException(403, f"This page needs the {role} role, which account {user.name!r} does not hold; an "
                                 "administrator grants roles with `carechain console user roles` on the bridge host.")
    return user


# -- the middleware ----------------------------------------------------------------------------------------------


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body, or None if it exceeds `limit` bytes or the client went away."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _posted_csrf_token(request: Request) -> str | None:
    """The token in the X-CSRF-Token header, else in the form's `csrf_token` field."""
    if (header := request.headers.get(CSRF_HEADER)) is not None:
        return header
    if not request.headers.get("content-type", "").startswith(("application/x-www-form-urlencoded",
                                                               "multipart/form-data")):
        return None
    try:
        form = await request.form(max_files=0)
    except HTTPException:  # a malformed body holds no token
        return None
    value = form.get(CSRF_FIELD)
    await form.close()
    return value if isinstance(value, str) else None


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands out `body` once, then waits on the real one (for the disconnect)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


class _AuthMiddleware:
    """Pure ASGI (so streamed pages stream): session → request.state, redirects, CSRF, headers."""

    def __init__(self, app: ASGIApp, auth: ConsoleAuth) -> None:
        self.app = app
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        secure = scope.get("scheme") == "https"
        clear_cookie = False

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", []))
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
                if not path.startswith(OPEN_PREFIXES):
                    headers["cache-control"] = "no-store"
                if clear_cookie and not any(v.startswith(f"{SESSION_COOKIE}=") for v in headers.getlist("set-cookie")):
                    headers.append("set-cookie", f"{SESSION_COOKIE}=; Max-Age=0; Path=/; HttpOnly; SameSite=Strict"
                                   + ("; Secure" if secure else ""))
            await send(message)

        request = Request(scope)
        if scope["method"] in UNSAFE_METHODS:
            declared = request.headers.get("content-length", "0")
            body = await _read_body(receive, MAX_BODY_BYTES) if declared.isdigit() and \
                int(declared) <= MAX_BODY_BYTES else None
            if body is None:
                await PlainTextResponse(f"refused: the console reads request bodies of at most {MAX_BODY_BYTES} bytes",
                                        status_code=413)(scope, receive, send_with_headers)
                return
            original = receive
            receive = _replay(body, original)
            request = Request(scope, _replay(body, original))  # for the CSRF field; the app reads its own copy
        try:
            session, ended = self.auth._session_for(request.cookies.get(SESSION_COOKIE))
        except AccountError as exc:
            log.error("console: %s", exc)
            await PlainTextResponse("The console cannot read its accounts file; the bridge's log says why.",
                                    status_code=503)(scope, receive, send_with_headers)
            return
        clear_cookie = ended
        state = scope.setdefault("state", {})
        state["user"] = session.user if session else None
        state["csrf_token"] = session.csrf_token if session else None
        refusal = await self._check(request, session, ended)
        if refusal is not None:
            await refusal(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A WebSocket opens only for a live session from this origin (a page elsewhere could open one with
        the operator's cookies otherwise); refused with close code 1008 (an HTTP 403 to the browser)."""
        request = HTTPConnection(scope)
        try:
            session, _ = self.auth._session_for(request.cookies.get(SESSION_COOKIE))
        except AccountError as exc:
            log.error("console: %s", exc)
            session = None
        if session is None or not _same_origin(request):
            await send({"type": "websocket.close", "code": 1008})
            return
        scope.setdefault("state", {}).update(user=session.user, csrf_token=session.csrf_token)
        await self.app(scope, receive, send)

    async def _check(self, request: Request, session: _Session | None, ended: bool) -> Response | None:
        """The response that refuses this request, or None to let it through."""
        path, method = request.url.path, request.method
        unsafe = method in UNSAFE_METHODS
        who = session.user.name if session else None
        if unsafe and not _same_origin(request):
            sender = request.headers.get("origin") or request.headers.get("referer")
            return self.auth._refuse_csrf(request, who, f"sent from another origin ({sender!r})")
        if _is_open(path):
            return None  # POST /login checks its own form token
        if session is None:
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(login_url(target if method in ("GET", "HEAD") else None, ended), status_code=303)
        if unsafe:
            token = await _posted_csrf_token(request)
            if not token or not _same(token, session.csrf_token):
                return self.auth._refuse_csrf(request, who, "CSRF token missing or wrong")
        return None
