"""Least-privilege roles: ``zenpipe roles create``.

Three NOLOGIN group roles; give each login role the one it needs
(``GRANT zen_worker TO server_17``):

* ``zen_worker``: claims, settles, upserts, registers in the fleet, records statistics
  and loads source rows (``zenpipe worker``, ``zenpipe load``); cannot ALTER, DROP,
  TRUNCATE, nor DELETE source rows or contacts.
* ``zen_reader``: reads the dashboard, the hourly figures and the fleet's rows
  (``zenpipe stats``); no source row, no contact.
* ``zen_admin``: both of the above plus every table's data and the dashboard refresh
  (``zenpipe prune``, ``stats rollup``, ``refresh-dashboard``, ``requeue``, ``settings``,
  ``migrate-legacy``); ownership, hence ALTER and DROP, stays with the role that
  applies the migrations.

Roles are cluster-wide; the grants are per database and per table, so run the command
again after a migration that adds tables (it is idempotent).  Needs CREATEROLE (or a
superuser) and ownership of the tables (or grant options).
"""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import sql

from ._ops import connect
from .queries import load

__all__ = ["RoleNames", "create_roles"]


@dataclass(frozen=True)
class RoleNames:
    worker: str = "zen_worker"
    reader: str = "zen_reader"
    admin: str = "zen_admin"


def create_roles(dsn: str, names: RoleNames | None = None) -> list[str]:
    """Create the roles that do not exist yet and (re)apply the grants on *dsn*'s
    database, in one transaction; return the roles created."""
    n = names or RoleNames()
    q = load("roles")
    created: list[str] = []
    with connect(dsn, purpose="roles", statement_timeout=60.0) as conn, conn.transaction():
        for role in (n.worker, n.reader, n.admin):
            row = conn.execute(q["role_exists"], {"role": role}).fetchone()
            if not (row and row[0]):
                conn.execute(q["create_role"].format(role=sql.Identifier(role)))
                created.append(role)
        schema_row = conn.execute(q["where_am_i"]).fetchone()
        assert schema_row is not None
        ids = {
            "worker": sql.Identifier(n.worker),
            "reader": sql.Identifier(n.reader),
            "admin": sql.Identifier(n.admin),
            "schema": sql.Identifier(schema_row[0]),
            "db": sql.Identifier(schema_row[1]),
        }
        for block in ("grant_worker", "grant_reader", "grant_admin"):
            # Several statements, no parameters: one round trip per block.
            conn.execute(q[block].format(**ids))
    return created
