"""``python -m zenpipe.bench SPEC``: one bench server, a `zenpipe.runtime.Supervisor` of
``--workers`` worker processes running the stand-in enrichment (`zenpipe.bench.run`
starts ``--servers`` of these)."""

import json
import os
import sys

from ..runtime import ProcessSpec, Supervisor
from ..runtime.process import configure_logging

spec = json.loads(sys.argv[1])
configure_logging(f"[bench server {spec['server']} pid {os.getpid()}] ")
supervisor = Supervisor(
    ProcessSpec(**spec["process"]),
    dsn=os.environ["ZENPIPE_DSN"],
    processes=spec["workers"],
    # Crash rows and kill faults are the point: never give up, restart quickly.
    max_restarts=1_000_000,
    restart_window=spec["restart_window"],
)
sys.exit(supervisor.run())
