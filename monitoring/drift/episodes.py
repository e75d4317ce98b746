"""Episodes: persistence before an alarm, one alarm per episode.

One drifted window is weak evidence (autocorrelated traffic, a burst from one client), and
an alarm per drifted window is an alarm storm. An episode opens when ``k`` of the last ``n``
windows drifted (``episode_drifted`` of ``episode_windows``, default 2 of 3) and closes after
``m`` clean windows in a row (``episode_clean``, default 3). ``episodes`` counts openings
only, so a long shift is one episode however many windows it drifts.

The state is a plain JSON-able dict so the store can keep it in Redis and every replica reads
the same one; :func:`advance` is pure.
"""

from __future__ import annotations

from typing import Any

__all__ = ["new_state", "advance"]


def new_state() -> dict[str, Any]:
    return {"windows": 0, "recent": [], "clean": 0, "episode": None, "episodes": 0}


def advance(state: dict[str, Any] | None, drifted: bool, ended: float, config: Any) -> dict[str, Any]:
    """The state after one more closed window (``drifted`` or clean) that ended at ``ended``."""
    # a shallow copy is enough: every key below is assigned a new value, never changed in place
    # (so the state passed in, which the store and status readers share, is never touched)
    s = dict(state) if state else new_state()
    n, k, m = int(config.episode_windows), int(config.episode_drifted), int(config.episode_clean)
    s["windows"] += 1
    s["recent"] = (s["recent"] + [bool(drifted)])[-n:]
    s["clean"] = 0 if drifted else s["clean"] + 1
    episode = s["episode"]
    if episode is not None and episode["open"]:
        if s["clean"] >= m:
            s["episode"] = {**episode, "open": False, "ended": ended}
            s["recent"] = []  # a fresh start: the windows before the close do not reopen it
    elif sum(s["recent"]) >= k:
        s["episodes"] += 1
        s["episode"] = {"id": s["episodes"], "started": ended, "open": True, "ended": None}
    return s
