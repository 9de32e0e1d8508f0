-- zen_servers: one row per running zenpipe server (host + process), kept fresh by
-- heartbeats. The pool module sizes its connection pool from the live rows, so that the
-- whole fleet stays under the PostgreSQL server's max_connections (docs/pooling.md).
--
-- A row is live while expires_at is in the future: each heartbeat pushes expires_at
-- forward by the server's own lease (heartbeat interval x allowed misses), so servers
-- with different intervals can share the table. Registration (zenpipe.pool) runs under
-- a transaction-level advisory lock, sums the live rows' connections and inserts its
-- own row only when it fits the budget.

CREATE TABLE zen_servers (
    server_id       text        PRIMARY KEY
                    CONSTRAINT zen_servers_server_id_check
                    CHECK (server_id <> '' AND length(server_id) <= 200),
    host            text        NOT NULL,
    pid             integer     NOT NULL CHECK (pid > 0),
    -- The pool's max_size granted from the budget. The server holds one more
    -- connection (its control connection: registration and heartbeats), so the budget
    -- sums pool_size + 1 over the live rows.
    pool_size       integer     NOT NULL CHECK (pool_size >= 0),
    version         text        NOT NULL,
    started_at      timestamptz NOT NULL DEFAULT now(),
    last_heartbeat  timestamptz NOT NULL DEFAULT now(),
    -- Rows written without a lease (by hand, by tests) live for 30 s.
    expires_at      timestamptz NOT NULL DEFAULT now() + interval '30 seconds',
    -- Latest pool metrics reported with the heartbeat (used, free, waiting, ...).
    stats           jsonb       NOT NULL DEFAULT '{}'
                    CONSTRAINT zen_servers_stats_check CHECK (jsonb_typeof(stats) = 'object'),
    CONSTRAINT zen_servers_expires_check CHECK (expires_at >= last_heartbeat)
);

-- Live-server lookups: WHERE expires_at > now() (budget, zenpipe stats).
CREATE INDEX zen_servers_expires_idx ON zen_servers (expires_at);
