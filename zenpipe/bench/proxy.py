"""A loopback TCP proxy to PostgreSQL that loses COMMIT replies or cuts before COMMIT.

Put between the workers and the server (their DSN points at `CommitProxy.port`), it
forwards every byte both ways until armed.  Armed with a mode, the next ``COMMIT`` any
connection sends is handled so:

- ``drop_ack``: the COMMIT is forwarded, the proxy waits until the server has answered
  (its next ``ReadyForQuery``, idle or, when the COMMIT was pipelined with the next
  transaction's BEGIN, in transaction: the commit landed), then cuts the client's
  connection without passing the answer on.  The client sees a broken connection
  with its commit's outcome unknown, exactly as when a network or a PgBouncer dies at
  that moment;
- ``cut``: the COMMIT is never forwarded and both sides are cut: the server rolls the
  transaction back, the client again does not know.

psycopg sends ``Connection.commit()`` and the end of ``with conn.transaction()`` as a
simple-protocol Query message; the writer's pipelined fast path (docs/upserting.md)
sends its COMMIT as an extended-protocol Parse in the same round trip as its last
statements.  The proxy looks for both: a proxy that saw only the first never touched
the commit of a pipelined write, the one that matters most.  Each firing is recorded in
`fired` with its time; `dropped` is set once a reply was swallowed after the server
answered the COMMIT (it landed).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Literal

__all__ = ["COMMIT_MESSAGE", "COMMIT_PARSE", "READY", "READY_IDLE", "CommitProxy", "Mode"]

#: The simple-protocol Query message psycopg sends for COMMIT.
COMMIT_MESSAGE = b"Q\x00\x00\x00\x0bCOMMIT\x00"
#: The extended-protocol Parse of an unnamed COMMIT: a COMMIT sent in pipeline mode.
COMMIT_PARSE = b"P\x00\x00\x00\x0e\x00COMMIT\x00"
#: ReadyForQuery, idle: the server's last message after a successful COMMIT.
READY_IDLE = b"Z\x00\x00\x00\x05I"
#: ReadyForQuery of any transaction status (the status byte follows).
READY = b"Z\x00\x00\x00\x05"

Mode = Literal["drop_ack", "cut"]


class CommitProxy:
    """Listens on ``127.0.0.1``:`port` and forwards to *host*:*port* (a Unix socket
    folder when *host* starts with ``/``).  Thread-based; `close` ends everything."""

    def __init__(self, host: str, port: int) -> None:
        self._upstream = (host, port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._armed: list[Mode] = []
        #: (time.time(), mode) of every COMMIT the proxy interfered with.
        self.fired: list[tuple[float, Mode]] = []
        #: Set when a ``drop_ack`` swallowed the server's answer to a COMMIT.
        self.dropped = threading.Event()
        self._socks: set[socket.socket] = set()
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name="zenpipe-proxy", daemon=True)
        self._thread.start()

    def arm(self, mode: Mode) -> None:
        """Interfere with the next COMMIT any connection sends (armings queue up)."""
        with self._lock:
            self._armed.append(mode)

    @property
    def armed(self) -> int:
        with self._lock:
            return len(self._armed)

    def _connect_upstream(self) -> socket.socket:
        host, port = self._upstream
        if host.startswith("/"):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(f"{host}/.s.PGSQL.{port}")
            return s
        return socket.create_connection((host, port), timeout=10)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = self._connect_upstream()
                server.settimeout(None)
            except OSError:  # the server is restarting: the client sees a refused login
                _close(client)
                continue
            mode: list[Mode] = []  # set by the client side when it fires
            with self._lock:
                self._socks.update((client, server))
            for target in (self._client_to_server, self._server_to_client):
                threading.Thread(target=target, args=(client, server, mode), daemon=True).start()

    def _client_to_server(
        self, client: socket.socket, server: socket.socket, mode: list[Mode]
    ) -> None:
        tail = b""
        try:
            while data := client.recv(65536):
                seen = tail + data
                if COMMIT_MESSAGE in seen or COMMIT_PARSE in seen:
                    with self._lock:
                        fire = self._armed.pop(0) if self._armed else None
                        if fire is not None:
                            self.fired.append((time.time(), fire))
                    if fire == "cut":
                        break  # never forwarded: the server rolls back
                    if fire == "drop_ack":
                        mode.append(fire)
                tail = seen[-len(COMMIT_PARSE) :]  # a message split across reads
                server.sendall(data)
        except OSError:
            pass
        self._close_pair(client, server)

    def _server_to_client(
        self, client: socket.socket, server: socket.socket, mode: list[Mode]
    ) -> None:
        swallowed = b""
        try:
            while data := server.recv(65536):
                if mode:
                    swallowed += data
                    at = swallowed.find(READY)
                    if at >= 0 and len(swallowed) > at + len(READY):  # COMMIT answered
                        self.dropped.set()
                        break
                    continue
                client.sendall(data)
        except OSError:
            pass
        self._close_pair(client, server)

    def _close_pair(self, *socks: socket.socket) -> None:
        with self._lock:
            self._socks.difference_update(socks)
        _close(*socks)

    def close(self) -> None:
        self._closed = True
        _close(self._listener)
        with self._lock:
            socks = list(self._socks)
            self._socks.clear()
        _close(*socks)
        self._thread.join(10)


def _close(*socks: socket.socket) -> None:
    for s in socks:
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            s.close()
