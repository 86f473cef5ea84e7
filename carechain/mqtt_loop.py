"""One network thread for many MQTT clients: what an agent with hundreds of devices needs.

paho's own loop (`loop_start`) gives each client a thread and waits on `select()`, which cannot watch a file
descriptor numbered 1024 or above. An agent running 1,000 devices, each with its own login and so its own
connection, holds ~3,000 descriptors: the clients whose sockets land above 1023 fail every connect silently
(paho's loop returns "connection lost" before the callbacks run) and never come up, and the 1,000 threads
spend the agent's CPU fighting over the GIL. `NetworkLoop` drives any number of clients from one thread on
`selectors.DefaultSelector` (epoll on Linux), through paho's external-loop API (`loop_read`, `loop_write`,
`loop_misc` and the socket callbacks). Connects run on a few connector threads, so one unreachable broker
address (a connect blocked until its timeout) never stalls the clients already connected.

Reconnect delays are the clients' own (`carechain.transport`'s `_Link`, the one retry policy): this loop only
waits them out.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import paho.mqtt.client as mqtt

log = logging.getLogger("carechain.transport")
MISC_EVERY_S = 1.0  # keepalive pings and their timeouts (paho's loop_misc) are checked this often
CONNECTORS = 4  # threads that dial brokers; a blocked dial holds one of them, never the network thread


class LinkState(Protocol):
    """What the loop needs of a client's link (carechain.transport._Link)."""

    retry_delay_s: float
    closed: bool  # the caller disconnected on purpose: never reconnect


@dataclass
class _Entry:
    client: mqtt.Client
    link: LinkState
    sock: Any = None  # the socket registered with the selector, if any
    events: int = 0  # what the selector watches `sock` for
    dialling: bool = False
    lost: bool = False  # its socket closed: wait the link's delay (known once paho's on_disconnect ran)
    next_attempt: float = 0.0


