"""The console's Starlette app: server-rendered pages, one live stream, /metrics, /healthz and /readyz.

Pages render every figure on load (they work without JavaScript); `static/console.js` then follows
`/events?page=NAME`, a server-sent event stream of the same figures every `refresh_s`, and redraws the charts.
Sign-in, sessions and CSRF are `chain_bridge.console.auth`'s; this module only says which role sees which page:
the operator pages to operators (and privacy officers), the access log and consents to privacy officers only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Receive, Scope, Send

from carechain.config import ConsoleConfig
from chain_bridge.console.auth import ConsoleAuth, ConsoleUser, Role, login_url, require_role
from chain_bridge.console.charts import polyline
from chain_bridge.console.pseudonyms import Pseudonyms
from chain_bridge.console.read_model import PAGES, PRIVACY_PAGES, ConsoleModel
from chain_bridge.console.source import ConsoleSource

log = logging.getLogger("carechain.bridge.console")

HERE = Path(__file__).parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"
PSEUDONYM_KEY = "pseudonym.key"
# Live streams at once (each holds a connection and a timer): beyond this a page keeps the figures it loaded with.
MAX_STREAMS = 32
# A stream ends after this long; the browser's EventSource reconnects by itself (and re-checks the session).
STREAM_MAX_S = 300.0
BUSY_RETRY_MS = 30_000  # a browser refused a stream (MAX_STREAMS) asks again this much later
NAV = (("overview", "/", "Overview"), ("fleet", "/fleet", "Fleet"), ("ingest", "/ingest", "Ingest"),
       ("checkpoints", "/checkpoints", "Checkpoints"), ("contracts", "/contracts", "Contracts"),
       ("storage", "/storage", "Storage"), ("access", "/access", "Access log"), ("consents", "/consents", "Consents"))
OPERATOR_PAGE_ROLES = frozenset({Role.OPERATOR, Role.PRIVACY_OFFICER})


def templates() -> Jinja2Templates:
    """The console's page templates (chain_bridge/console/templates), with the chart helper they draw with."""
    t = Jinja2Templates(directory=str(TEMPLATES))
    t.env.globals["polyline"] = polyline
    return t


def script_json(value: object) -> str:
    """JSON safe inside a <script type="application/json"> block: no `</script>` or comment opener can end it."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def allowed(user: ConsoleUser | None, page: str) -> bool:
    """Whether `user` may see `page`: the access log and consents need the privacy officer's role."""
    if user is None:
        return False
    if page in PRIVACY_PAGES:
        return Role.PRIVACY_OFFICER in user.roles
    return bool(user.roles & OPERATOR_PAGE_ROLES)


class _AsgiEndpoint:
    """An ASGI app as a Route endpoint: Starlette calls a plain function endpoint with a Request, an object
    like this one with (scope, receive, send)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


class _Streams:
    """Counts open live streams so that a flood of them cannot hold every worker thread."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        self._lock = threading.Lock()

    def enter(self) -> bool:
        with self._lock:
            if self.open >= self.limit:
                return False
            self.open += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self.open -= 1


