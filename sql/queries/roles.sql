-- Least-privilege group roles (zenpipe.roles, `zenpipe roles create`). {worker},
-- {reader}, {admin}, {schema}, {db} are identifiers composed with psycopg.sql. Every
-- statement is idempotent (GRANT of a privilege already held is a no-op).

-- name: role_exists
SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = %(role)s);

-- name: create_role
-- Group roles: NOLOGIN, members (login roles, one per server or person) inherit them.
CREATE ROLE {role} NOLOGIN;

-- name: grant_worker
-- Claim, settle, upsert, register, record statistics, load source rows; never ALTER,
-- DROP, TRUNCATE or DELETE data (DELETE on zen_servers: a clean shutdown removes its
-- own row, registration purges expired ones; on zen_upsert_keys: pruning old keys).
GRANT USAGE ON SCHEMA {schema} TO {worker};
GRANT TEMPORARY ON DATABASE {db} TO {worker};
GRANT SELECT, INSERT, UPDATE ON results, zen_contacts, zen_stats_hourly TO {worker};
GRANT SELECT, INSERT ON zen_rejects, zen_jobs TO {worker};
GRANT SELECT, INSERT, DELETE ON zen_upsert_keys TO {worker};
GRANT SELECT, INSERT, UPDATE, DELETE ON zen_servers TO {worker};
GRANT SELECT ON zen_settings, zen_schema_migrations TO {worker};
GRANT USAGE ON ALL SEQUENCES IN SCHEMA {schema} TO {worker};

-- name: grant_reader
-- The dashboard, the hourly figures and the fleet's rows; no source row, no contact.
GRANT USAGE ON SCHEMA {schema} TO {reader};
GRANT SELECT ON zen_mv_dashboard, zen_stats_hourly, zen_stats_rollup, zen_servers,
                zen_jobs, zen_settings, zen_schema_migrations TO {reader};

-- name: grant_admin
-- Operations (prune, rollup, refresh, requeue, settings, legacy migration): every
-- table's data, the refresh function; still no ALTER or DROP (those need ownership,
-- which stays with the role that applies the migrations).
GRANT USAGE ON SCHEMA {schema} TO {admin};
GRANT TEMPORARY ON DATABASE {db} TO {admin};
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {admin};
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {schema} TO {admin};
GRANT EXECUTE ON FUNCTION zen_refresh_dashboard_v1() TO {admin};
GRANT {worker}, {reader} TO {admin};

-- name: where_am_i
SELECT current_schema(), current_database();
