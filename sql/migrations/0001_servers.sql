-- zen_servers: one row per running zenpipe server (host + process), kept fresh by
-- heartbeats. The pool module sizes its connection pool from the live rows, so that the
-- whole fleet stays under the PostgreSQL server's max_connections.

CREATE TABLE zen_servers (
    server_id       text        PRIMARY KEY
                    CONSTRAINT zen_servers_server_id_check
                    CHECK (server_id <> '' AND length(server_id) <= 200),
    host            text        NOT NULL,
    pid             integer     NOT NULL CHECK (pid > 0),
    pool_size       integer     NOT NULL CHECK (pool_size >= 0),
    version         text        NOT NULL,
    started_at      timestamptz NOT NULL DEFAULT now(),
    last_heartbeat  timestamptz NOT NULL DEFAULT now(),
    -- Latest pool metrics reported with the heartbeat (used, free, waiting, ...).
    stats           jsonb       NOT NULL DEFAULT '{}'
                    CONSTRAINT zen_servers_stats_check CHECK (jsonb_typeof(stats) = 'object')
);

-- Live-server lookups: WHERE last_heartbeat > now() - interval '...'.
CREATE INDEX zen_servers_heartbeat_idx ON zen_servers (last_heartbeat);
