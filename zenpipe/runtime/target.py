"""``MODULE:CALLABLE``: the user's enrich function, named on the command line.

`resolve` imports the module and returns the attribute, or raises `EnrichTargetError`
saying which part failed.  The attribute is the enrich function itself (``def
enrich(claim) -> record | None``, see `zenpipe.worker.Enrich`), not a factory: a module
that needs set-up (an HTTP client, a browser) does it at import time, once per worker
process.  The current directory is put on ``sys.path`` first, as ``python -m`` does, so
``zenpipe worker mymodule:enrich`` finds ``./mymodule.py``.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import cast

from ..errors import EnrichTargetError
from ..worker import Enrich

__all__ = ["resolve"]


def resolve(target: str) -> Enrich:
    """The callable named by *target* (``package.module:name``, ``name`` may be dotted).

    Raises `EnrichTargetError` when *target* is malformed, the module cannot be imported
    (the error of the import is in the message; the module's own exception is chained),
    the attribute is missing, or it is not callable.
    """
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise EnrichTargetError(
            f"{target!r}: expected MODULE:CALLABLE, e.g. myscraper.enrich:enrich"
        )
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        obj: object = importlib.import_module(module_name)
    except Exception as e:  # the user's module may raise anything at import
        raise EnrichTargetError(
            f"{target!r}: cannot import {module_name!r}: {type(e).__name__}: {e}"
        ) from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise EnrichTargetError(
                f"{target!r}: {module_name!r} has no attribute {attr!r}"
            ) from None
    if not callable(obj):
        raise EnrichTargetError(f"{target!r}: {type(obj).__name__} object is not callable")
    return cast(Enrich, obj)
