"""Running a fleet member: ``zenpipe worker MODULE:CALLABLE``.

- `zenpipe.runtime.target`: ``MODULE:CALLABLE`` to the enrich function.
- `zenpipe.runtime.process`: one worker process (a `ZenPool` in the fleet, one `Worker`),
  its graceful stop and the release of rows when the grace runs out.
- `zenpipe.runtime.supervisor`: N such processes, restarts with backoff, a crash-loop
  limit, signals.

See ``docs/runtime.md``.
"""

from __future__ import annotations

from .process import ProcessSpec
from .supervisor import Supervisor, describe_exit
from .target import resolve

__all__ = ["ProcessSpec", "Supervisor", "describe_exit", "resolve"]
