"""Named SQL statements, loaded from the ``.sql`` files shipped under ``sql/``.

Each file under ``sql/queries/`` holds statements under ``-- name: <name>`` headers, the
way procrastinate keeps its queries: the SQL stays readable and reviewable as SQL, and
Python only composes identifiers (with `psycopg.sql`) and binds values.
"""

from __future__ import annotations

import functools
import re
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

from psycopg import sql

from .errors import ZenpipeError

__all__ = ["load", "sql_dir"]

_HEADER = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)


def sql_dir() -> Traversable:
    """The folder of SQL files: inside the wheel, or the repository's ``sql/``.

    The wheel carries the files as ``zenpipe/sql``; an editable install imports the
    package from the repository, where they live at the top level.
    """
    packaged = files("zenpipe") / "sql"
    if packaged.is_dir():
        return packaged
    repo = Path(__file__).resolve().parent.parent / "sql"
    if repo.is_dir():
        return repo
    raise ZenpipeError(f"zenpipe's SQL files are missing (looked in {packaged} and {repo})")


def trusted(text: str) -> sql.SQL:
    """Wrap SQL read from zenpipe's own files; never pass user input here."""
    return sql.SQL(text)


@functools.cache
def load(group: str) -> dict[str, sql.SQL]:
    """Return the statements of ``sql/queries/<group>.sql`` by name."""
    path = sql_dir() / "queries" / f"{group}.sql"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ZenpipeError(f"query file {group}.sql not found in {sql_dir()}") from e
    parts = _HEADER.split(text)
    queries: dict[str, sql.SQL] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in queries:
            raise ZenpipeError(f"query {name!r} defined twice in {group}.sql")
        # Full-line comments are for readers of the file; the server need not parse
        # them on every execution.
        lines = [ln for ln in body.splitlines() if not ln.lstrip().startswith("--")]
        queries[name] = trusted("\n".join(lines).strip().rstrip(";").strip())
    return queries
