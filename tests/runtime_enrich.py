"""Enrich functions for tests/test_runtime.py, run by ``zenpipe worker`` in real worker
processes (importable with ``PYTHONPATH=tests``).

Each row's ``data`` says what to do: ``sleep`` seconds of pretend scraping, ``block``
(wait for a file that never comes), ``kill_once`` (SIGKILL the process the first time,
a marker file remembers it), ``kill`` (SIGKILL the process every time).  Files live in
``$RUNTIME_TEST_DIR``.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from zenpipe.claim import Claim


def _dir() -> Path:
    return Path(os.environ["RUNTIME_TEST_DIR"])


def enrich(claim: Claim) -> dict[str, Any]:
    d = claim.data
    if d.get("block"):
        (_dir() / f"entered-{claim.id}").touch()
        while not (_dir() / "never").exists():
            time.sleep(0.05)
    if d.get("kill") or (d.get("kill_once") and not (_dir() / "killed").exists()):
        (_dir() / "killed").touch()
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(float(d.get("sleep", 0)))
    return {"source_link": claim.link, "source_id": claim.id, "country_code": "ID"}


not_callable = 42
