"""Retries after a lost COMMIT acknowledgement (issue 8, point 11), on a real server.

The lost acknowledgement is made by a real loopback TCP proxy between the writer and
PostgreSQL (`CommitAckDropper`): armed, it forwards the next ``COMMIT`` to the server,
waits until the server has answered (the commit landed), then cuts the client's
connection without passing the answer on.  The writer sees a broken connection, exactly
as when a network or a PgBouncer dies at that moment, and retries.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from helpers import wait_for

from zenpipe.claim import Claimer
from zenpipe.upsert import Upserter

# The simple-protocol Query message psycopg sends for Connection.commit() and for the
# end of a `with conn.transaction()` block.
COMMIT_MESSAGE = b"Q\x00\x00\x00\x0bCOMMIT\x00"
# The extended-protocol Parse of an unnamed COMMIT statement: how the writer's pipelined
# fast path (issue 10) commits, in the same round trip as its last statements.
COMMIT_PARSE = b"P\x00\x00\x00\x0e\x00COMMIT\x00"
# ReadyForQuery, idle: the server's last message after a successful COMMIT.
READY_IDLE = b"Z\x00\x00\x00\x05I"


class CommitAckDropper:
    """A TCP proxy to PostgreSQL that can lose the reply to one COMMIT."""

    def __init__(self, host: str, port: int) -> None:
        self._upstream = (host, port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._armed = False
        self.dropped = threading.Event()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._closed = False
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)

    def dsn(self, user: str, dbname: str) -> str:
        return (
            f"host=127.0.0.1 port={self.port} user={user} dbname={dbname} "
            "sslmode=disable gssencmode=disable"
        )

    def arm(self) -> None:
        """Lose the reply to the next COMMIT any connection sends."""
        with self._lock:
            self._armed = True
            self.dropped.clear()

    def _connect_upstream(self) -> socket.socket:
        host, port = self._upstream
        if host.startswith("/"):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(f"{host}/.s.PGSQL.{port}")
            return s
        return socket.create_connection((host, port))

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = self._connect_upstream()
            drop = threading.Event()  # set: swallow the server's next answer, then cut
            with self._lock:
                self._socks += [client, server]
            for target in (self._client_to_server, self._server_to_client):
                t = threading.Thread(target=target, args=(client, server, drop), daemon=True)
                t.start()
                self._threads.append(t)

    def _client_to_server(
        self, client: socket.socket, server: socket.socket, drop: threading.Event
    ) -> None:
        tail = b""
        try:
            while data := client.recv(65536):
                seen = tail + data
                with self._lock:
                    if self._armed and (COMMIT_MESSAGE in seen or COMMIT_PARSE in seen):
                        self._armed = False
                        drop.set()
                tail = seen[-len(COMMIT_MESSAGE) :]
                server.sendall(data)
        except OSError:
            pass
        _close(client, server)

    def _server_to_client(
        self, client: socket.socket, server: socket.socket, drop: threading.Event
    ) -> None:
        swallowed = b""
        try:
            while data := server.recv(65536):
                if drop.is_set():
                    swallowed += data
                    if READY_IDLE in swallowed:  # COMMIT answered: it landed
                        self.dropped.set()
                        _close(client, server)
                        return
                    continue
                client.sendall(data)
        except OSError:
            pass
        _close(client, server)

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            _close(s)
        for t in self._threads:
            t.join(10)


def _close(*socks: socket.socket) -> None:
    for s in socks:
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            s.close()


@pytest.fixture
def proxy(postgresql: psycopg.Connection[Any]) -> Iterator[CommitAckDropper]:
    p = CommitAckDropper(postgresql.info.host, postgresql.info.port)
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def proxied_dsn(proxy: CommitAckDropper, postgresql: psycopg.Connection[Any]) -> str:
    return proxy.dsn(postgresql.info.user, postgresql.info.dbname)


def _one(conn: psycopg.Connection[Any], sql: str, *params: Any) -> Any:
    row = conn.execute(sql, params or None).fetchone()
    conn.rollback()
    assert row is not None
    return row[0] if len(row) == 1 else row


def test_the_proxy_really_loses_a_landed_commit(
    proxy: CommitAckDropper, proxied_dsn: str, postgresql: psycopg.Connection[Any]
) -> None:
    with psycopg.connect(proxied_dsn) as conn:
        conn.execute("INSERT INTO results (link, data) VALUES ('https://landed', '{}')")
        proxy.arm()
        with pytest.raises(psycopg.OperationalError):
            conn.commit()
    assert proxy.dropped.is_set()
    assert _one(postgresql, "SELECT count(*) FROM results WHERE link = 'https://landed'") == 1


def test_lost_commit_ack_plain_upsert_counts_once(
    proxy: CommitAckDropper, proxied_dsn: str, postgresql: psycopg.Connection[Any]
) -> None:
    batch: list[dict[str, Any]] = [
        {"source_link": f"https://ack/{i}", "emails": [f"{i}@x.com"]} for i in range(20)
    ]
    batch.append({"source_link": "https://ack/bad", "country_code": "IDN"})
    with Upserter(proxied_dsn, server_id="s", max_wait=0.05) as up:
        proxy.arm()
        report = up.upsert(batch)
    assert proxy.dropped.is_set()  # the first attempt's commit landed, its ack was lost
    assert report.retries == 1 and report.already_committed
    # as for upsert_and_complete: nothing written again; validation's verdicts listed
    assert (report.written, report.rejected) == (0, 1)
    assert _one(postgresql, "SELECT count(*), sum(scrape_count) FROM zen_contacts") == (20, 20)
    assert _one(postgresql, "SELECT count(*) FROM zen_rejects") == 1


def test_lost_commit_ack_parallel_groups_count_once(
    proxy: CommitAckDropper, proxied_dsn: str, postgresql: psycopg.Connection[Any]
) -> None:
    batch = [{"source_link": f"https://pg/{i}"} for i in range(200)]
    with Upserter(proxied_dsn, server_id="s", parallel=2, max_wait=0.05) as up:
        proxy.arm()
        report = up.upsert(batch)
    assert proxy.dropped.is_set() and report.retries == 1
    assert _one(postgresql, "SELECT count(*), sum(scrape_count) FROM zen_contacts") == (200, 200)


def test_lost_commit_ack_upsert_and_complete_writes_once(
    proxy: CommitAckDropper, proxied_dsn: str, dsn: str, postgresql: psycopg.Connection[Any]
) -> None:
    postgresql.execute(
        "INSERT INTO results (link, data) SELECT 'https://uc/' || i, '{}' "
        "FROM generate_series(1, 10) AS i"
    )
    postgresql.commit()
    with (
        Claimer(dsn, owner="w1", batch_size=10) as claimer,
        Upserter(proxied_dsn, server_id="s", max_wait=0.05) as up,
    ):
        batch = claimer.claim()
        recs = [{"source_link": c.link, "source_id": c.id} for c in batch.claims]
        recs.append({"source_link": "https://uc/bad", "latitude": 100.0})
        proxy.arm()
        report = up.upsert_and_complete(recs, claimer, batch)
    assert proxy.dropped.is_set() and report.already_committed
    assert _one(postgresql, "SELECT count(*), sum(scrape_count) FROM zen_contacts") == (10, 10)
    assert _one(postgresql, "SELECT count(*) FROM zen_rejects") == 1
    assert _one(postgresql, "SELECT count(*) FROM results WHERE status = 'done'") == 10


def _lock_waiters(conn: psycopg.Connection[Any]) -> list[int]:
    rows = conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
    ).fetchall()
    conn.rollback()
    return [r[0] for r in rows]


def test_retry_waits_out_an_in_doubt_commit_and_writes_nothing(
    dsn: str, postgresql: psycopg.Connection[Any]
) -> None:
    postgresql.execute(
        "INSERT INTO results (link, data) SELECT 'https://doubt/' || i, '{}' "
        "FROM generate_series(1, 5) AS i"
    )
    postgresql.commit()
    with (
        Claimer(dsn, owner="w1", batch_size=5) as claimer,
        Upserter(dsn, server_id="s", max_wait=0.05) as up,
    ):
        batch = claimer.claim()
        recs = [{"source_link": c.link, "source_id": c.id} for c in batch.claims]
        # The first attempt: written and completed, its COMMIT not yet done (as while a
        # synchronous standby has not confirmed it).
        first = psycopg.connect(dsn)
        up.upsert(recs, conn=first)
        claimer.complete(batch, conn=first)
        result: dict[str, Any] = {}

        def retry() -> None:
            try:
                result["report"] = up.upsert_and_complete(recs, claimer, batch)
            except BaseException as e:  # pragma: no cover - reported below
                result["error"] = e

        t = threading.Thread(target=retry)
        t.start()
        # Its first attempt blocks behind the in-doubt transaction's row locks; kill it so
        # that the call takes its retry path while the first transaction is still open.
        victim = wait_for(lambda: _lock_waiters(postgresql))[0]
        assert _one(postgresql, "SELECT pg_terminate_backend(%s)", victim) is True
        # The retry waits for the first transaction's outcome instead of writing again.
        waiting = wait_for(lambda: [p for p in _lock_waiters(postgresql) if p != victim])
        assert t.is_alive()
        first.commit()
        first.close()
        t.join(60)
    assert "error" not in result, result.get("error")
    report = result["report"]
    assert report.retries >= 1 and report.already_committed and report.written == 0
    assert waiting
    assert _one(postgresql, "SELECT count(*), sum(scrape_count) FROM zen_contacts") == (5, 5)
    assert _one(postgresql, "SELECT count(*) FROM results WHERE status = 'done'") == 5


def test_old_upsert_keys_are_pruned_in_bounded_batches(
    dsn: str, postgresql: psycopg.Connection[Any]
) -> None:
    with Upserter(dsn, server_id="s") as up:
        for i in range(5):
            up.upsert([{"source_link": f"https://k/{i}"}])
        assert _one(postgresql, "SELECT count(*) FROM zen_upsert_keys") == 5
        postgresql.execute(
            "UPDATE zen_upsert_keys SET committed_at = now() - interval '2 days' "
            "WHERE key IN (SELECT key FROM zen_upsert_keys LIMIT 4)"
        )
        postgresql.commit()
        assert up.prune_keys(older_than=timedelta(days=1), limit=3) == 3
        assert up.prune_keys(older_than=timedelta(days=1), limit=3) == 1
        assert up.prune_keys(older_than=timedelta(days=1), limit=3) == 0
    assert _one(postgresql, "SELECT count(*) FROM zen_upsert_keys") == 1
