-- Fleet hardening (issue 8, points 13 and 14).
--
-- zen_servers.instance_id: a random id per process lifetime. Host and pid do not tell
-- two processes apart (two containers on one hostname both run as pid 1), so a row is
-- "ours" only when its instance_id is ours: heartbeats and departures match on it.
-- Rows written by hand (tests, admins) get a random one and are never anyone's.
ALTER TABLE zen_servers
    ADD COLUMN instance_id uuid NOT NULL DEFAULT gen_random_uuid();

-- zen_jobs.server_id is history, not a reference: with the foreign key every clean
-- shutdown (which deletes its zen_servers row) NULLed the server's job history, and
-- purging a crashed server's row rewrote all its job rows inside the registration
-- lock (1M rows: 9.8 s, registration cancelled). The id stays as plain text.
ALTER TABLE zen_jobs DROP CONSTRAINT IF EXISTS zen_jobs_server_id_fkey;

-- zen_contacts.source_id references results(id) ON DELETE SET NULL: deleting a results
-- row looks up its contacts by source_id in every one of the 32 partitions. Created
-- on the partitioned parent, PostgreSQL builds (or attaches an existing matching) index
-- on every partition, and on every partition attached later. Partial: contacts without
-- a source are never looked up (the trigger's "source_id = $1" implies NOT NULL).
CREATE INDEX IF NOT EXISTS idx_zc_source_id ON zen_contacts (source_id)
    WHERE source_id IS NOT NULL;