class NetworkLoop:
    """Drives MQTT clients added with `add` from one thread until `stop`."""

    def __init__(self, name: str = "mqtt-network") -> None:
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._entries: dict[mqtt.Client, _Entry] = {}
        # Requests from other threads (a publish wants its packet written; a connector opened a socket),
        # applied by the network thread: only it touches the selector.
        self._want_write: set[mqtt.Client] = set()
        self._opened: list[tuple[mqtt.Client, Any]] = []
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._connectors = ThreadPoolExecutor(CONNECTORS, thread_name_prefix=f"{name}-dial")
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- called from any thread ----------------------------------------------------------------------

    def add(self, client: mqtt.Client, link: LinkState) -> None:
        """Take over `client` (already `connect_async`ed, never `loop_start`ed): dial it now, keep it connected."""
        client.on_socket_open = self._socket_opened
        client.on_socket_close = self._socket_closed
        client.on_socket_register_write = self._register_write
        client.on_socket_unregister_write = lambda *_: None  # the network thread re-checks want_write itself
        with self._lock:
            self._entries[client] = _Entry(client, link, next_attempt=time.monotonic())
        self._wake()

    def stop(self, timeout: float = 5.0) -> None:
        """Let queued packets (DISCONNECTs) go out for up to `timeout`, then close every socket and end."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(e.client.want_write() and e.sock is not None
                                                  for e in list(self._entries.values())):
            time.sleep(0.02)
        self._stopping.set()
        self._wake()
        self._thread.join(timeout=max(0.1, deadline - time.monotonic()) + 1.0)
        self._connectors.shutdown(wait=False, cancel_futures=True)

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # a full pipe: the network thread has wake-ups queued already
            os.write(self._wake_w, b"\0")

    def _register_write(self, client: mqtt.Client, _userdata: object, _sock: object) -> None:
        with self._lock:
            self._want_write.add(client)
        if threading.current_thread() is not self._thread:
            self._wake()

    def _socket_opened(self, client: mqtt.Client, _userdata: object, sock: Any) -> None:
        with self._lock:
            self._opened.append((client, sock))
        self._wake()

    def _socket_closed(self, client: mqtt.Client, _userdata: object, sock: Any) -> None:
        # paho closes sockets from the network thread (a read or write failed, keepalive expired) or from a
        # connector (a reconnect discards the previous socket): either way the selector must forget it now,
        # before the descriptor number is reused.
        with self._lock:
            entry = self._entries.get(client)
            if entry is not None and entry.sock is sock:
                entry.sock, entry.lost = None, True
                with contextlib.suppress(KeyError, ValueError, OSError):
                    self._selector.unregister(sock)

    # -- the network thread --------------------------------------------------------------------------

    def _run(self) -> None:
        next_misc = time.monotonic() + MISC_EVERY_S
        try:
            while not self._stopping.is_set():
                now = time.monotonic()
                timeout = min(next_misc, self._next_dial(now)) - now
                for key, mask in self._selector.select(max(0.0, min(timeout, MISC_EVERY_S))):
                    if key.data is None:
                        self._drain_wakeups()
                        continue
                    client: mqtt.Client = key.data
                    if mask & selectors.EVENT_READ:
                        self._read(client)
                    if mask & selectors.EVENT_WRITE:
                        self._write(client)
                self._apply_requests()
                now = time.monotonic()
                if now >= next_misc:
                    next_misc = now + MISC_EVERY_S
                    for entry in list(self._entries.values()):
                        if entry.sock is not None:
                            entry.client.loop_misc()
                self._dial_due(time.monotonic())
        except Exception:  # a bug here would silently cut every device off: say so loudly
            log.exception("MQTT network loop failed; no client is served any more")
            raise
        finally:
            for entry in list(self._entries.values()):
                if entry.sock is not None:
                    with contextlib.suppress(OSError):
                        entry.sock.close()
            self._selector.close()
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _apply_requests(self) -> None:
        with self._lock:
            opened, self._opened = self._opened, []
            want_write, self._want_write = self._want_write, set()
            for client, sock in opened:
                entry = self._entries.get(client)
                if entry is None or sock.fileno() < 0:
                    continue
                entry.sock, entry.lost, entry.events = sock, False, selectors.EVENT_READ
                self._selector.register(sock, entry.events, client)
                want_write.add(client)  # the CONNECT packet
        for client in want_write:
            self._write(client)

    def _read(self, client: mqtt.Client) -> None:
        client.loop_read()
        # TLS: records already decrypted into the SSL object's buffer make the socket look idle to epoll.
        sock = client.socket()
        while isinstance(sock, ssl.SSLSocket) and sock.pending() > 0:
            client.loop_read()
            sock = client.socket()

    def _write(self, client: mqtt.Client) -> None:
        """Write what `client` has queued; watch its socket for room only while something is left."""
        entry = self._entries.get(client)
        if entry is None or entry.sock is None:
            return
        client.loop_write()  # most packets go out at once; what does not fit waits for EVENT_WRITE
        if entry.sock is None:  # the write failed and paho closed the socket
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.want_write() else 0)
        if events != entry.events:
            entry.events = events
            self._selector.modify(entry.sock, events, client)

    def _next_dial(self, now: float) -> float:
        waits = [e.next_attempt for e in self._entries.values() if e.sock is None and not e.dialling]
        return min(waits, default=now + MISC_EVERY_S)

    def _dial_due(self, now: float) -> None:
        for entry in list(self._entries.values()):
            if entry.sock is not None or entry.dialling:
                continue
            if entry.lost:  # paho's on_disconnect has run since: the link knows how long to wait
                entry.lost = False
                entry.next_attempt = now + entry.link.retry_delay_s
            if entry.next_attempt > now:
                continue
            if entry.link.closed:
                del self._entries[entry.client]
                continue
            entry.dialling = True
            self._connectors.submit(self._dial, entry)

    def _dial(self, entry: _Entry) -> None:
        try:
            entry.client.reconnect()  # carechain.transport's client logs a failure with what to do about it
        except (TimeoutError, OSError):
            pass
        except Exception:
            log.exception("%s: unexpected error while connecting", entry.client._client_id.decode())
        finally:
            # A dial that opened a socket is followed by the CONNACK or a close; one that did not is retried after
            # the link's delay (set by the failure it just logged).
            entry.next_attempt = time.monotonic() + entry.link.retry_delay_s
            entry.dialling = False
            self._wake()