def build_console_app(source: ConsoleSource, cfg: ConsoleConfig, accounts_file: Path,
                      metrics_app: ASGIApp | None = None) -> Starlette:
    """The console of the bridge behind `source`: pages, live stream, /metrics (`metrics_app`), health checks.

    The pseudonym key lives beside `accounts_file` (`pseudonym.key`, mode 0600, made on first use).
    """
    pseudonyms = Pseudonyms(Path(accounts_file).parent / PSEUDONYM_KEY)
    model = ConsoleModel(source, pseudonyms, cfg.refresh_s)
    auth = ConsoleAuth(Path(accounts_file), cfg)
    views = templates()
    streams = _Streams(MAX_STREAMS)
    stop_sampling = threading.Event()

    def sample_forever() -> None:
        # Charts need samples whether or not someone looks; a failing read is logged and tried again.
        while not stop_sampling.wait(cfg.refresh_s):
            try:
                model.refresh()
            except Exception:
                log.exception("console: could not read the ledger for the live figures; retrying")

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        sampler = threading.Thread(target=sample_forever, name="console-sampler", daemon=True)
        sampler.start()
        try:
            yield
        finally:
            stop_sampling.set()
            sampler.join(timeout=5)
            model.close()

    def user_of(request: Request) -> ConsoleUser:
        user: ConsoleUser | None = getattr(request.state, "user", None)
        if user is None:  # the auth middleware redirects anonymous page requests before they get here
            raise HTTPException(401, "sign in first")
        return user

    def check(request: Request, page: str) -> ConsoleUser:
        if page in PRIVACY_PAGES:
            return require_role(request, Role.PRIVACY_OFFICER)
        user = user_of(request)
        if not allowed(user, page):
            raise HTTPException(403, "this page is for operators")
        return user

    async def render(request: Request, name: str, page_no: int = 1) -> Response:
        user = check(request, name)
        await run_in_threadpool(model.refresh)
        page = await run_in_threadpool(model.access_page, page_no) if name == "access" else \
            await run_in_threadpool(model.page, name)
        series = model.history.series()
        return views.TemplateResponse(request, f"{name}.html", {
            "page": page, "user": user, "series": series, "live": script_json(page.live(series)),
            "visible": [n for n in NAV if allowed(user, n[0])], "refresh_ms": int(cfg.refresh_s * 1000)})

    def page_route(name: str, path: str) -> Route:
        async def endpoint(request: Request) -> Response:
            if name == "access":
                raw = request.query_params.get("page", "1")
                return await render(request, name, int(raw) if raw.isdigit() and len(raw) < 7 else 1)
            return await render(request, name)

        return Route(path, endpoint, name=name)

    async def events(request: Request) -> Response:
        name = request.query_params.get("page", "")
        if name not in PAGES:
            raise HTTPException(404, f"no page {name[:40]!r}: one of {', '.join(PAGES)}")
        check(request, name)

        async def stream() -> AsyncIterator[bytes]:
            # Counted inside the generator, so that the count is given back whenever the stream ends.
            if not streams.enter():
                yield f"retry: {BUSY_RETRY_MS}\n: too many live streams open; the page keeps its figures\n\n".encode()
                return
            loop = asyncio.get_running_loop()
            ends = loop.time() + STREAM_MAX_S
            try:
                yield f"retry: {int(cfg.refresh_s * 1000)}\n\n".encode()
                while loop.time() < ends and not await request.is_disconnected():
                    await run_in_threadpool(model.refresh)
                    page = await run_in_threadpool(model.page, name)
                    yield f"data: {json.dumps(page.live(model.history.series()))}\n\n".encode()
                    await asyncio.sleep(cfg.refresh_s)
            finally:
                streams.leave()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def live_json(request: Request) -> Response:
        """The same figures as one JSON object (polling clients and scripts)."""
        name = request.query_params.get("page", "")
        if name not in PAGES:
            raise HTTPException(404, f"no page {name[:40]!r}: one of {', '.join(PAGES)}")
        check(request, name)
        await run_in_threadpool(model.refresh)
        page = await run_in_threadpool(model.page, name)
        return JSONResponse(page.live(model.history.series()), headers={"Cache-Control": "no-store"})

    async def healthz(_request: Request) -> Response:
        return PlainTextResponse("ok")

    async def readyz(_request: Request) -> Response:
        reason = source.not_ready()
        if reason is None:
            try:
                await run_in_threadpool(model.scan.query, "SELECT 1")
            except Exception as exc:  # the ledger does not answer: not ready, and say why
                reason = f"the ledger does not answer: {exc}"
        return PlainTextResponse("ready" if reason is None else f"not ready: {reason}",
                                 200 if reason is None else 503)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code in (301, 302, 303, 307) and exc.headers and "Location" in exc.headers:
            return RedirectResponse(exc.headers["Location"], exc.status_code)
        if exc.status_code == 401:
            return RedirectResponse(login_url(request.url.path), 303)
        user: ConsoleUser | None = getattr(request.state, "user", None)
        return views.TemplateResponse(request, "error.html", {
            "status": exc.status_code, "detail": exc.detail, "user": user,
            "visible": [n for n in NAV if allowed(user, n[0])]}, status_code=exc.status_code)

    routes: list[BaseRoute] = [
        *(page_route(name, path) for name, path, _ in NAV),
        Route("/events", events), Route("/live", live_json),
        Route("/healthz", healthz), Route("/readyz", readyz),
        Mount("/static", StaticFiles(directory=str(STATIC)), name="static"),
        *auth.routes(),
    ]
    if metrics_app is not None:
        routes.append(Route("/metrics", _AsgiEndpoint(metrics_app)))  # exactly /metrics, no redirect to /metrics/
    app = Starlette(routes=routes, middleware=auth.middleware(), lifespan=lifespan,
                    exception_handlers={HTTPException: http_error})
    return app
