"""An in-process MQTT broker (amqtt) for the demo and for machines without mosquitto.

It runs on its own thread and event loop so that the bridge and agents use it exactly as they would a
real broker: over TCP on loopback. Production deployments use mosquitto (or a clustered broker).

The thread is a daemon and holds no worker threads of its own (stopping is an asyncio event set from the
caller's thread, not a blocking wait in an executor), so a process that forgets `stop()` — or dies of an
exception before reaching it — still exits instead of hanging on the broker.

Two amqtt 0.12 bugs are fixed here. On every connection amqtt walks all subscription filters of all sessions
and sends the new client every retained message matching any of them (another party's retained messages in a
requester's inbox subscription); and since that walk awaits each delivery, a client subscribing meanwhile makes
it fail with "dictionary changed size during iteration" (the connecting client is dropped). Here a client gets
only the retained messages of the filters it subscribed to, and the walk runs over a snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from typing import Any


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class _Filters(dict[str, Any]):
    """amqtt's subscription table, iterated over a snapshot of its filters (it changes while walked)."""

    def __iter__(self) -> Any:
        return iter(list(self.keys()))

    def items(self) -> Any:  # walked while delivering a message, which awaits
        return list(super().items())


def _broker_class() -> type:
    from amqtt.broker import Broker  # imported lazily: only the demo and fallback tests need it

    class FixedBroker(Broker):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            setattr(self, "_subscriptions", _Filters(getattr(self, "_subscriptions")))  # noqa: B009, B010

        async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int],
                                                              session: Any) -> None:
            subscribers = self._subscriptions.get(subscription[0], ())
            if any(s.client_id == session.client_id for s, _qos in subscribers):
                await super()._publish_retained_messages_for_subscription(subscription, session)

    return FixedBroker


class EmbeddedBroker:
    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop_requested: asyncio.Event | None = None  # lives on the broker's loop
        self._error: BaseException | None = None

    def start(self, timeout: float = 15.0) -> EmbeddedBroker:
        # amqtt logs every connection at INFO; keep the demo's output readable.
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self._thread = threading.Thread(target=self._main, name="embedded-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout) or self._error:
            raise RuntimeError(f"embedded MQTT broker did not start on {self.host}:{self.port}: {self._error}")
        return self

    def _main(self) -> None:
        broker_class = _broker_class()

        async def serve() -> None:
            broker = broker_class({
                "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}",
                                          "max_connections": 5000}},
                "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
            })
            self._stop_requested = asyncio.Event()
            await broker.start()
            self._ready.set()
            await self._stop_requested.wait()
            await broker.shutdown()

        loop = self._loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(serve())
        except BaseException as exc:  # surfaced by start()
            self._error = exc
            self._ready.set()
        finally:
            try:
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                loop.close()

    def stop(self, timeout: float = 10.0) -> None:
        """Shut the broker down and wait (at most `timeout` s) for its thread; safe to call twice."""
        loop, requested = self._loop, self._stop_requested
        if loop is not None and requested is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed in between: already stopped
                loop.call_soon_threadsafe(requested.set)
        if self._thread:
            self._thread.join(timeout=timeout)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
