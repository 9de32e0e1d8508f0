-- Connections a server holds besides its pool (issue 9, wake-ups): the control
-- connection (registration, heartbeats) and, when its workers wake up on LISTEN, the
-- listening connection. Neither is taken from the pool (a saturated pool must not stop
-- heartbeats or notifications), and both count in the fleet budget, which now sums
-- pool_size + dedicated over the live rows. Rows of older servers count 1, as before.
ALTER TABLE zen_servers
    ADD COLUMN dedicated integer NOT NULL DEFAULT 1
        CONSTRAINT zen_servers_dedicated_check CHECK (dedicated >= 1);
