"""One structured log line per lifecycle event: ``event=NAME key=value ...`` (logfmt).

The process's log format (server/cli.py) puts the timestamp, level and logger first, so a
line reads ``2026-11-29 10:40:01,123 WARNING osprey.batching: event=queue_full model=mlp
version=1.0 refused=37 window_s=5``. A value holding a space, quote, ``=`` or nothing is
JSON-quoted, so ``grep event=``, awk and logfmt parsers read every line the same way.
"""

from __future__ import annotations

import json
import logging
from typing import Any

__all__ = ["event"]


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, float):
        return format(v, ".6g")
    s = str(v)
    if not s or any(c in s for c in ' "=\\\n\r\t'):
        return json.dumps(s)
    return s


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log ``event=name`` and ``fields`` as one line at ``level``."""
    if logger.isEnabledFor(level):
        logger.log(level, "event=%s%s", name, "".join(f" {k}={_value(v)}" for k, v in fields.items()))
